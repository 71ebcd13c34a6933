"""What tracing costs one generate(), against what users do today; and whether the stages agree.

  python benchmarks/overhead.py                  # GPU: realistic LLaVA (b1, b32) and Llama (b1)
  python benchmarks/overhead.py --cpu-tiny       # CPU smoke run on tiny models (labelled CPU)

Every method times the same generate() (host wall time between two syncs); methods are
interleaved repetition by repetition (A B C ... A B C ...), medians after warm-up:

  plain                 generate() untraced: the baseline (its run-to-run spread is reported too)
  stagetrace            stage level
  stagetrace_layers     stage level + marks around every decoder layer at every step
  stagetrace_layers_shared  the same with one mark per boundary between layers (half the marks)
  stagetrace_layers_every4/8  layers on the prefill and on every 4th / 8th decode step only (layer_every)
  stagetrace_layers_prefill   layers on the prefill only (layer_detail="prefill")
  host_clock(_layers)   the same hooks, wrappers and native calls as stagetrace(_layers), to the
                        host clock: no CUDA event. stagetrace_layers - host_clock_layers is what
                        recording the events adds; host_clock_layers - plain, the Python around them
  sync                  torch.cuda.synchronize() + perf_counter at stagetrace's boundaries
  sync_layers           the same at every decoder layer
  torch_event           torch.cuda.Event created + recorded from Python at the same boundaries
  torch_event_layers    the same at every decoder layer
  torch_profiler        torch.profiler (CPU + CUDA) around the call; export time and size reported

Beside each stagetrace method's wall difference: its direct in-context cost (``direct %``,
``direct µs/mark``) — ``--direct-reps`` more calls with every native mark timed around the
call itself (``_env.TimedTimeline``), summed per call, as a share of plain's median. The
wall difference also holds what the direct timer cannot see (the Python wrappers, the
host's caches after each mark); the two agreeing says the marks are the cost.

The 'agreement' section (GPU) compares stagetrace's stage medians with the sync method's at
the same boundaries *of the same runs* (DualTimeline: both clocks at every mark), so the
comparison carries no run-to-run noise; target: within 2% or 0.2 ms.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import TimedTimeline, bootstrap_median_ci, environment, pin_cpu, quantile, save, table, timed_ms  # noqa: E402

STAGE_KEYS = ("vision_ms", "prefill_ms", "decode_ms", "other_ms", "total_ms", "ttft_ms")


def make_methods(case: Any, cuda: bool, new_tokens: int, with_profiler: bool,
                 settle: int = 0) -> dict[str, Callable[[], dict]]:
    import torch

    import stagetrace
    from stagetrace.testing.reference import HostClockTimeline, SyncTimeline, TorchEventTimeline

    model = case.model
    kw = dict(case.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              **case.generate_kwargs)

    def timed(fn: Callable[[], Any]) -> float:
        return timed_ms(fn, cuda)

    def settled() -> None:
        """--settle: untimed calls of the same method first, so the timed one follows its own kind
        (as with a tracer left on over many calls), not the switch from another method."""
        for _ in range(settle):
            model.generate(**kw)

    def plain() -> dict:
        settled()
        return {"wall_ms": timed(lambda: model.generate(**kw))}

    def traced(layer_detail: str, timeline_factory: Callable[[], Any] | None,
               layer_marks: str = "pair", layer_every: int = 1) -> Callable[[], dict]:
        def run() -> dict:
            tl = timeline_factory() if timeline_factory else None
            with stagetrace.trace(model, layer_detail=layer_detail, layer_marks=layer_marks, timeline=tl,
                                  layer_every=layer_every, keep_marks=False) as tracer:
                settled()
                wall = timed(lambda: model.generate(**kw))
            rec = tracer.records[-1]
            return {"wall_ms": wall, "record": rec.to_dict(), "n_marks": rec.n_marks, "resolve_ms": rec.resolve_ms,
                    "build_ms": rec.build_ms}

        def direct_us() -> float:
            """One call with every native mark timed around itself: the direct in-context cost."""
            from stagetrace.low_level import new_timeline

            tl = TimedTimeline(new_timeline("cuda" if cuda else "cpu", capacity=1 << 15))
            with stagetrace.trace(model, layer_detail=layer_detail, layer_marks=layer_marks, timeline=tl,
                                  layer_every=layer_every, keep_marks=False):
                model.generate(**kw)
            return sum(tl.cost_ns) / 1e3

        if timeline_factory is None:
            run.direct_us = direct_us  # type: ignore[attr-defined]
        return run

    dev = torch.cuda.current_device() if cuda else None
    methods: dict[str, Callable[[], dict]] = {
        "plain": plain,
        "plain_again": plain,  # A/A: the same method twice shows what a difference of nothing looks like
        "stagetrace": traced("off", None),
        "stagetrace_layers": traced("all", None),
        "stagetrace_layers_shared": traced("all", None, "shared"),
        "stagetrace_layers_every4": traced("all", None, layer_every=4),
        "stagetrace_layers_every8": traced("all", None, layer_every=8),
        "stagetrace_layers_prefill": traced("prefill", None),
        # the same hooks, wrappers and native calls with the host clock instead of a CUDA event:
        # the wall difference to stagetrace_layers is what recording the events adds
        "host_clock": traced("off", HostClockTimeline),
        "host_clock_layers": traced("all", HostClockTimeline),
        "sync": traced("off", lambda: SyncTimeline(dev)),
        "sync_layers": traced("all", lambda: SyncTimeline(dev)),
    }
    if cuda:
        methods["torch_event"] = traced("off", TorchEventTimeline)
        methods["torch_event_layers"] = traced("all", TorchEventTimeline)
    if with_profiler:
        from torch.profiler import ProfilerActivity, profile

        def profiled() -> dict:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            settled()
            with profile(activities=acts) as prof:
                wall = timed(lambda: model.generate(**kw))
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "trace.json")
                t0 = time.perf_counter()
                prof.export_chrome_trace(path)
                export_s = time.perf_counter() - t0
                size = os.path.getsize(path)
            return {"wall_ms": wall, "export_s": export_s, "trace_bytes": size}

        methods["torch_profiler"] = profiled
    return methods


def run_config(name: str, case: Any, cuda: bool, reps: int, warmup: int, new_tokens: int,
               profiler_reps: int, only: list[str] | None = None, direct_reps: int = 5, settle: int = 0) -> dict:
    methods = make_methods(case, cuda, new_tokens, with_profiler=profiler_reps > 0, settle=settle)
    if only:
        methods = {m: fn for m, fn in methods.items() if m in only or m == "plain"}
    samples: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(warmup):
        for fn in methods.values():
            if fn is not methods.get("torch_profiler"):
                fn()
    names = list(methods)
    for rep in range(reps):
        # Interleaved (A B C ... A B C ...), starting one method later each repetition so no
        # method always follows the same neighbour (e.g. the profiler's teardown).
        gc.collect()
        for m in names[rep % len(names):] + names[: rep % len(names)]:
            if m == "torch_profiler" and rep >= profiler_reps:
                continue
            samples[m].append(methods[m]())
    # the direct in-context cost of each stagetrace method: its marks timed around the native call
    direct = {m: [fn.direct_us() for _ in range(direct_reps)] for m, fn in methods.items()  # type: ignore[attr-defined]
              if hasattr(fn, "direct_us") and direct_reps > 0}
    plain = [s["wall_ms"] for s in samples["plain"]]
    base = statistics.median(plain)
    summary: dict[str, Any] = {}
    for m, ss in samples.items():
        walls = [s["wall_ms"] for s in ss]
        med = statistics.median(walls)
        # Paired: each repetition's method against the plain run of the same repetition, so
        # slow drift cancels; the A/A row (plain_again) shows what remains of the noise.
        paired = [100 * (w - p) / p for w, p in zip(walls, plain)]
        lo, hi = bootstrap_median_ci(paired)
        row: dict[str, Any] = {"median_ms": med, "overhead_pct": 100 * (med - base) / base,
                               "paired_overhead_pct": statistics.median(paired),
                               "paired_overhead_ci95_pct": [lo, hi],
                               # the least disturbed run of each: host noise only ever adds time
                               "min_overhead_pct": 100 * (min(walls) - min(plain)) / min(plain),
                               "walls_ms": walls}
        if ss and "n_marks" in ss[0]:
            row["n_marks"] = ss[0]["n_marks"]
            row["resolve_ms"] = statistics.median(s["resolve_ms"] for s in ss)  # the one sync, included in wall
            # the record, built outside the call (here at the tracer's stop, in the call's wake)
            row["build_ms"] = statistics.median(s["build_ms"] for s in ss)
            row["per_mark_us"] = (med - base) * 1e3 / ss[0]["n_marks"]
        if direct.get(m):
            # beside the wall difference: the marks' own cost inside the call, as a share of it
            row["direct_us_per_call"] = statistics.median(direct[m])
            row["direct_pct"] = 100 * row["direct_us_per_call"] / 1e3 / base
            row["direct_us_per_mark"] = row["direct_us_per_call"] / row["n_marks"]
            # what the call pays that is measured directly: its marks, and what it does after
            # generate() returned before it hands back (resolve_ms: the sync, the host copies)
            row["accounted_pct"] = row["direct_pct"] + 100 * row["resolve_ms"] / base
            # and with the record's build, which the caller pays when it reads the records
            row["accounted_with_build_pct"] = row["accounted_pct"] + 100 * row["build_ms"] / base
        if m == "torch_profiler" and ss:
            row["export_s"] = statistics.median(s["export_s"] for s in ss)
            row["trace_bytes"] = statistics.median(s["trace_bytes"] for s in ss)
        summary[m] = row
    spread = {"min_ms": min(plain), "max_ms": max(plain),
              "p10_p90_pct": 100 * (quantile(plain, 0.9) - quantile(plain, 0.1)) / base,
              "mad_pct": 100 * statistics.median(abs(x - base) for x in plain) / base}

    def stage_medians(m: str) -> dict[str, float | None]:
        recs = [s["record"] for s in samples[m]]
        out = {}
        for k in STAGE_KEYS:
            vals = [r[k] for r in recs if r.get(k) is not None]
            out[k] = statistics.median(vals) if vals else None
        steps = [statistics.median(r["decode_step_ms"]) for r in recs if r["decode_step_ms"]]
        out["decode_step_median_ms"] = statistics.median(steps) if steps else None
        return out

    agreement = same_run_agreement(case, cuda, new_tokens, reps) if cuda else {}
    partition = [abs((r["record"]["vision_ms"] or 0) + r["record"]["prefill_ms"] + r["record"]["decode_ms"]
                     + r["record"]["other_ms"] - r["record"]["total_ms"]) for r in samples.get("stagetrace", [])]
    return {"config": name, "methods": summary, "plain_spread": spread, "agreement": agreement,
            "max_partition_error_ms": max(partition, default=None), "params": {"reps": reps, "warmup": warmup,
                                                                  "new_tokens": new_tokens,
                                                                  "profiler_reps": profiler_reps,
                                                                  "batch": case.inputs["input_ids"].shape[0],
                                                                  "prompt_len": case.prompt_len}}


def same_run_agreement(case: Any, cuda: bool, new_tokens: int, reps: int) -> dict:
    """stagetrace vs sync at the same boundaries of the same runs (DualTimeline)."""
    import torch

    import stagetrace
    from stagetrace.low_level import new_timeline
    from stagetrace.testing.reference import DualTimeline
    from stagetrace.records import StageRecord

    kw = dict(case.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              **case.generate_kwargs)
    ours: list[dict] = []
    ref: list[dict] = []
    for _ in range(reps):
        dual = DualTimeline(new_timeline("cuda", torch.cuda.current_device()))
        with stagetrace.trace(case.model, timeline=dual, keep_marks=False) as tracer:
            case.model.generate(**kw)
        ours.append(tracer.records[-1].to_dict())
        ref.append(StageRecord.from_stages(stagetrace.stages_from_marks(*dual.reference), batch_size=0,
                                           prompt_tokens=0, output_tokens=0).to_dict())
    out = {}
    for k in (*STAGE_KEYS, "decode_step_ms"):
        if k == "decode_step_ms":
            a = statistics.median(x for r in ours for x in r[k])
            b = statistics.median(x for r in ref for x in r[k])
        elif ours[0][k] is None:
            continue
        else:
            a, b = statistics.median(r[k] for r in ours), statistics.median(r[k] for r in ref)
        out[k] = {"stagetrace_ms": a, "sync_ms": b, "diff_ms": a - b,
                  "within_tolerance": abs(a - b) <= max(0.02 * abs(b), 0.2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny models on the CPU (smoke run; CPU figures)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--profiler-reps", type=int, default=3)
    ap.add_argument("--configs", default="llava_b1,llava_b32,llama_b1")
    ap.add_argument("--direct-reps", type=int, default=5,
                    help="calls per stagetrace method with every mark timed around the native call (direct cost)")
    ap.add_argument("--methods", default="", help="comma-separated subset (plain is always run); default all")
    ap.add_argument("--pin-cpu", type=int, default=None, metavar="CORE",
                    help="pin this process to one core (less scheduler noise on a shared host)")
    ap.add_argument("--settle", type=int, default=0,
                    help="untimed calls of the same method right before each timed one (a traced method's inside "
                         "its tracer): the timed call follows its own kind, not the switch from another method")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    pin_cpu(args.pin_cpu)

    import models
    from stagetrace.testing import tiny

    cuda = torch.cuda.is_available() and not args.cpu_tiny
    env = environment()
    results: list[dict] = []

    def payload_of(results: list[dict]) -> dict:
        return {"benchmark": "overhead", "env": env, "device": "cuda" if cuda else "cpu",
                "models": ("realistic LLaVA (CLIP-L/336 + 22-layer 2048-wide Llama, bf16, random weights) / "
                           "its Llama alone") if cuda else "tiny random-weight models on the CPU (smoke run)",
                "params": {k: v for k, v in vars(args).items() if k != "out"}, "results": results,
                "targets": {"stagetrace_overhead_pct": 0.5, "stagetrace_layers_overhead_pct_b1": 2.0}}

    for cfg in args.configs.split(","):
        family, batch = cfg.rsplit("_b", 1)
        b = int(batch)
        if cuda:
            case = (models.llava_realistic(batch=b) if family == "llava" else models.llama_realistic(batch=b))
        else:
            case = tiny.build(family, batch=b)
        case.model.eval()
        results.append(run_config(cfg, case, cuda, args.reps, args.warmup, args.new_tokens, args.profiler_reps,
                                  [m for m in args.methods.split(",") if m], args.direct_reps, args.settle))
        save("overhead" if cuda else "overhead-cpu-tiny", payload_of(results), args.out)  # survives a cut-off
        del case
        if cuda:
            torch.cuda.empty_cache()

    payload = payload_of(results)
    path = save("overhead" if cuda else "overhead-cpu-tiny", payload, args.out)
    for r in results:
        print(f"\n{r['config']} on {env['card']}: plain median {r['methods']['plain']['median_ms']:.2f} ms, "
              f"spread p10-p90 {r['plain_spread']['p10_p90_pct']:.2f}%, MAD {r['plain_spread']['mad_pct']:.2f}%")
        rows = [[m, v["median_ms"], v["overhead_pct"], v["paired_overhead_pct"],
                 "[{:.2f}, {:.2f}]".format(*v["paired_overhead_ci95_pct"]), v["min_overhead_pct"], v.get("n_marks", ""),
                 f"{v['per_mark_us']:.2f}" if "per_mark_us" in v else "",
                 f"{v['direct_pct']:.3f}" if "direct_pct" in v else "",
                 f"{v['direct_us_per_mark']:.2f}" if "direct_us_per_mark" in v else "",
                 f"{v['resolve_ms'] * 1e3:.0f}" if "resolve_ms" in v else "",
                 f"{v['accounted_pct']:.3f}" if "accounted_pct" in v else "",
                 f"{v['build_ms'] * 1e3:.0f}" if "build_ms" in v else "",
                 f"{v['accounted_with_build_pct']:.3f}" if "accounted_with_build_pct" in v else "",
                 f"{v['trace_bytes'] / 1e6:.1f} MB, export {v['export_s']:.2f} s" if "trace_bytes" in v else ""]
                for m, v in r["methods"].items()]
        print(table(rows, ["method", "median ms", "overhead %", "paired %", "paired 95% CI", "min-vs-min %", "marks",
                           "µs/mark", "direct %", "direct µs/mark", "resolve µs", "direct+resolve %",
                           "build µs", "+build %",
                           "notes"]))
        arow = [[k, a["stagetrace_ms"], a["sync_ms"], a["diff_ms"], a["within_tolerance"]]
                for k, a in r["agreement"].items()]
        print(table(arow, ["stage", "stagetrace ms", "sync ms", "diff ms", "within 2%/0.2ms"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
