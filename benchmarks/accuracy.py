"""Truth: stages of a synthetic model whose stages are GPU work of known duration.

  python benchmarks/accuracy.py            # GPU: spin kernels (torch.cuda._sleep)
  python benchmarks/accuracy.py --cpu      # CPU: host busy-waits (CPU figures, looser)

The model's vision module, language model and each decode step run one spin each. Every
spin is also timed by its own event pair recorded right around it (the reference). The
host runs ahead of the GPU (no syncs inside the loop), as in real generate().
Pass: vision, prefill and every decode step within max(1%, 5 µs) of the reference;
vision + prefill + decode + other == total exactly. The sync-per-boundary method is
measured on the same model for comparison.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, save, table  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


class Spin(nn.Module):
    """Known-duration work: a GPU spin kernel (or a host busy-wait), timed by its own reference."""

    def __init__(self, cuda: bool, cycles_per_us: float):
        super().__init__()
        self.cuda, self.cycles_per_us = cuda, cycles_per_us
        self.refs: list = []  # (start, end) event pairs, or host durations in ms

    def spin(self, us: float) -> None:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            torch.cuda._sleep(int(us * self.cycles_per_us))
            b.record()
            self.refs.append((a, b))
        else:
            t0 = time.perf_counter_ns()
            while time.perf_counter_ns() - t0 < us * 1e3:
                pass
            self.refs.append((time.perf_counter_ns() - t0) / 1e6)

    def ref_ms(self) -> list[float]:
        return [a.elapsed_time(b) if self.cuda else a for a, b in (r if self.cuda else (r, None) for r in self.refs)]


class SpinVision(Spin):
    def __init__(self, cuda: bool, cpu: float, us: float):
        super().__init__(cuda, cpu)
        self.us = us

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.spin(self.us)
        return pixels.mean(dim=1)


class SpinLM(Spin):
    def __init__(self, cuda: bool, cpu: float, prefill_us: float, step_us: float, d: int):
        super().__init__(cuda, cpu)
        self.prefill_us, self.step_us = prefill_us, step_us
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.spin(self.prefill_us if x.shape[1] > 1 else self.step_us)
        return x


class SpinVLM(nn.Module):
    def __init__(self, cuda: bool, cycles_per_us: float, vision_us: float, prefill_us: float, step_us: float):
        super().__init__()
        d = 16
        self.embed = nn.Embedding(64, d)
        self.vision = SpinVision(cuda, cycles_per_us, vision_us)
        self.language_model = SpinLM(cuda, cycles_per_us, prefill_us, step_us, d)
        self.lm_head = nn.Linear(d, 64)

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        if pixels is not None:
            x = x + self.vision(pixels)[:, None, :]
        return self.lm_head(self.language_model(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixels: torch.Tensor, max_new_tokens: int = 8) -> torch.Tensor:
        seq, x = input_ids, input_ids
        for i in range(max_new_tokens):
            logits = self(x, pixels if i == 0 else None)
            nxt = logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            x = nxt
        return seq


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--vision-us", type=float, default=3000)
    ap.add_argument("--prefill-us", type=float, default=5000)
    ap.add_argument("--step-us", type=float, default=2000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import stagetrace
    from stagetrace.testing.reference import SyncTimeline, spin_cycles_per_us

    cuda = torch.cuda.is_available() and not args.cpu
    dev = "cuda" if cuda else "cpu"
    model = SpinVLM(cuda, spin_cycles_per_us() if cuda else 1.0, args.vision_us, args.prefill_us, args.step_us).to(dev).eval()
    ids = torch.randint(0, 64, (1, 12), device=dev)
    pixels = torch.randn(1, 4, 16, device=dev)
    abs_tol_ms = 0.005 if cuda else 0.5  # CPU: Python between a hook and the busy-wait is real time too
    paths = dict(vision="vision", language_model="language_model", lm_head="lm_head")

    def one(timeline=None) -> dict:
        model.vision.refs.clear()
        model.language_model.refs.clear()
        if cuda:
            torch.cuda._sleep(int(2000 * model.vision.cycles_per_us))  # the host runs ahead from here on
        with stagetrace.trace(model, timeline=timeline, **paths) as tracer:
            model.generate(ids, pixels, max_new_tokens=args.steps + 1)
        rec = tracer.records[-1]
        lm = model.language_model.ref_ms()
        ref = {"vision_ms": model.vision.ref_ms()[0], "prefill_ms": lm[0], "decode_step_ms": lm[1:]}
        return {"record": rec, "ref": ref}

    one()
    runs = {"stagetrace": [], "sync": []}
    for _ in range(args.reps):
        runs["stagetrace"].append(one())
        runs["sync"].append(one(SyncTimeline(torch.cuda.current_device() if cuda else None)))

    report = {}
    for method, rs in runs.items():
        errs = {"vision_ms": [], "prefill_ms": [], "decode_step_ms": []}
        partition = []
        ok = True
        for r in rs:
            rec, ref = r["record"], r["ref"]
            parts = [rec.vision_ms, rec.prefill_ms, rec.decode_ms, rec.other_ms]
            partition.append(abs(sum(parts) - rec.total_ms))
            pairs = [("vision_ms", rec.vision_ms, ref["vision_ms"]), ("prefill_ms", rec.prefill_ms, ref["prefill_ms"])]
            pairs += [("decode_step_ms", m, f) for m, f in zip(rec.decode_step_ms, ref["decode_step_ms"])]
            for key, measured, truth in pairs:
                err = measured - truth
                errs[key].append(err)
                ok &= abs(err) <= max(0.01 * truth, abs_tol_ms)
        report[method] = {
            "all_within_tolerance": bool(ok),
            "max_partition_error_ms": max(partition),
            **{k: {"median_err_us": statistics.median(v) * 1e3, "max_abs_err_us": max(map(abs, v)) * 1e3}
               for k, v in errs.items()},
        }
    payload = {"benchmark": "accuracy", "env": environment(), "device": dev,
               "params": {**vars(args), "out": None, "tolerance": f"max(1%, {abs_tol_ms * 1e3:.0f} µs)"},
               "results": report}
    path = save("accuracy" if cuda else "accuracy-cpu", payload, args.out)
    rows = []
    for method, r in report.items():
        for k in ("vision_ms", "prefill_ms", "decode_step_ms"):
            rows.append([method, k, r[k]["median_err_us"], r[k]["max_abs_err_us"], r["all_within_tolerance"]])
    print(f"accuracy on {payload['env']['card']} (known spins: vision {args.vision_us:.0f} µs, prefill "
          f"{args.prefill_us:.0f} µs, step {args.step_us:.0f} µs; tolerance {payload['params']['tolerance']})")
    print(table(rows, ["method", "stage", "median err µs", "max |err| µs", "all within tol"]))
    print(f"max |stages + other - total|: {report['stagetrace']['max_partition_error_ms']:.3g} ms")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
