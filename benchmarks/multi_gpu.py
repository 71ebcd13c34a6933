"""A model split over two GPUs: the cross-device error of the one clock, and the cost of tracing.

  python benchmarks/multi_gpu.py        # needs two GPUs (e.g. the device tool's nvidia-h100-x2)

Part 1, cross-device error: GPU 0 spins 2 ms and hands over to GPU 1 (an event wait),
which spins 1 ms; marks on both devices, calibrated once before each repetition, as
the tracer does. On the one clock GPU 1's start must come at or just after GPU 0's end:
the difference is the cross-GPU wait latency plus the calibration error. Also the two
spins' measured lengths against their lengths timed on their own device.

Part 2, a realistic LLaVA (CLIP-L/336 + 22-layer Llama, bf16) split with accelerate
(vision + layers 0-10 on GPU 0, layers 11-21 + norm + lm_head on GPU 1): plain vs
stagetrace stage level vs layer level (one event per layer mark, on the GPU whose work it
waits for — the default; every mark on both GPUs — the way before; shared marks), interleaved,
with paired medians and 95% bootstrap intervals; tokens, partition, stages, events per call.
There is no CPU configuration: the point is two devices' clocks.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import bootstrap_median_ci, environment, save, table  # noqa: E402


def cross_device_error(reps: int) -> dict[str, Any]:
    import numpy as np

    from stagetrace.low_level import _C
    from stagetrace.low_level.multi_device import MultiDeviceTimeline
    from stagetrace.testing.reference import gpu_handover, spin_cycles_per_us

    cycles = spin_cycles_per_us()
    tl = MultiDeviceTimeline([_C.CudaTimeline(0), _C.CudaTimeline(1)])
    handoff_us, spin0_err_us, spin1_err_us = [], [], []
    for rep in range(reps + 3):
        h = gpu_handover(tl, cycles)
        if rep < 3:
            continue  # warm-up: clocks ramp
        t = h["t_ns"]
        handoff_us.append(h["handover_us"])
        spin0_err_us.append(t[1] / 1e3 - h["first_ref_us"])  # includes the host's issue gap before the spin
        spin1_err_us.append((t[3] - t[2]) / 1e3 - h["second_ref_us"])
    h = np.asarray(handoff_us)
    return {"reps": reps, "handoff_us": {"median": float(np.median(h)), "min": float(h.min()), "max": float(h.max()),
                                         "p1": float(np.percentile(h, 1)), "p99": float(np.percentile(h, 99))},
            "spin0_error_us_median": statistics.median(spin0_err_us),
            "spin1_error_us_median": statistics.median(spin1_err_us),
            "note": "handoff = GPU 1's first event after its wait minus GPU 0's event at the end of its spin, on the "
                    "calibrated clock: the cross-GPU wait latency plus the calibration error (negative would break "
                    "causality)"}


def split_model(reps: int, new_tokens: int) -> dict[str, Any]:
    import torch

    import stagetrace
    import models
    from stagetrace.testing import checkpoints

    case = models.llava_realistic(batch=1, device="cpu")
    model = checkpoints.split_over_gpus(case.model.eval())
    inputs = {k: v.to("cuda:0") if isinstance(v, torch.Tensor) else v for k, v in case.inputs.items()}
    kw = dict(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **case.generate_kwargs)

    def sync() -> None:
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)

    from stagetrace.low_level import _C
    from stagetrace.low_level.multi_device import MultiDeviceTimeline

    every_device = MultiDeviceTimeline([_C.CudaTimeline(0, 8192), _C.CudaTimeline(1, 8192)], mark_every_device=True)
    tracers = {"stagetrace": stagetrace.trace(model, keep_marks=False),
               # one event per layer mark, on the GPU whose work it waits for (the default)
               "stagetrace_layers": stagetrace.trace(model, layer_detail="all", keep_marks=False),
               # every layer mark on both GPUs (the way before): what one event per mark saves
               "stagetrace_layers_every_device": stagetrace.trace(model, layer_detail="all", keep_marks=False,
                                                                  timeline=every_device),
               "stagetrace_layers_shared": stagetrace.trace(model, layer_detail="all", layer_marks="shared",
                                                            keep_marks=False)}
    names = ["plain", *tracers, "plain_again"]
    walls: dict[str, list[float]] = {m: [] for m in names}
    records: dict[str, list[dict]] = {m: [] for m in tracers}
    outputs: dict[str, Any] = {}
    for rep in range(reps + 1):
        gc.collect()
        for m in names[rep % len(names):] + names[: rep % len(names)]:
            tr = tracers.get(m)
            gc.disable()
            try:
                if tr is not None:
                    tr.start()
                sync()
                t0 = time.perf_counter_ns()
                out = model.generate(**kw)
                sync()
                wall = (time.perf_counter_ns() - t0) / 1e6
            finally:
                if tr is not None:
                    tr.stop()
                gc.enable()
            outputs.setdefault(m, out.cpu())
            if rep == 0:
                continue  # warm-up
            walls[m].append(wall)
            if tr is not None:
                records[m].append(tr.records[-1].to_dict())
                tr.clear()
    plain = walls["plain"]
    summary = {}
    for m in names:
        paired = [100 * (w - p) / p for w, p in zip(walls[m], plain)]
        lo, hi = bootstrap_median_ci(paired)
        row: dict[str, Any] = {"median_ms": statistics.median(walls[m]),
                               "paired_overhead_pct": statistics.median(paired), "ci95_pct": [lo, hi],
                               "same_tokens_as_plain": bool(torch.equal(outputs[m], outputs["plain"]))}
        if m in records:
            recs = records[m]
            row["errors"] = [r["error"] for r in recs if r["error"]]
            ok = [r for r in recs if not r["error"]]
            for k in ("total_ms", "vision_ms", "prefill_ms", "decode_ms", "other_ms"):
                row[k] = statistics.median(r[k] for r in ok)
            row["partition_error_ms"] = max(abs(r["vision_ms"] + r["prefill_ms"] + r["decode_ms"] + r["other_ms"]
                                                - r["total_ms"]) for r in ok)
            row["devices"] = ok[0]["devices"]
            row["n_marks"] = ok[0]["n_marks"]
            timeline = tracers[m]._timeline
            row["events_per_call"] = getattr(timeline, "events", None)  # of the last call
        summary[m] = row
    return {"model": "realistic LLaVA split over cuda:0 / cuda:1", "reps": reps, "new_tokens": new_tokens,
            "methods": summary}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200, help="repetitions of the cross-device hand-over")
    ap.add_argument("--model-reps", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    if torch.cuda.device_count() < 2:
        sys.exit(f"multi_gpu.py needs two GPUs; torch {torch.__version__} sees {torch.cuda.device_count()}")
    env = environment()
    env["cards"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    payload: dict[str, Any] = {"benchmark": "multi_gpu", "env": env, "device": "cuda",
                               "params": {k: v for k, v in vars(args).items() if k != "out"}}
    payload["cross_device"] = cross_device_error(args.reps)
    path = save("multi_gpu", payload, args.out)
    payload["split_model"] = split_model(args.model_reps, args.new_tokens)
    path = save("multi_gpu", payload, args.out)

    cd = payload["cross_device"]
    print(f"cross-device on {env['cards']}: hand-over on one clock {cd['handoff_us']} µs; spin errors "
          f"{cd['spin0_error_us_median']:.2f} / {cd['spin1_error_us_median']:.2f} µs")
    sm = payload["split_model"]["methods"]
    rows = [[m, v["median_ms"], v["paired_overhead_pct"], "[{:.2f}, {:.2f}]".format(*v["ci95_pct"]),
             v["same_tokens_as_plain"], v.get("events_per_call", ""), v.get("total_ms", ""), v.get("prefill_ms", ""),
             v.get("decode_ms", ""), v.get("partition_error_ms", "")] for m, v in sm.items()]
    print(table(rows, ["method", "wall ms", "paired %", "95% interval", "same tokens", "events", "total ms",
                       "prefill ms", "decode ms", "partition err ms"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
