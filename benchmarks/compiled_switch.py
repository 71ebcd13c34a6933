"""Sampled layer stamps under compiled decode, step by step inside one call: what a step that
switches between the stamped and the bare compiled graph costs.

  python benchmarks/compiled_switch.py             # GPU: realistic Llama b1, 64 new tokens
  python benchmarks/compiled_switch.py --cpu-tiny  # CPU smoke run: tiny Llama, dynamo's eager backend

Why: with ``layer_every`` N the tracer runs the stamped graph on decode steps 0, N, 2N, … and
the bare one on the others, switching the layers' forwards before each step that changes
graph. Whole-call figures (session 5) put every 8th step as dear as every step; whether that
is the switch, and which part of it (dynamo's cache lookup, CUDA-graph trees changing path,
the stamps), is read here off the host's own clock at each ``prepare_inputs_for_generation``
(one class-level timer, every method alike) and the record's GPU step times.

Within a call of ``layer_every`` N, each period of N steps is paired with itself: the
stamped step, the first bare step after it (the switch back) and the other bare steps, each
minus the period's last bare step — so drift between calls stays out. Beside them, per
repetition (interleaved): a stage-level call's median step and an every-step call's median
step against the sampled call's bare-after-bare steps. ``--profile`` adds one cProfile'd
call of each method: host functions by own time (where a switching step's time goes).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import io
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import bootstrap_median_ci, environment, save, table  # noqa: E402
from compiled import compiled_decode_kwargs  # noqa: E402


def _ci_row(xs: list[float]) -> dict[str, Any]:
    lo, hi = bootstrap_median_ci(xs)
    return {"median": statistics.median(xs) if xs else float("nan"), "ci95": [lo, hi], "n": len(xs)}


def within_call(step_us: list[float], layer_steps: list[int], every: int) -> dict[str, list[float]]:
    """Per full period of ``every`` steps: each position minus the period's last (bare) step.

    ``step_us[k]`` is decode step k's host time; the stamped steps are ``layer_steps`` (the
    record's own list, not recomputed), which must be the periods' first steps."""
    out: dict[str, list[float]] = {"stamped": [], "first_bare": [], "later_bare": []}
    for start in layer_steps:
        end = start + every - 1  # the period's last step: bare, and not right after a switch
        if end >= len(step_us) or every < 3:
            continue
        ref = step_us[end]
        out["stamped"].append(step_us[start] - ref)
        out["first_bare"].append(step_us[start + 1] - ref)
        out["later_bare"].extend(step_us[k] - ref for k in range(start + 2, end))
    return out


def run(case: Any, cuda: bool, reps: int, warmup: int, new_tokens: int, every: int, profile: bool) -> dict[str, Any]:
    import torch

    import stagetrace

    model = case.model
    kw = compiled_decode_kwargs(case, cuda, new_tokens)

    entries_ns: list[int] = []  # host clock at each prepare_inputs_for_generation: [prefill, step 0, 1, ...]
    inner = type(model).prepare_inputs_for_generation

    @functools.wraps(inner)
    def clocked(*args: Any, **kwargs: Any) -> Any:
        entries_ns.append(time.perf_counter_ns())
        return inner(*args, **kwargs)

    tracers = {"stage_level": stagetrace.trace(model, keep_marks=False),
               f"layers_every{every}": stagetrace.trace(model, layer_detail="all", layer_every=every, keep_marks=False),
               "layers_every1": stagetrace.trace(model, layer_detail="all", keep_marks=False)}
    sampled = f"layers_every{every}"

    def call(name: str, profiler: cProfile.Profile | None = None) -> dict[str, Any]:
        tr = tracers[name]
        entries_ns.clear()
        gc.disable()
        try:
            with tr:
                if cuda:
                    torch.cuda.synchronize()
                if profiler is not None:
                    profiler.enable()
                model.generate(**kw)
                if profiler is not None:
                    profiler.disable()
        finally:
            gc.enable()
        rec = tr.records[-1]
        tr.clear()
        e = entries_ns
        # decode step k's host time: from its prepare_inputs to the next one (the last step has no next)
        step_us = [(b - a) / 1e3 for a, b in zip(e[1:], e[2:])]
        return {"step_us": step_us, "gpu_step_us": [1e3 * x for x in rec.decode_step_ms],
                "layer_steps": list(rec.layer_steps or []), "error": rec.error,
                "compiled_decode": rec.compiled_decode}

    with mock.patch.object(type(model), "prepare_inputs_for_generation", clocked):
        for _ in range(warmup):
            for name in tracers:
                call(name)
        samples: dict[str, list[dict]] = {name: [] for name in tracers}
        names = list(tracers)
        for rep in range(reps):
            gc.collect()
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                samples[name].append(call(name))
        profiles: dict[str, str] = {}
        if profile:
            for name in names:
                prof = cProfile.Profile()
                call(name, prof)
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
                profiles[name] = buf.getvalue()

    errors = [s["error"] for ss in samples.values() for s in ss if s["error"]]
    within = {"stamped": [], "first_bare": [], "later_bare": []}
    gpu_within = {"stamped": [], "first_bare": [], "later_bare": []}
    for s in samples[sampled]:
        for part, xs in within_call(s["step_us"], s["layer_steps"], every).items():
            within[part].extend(xs)
        for part, xs in within_call(s["gpu_step_us"], s["layer_steps"], every).items():
            gpu_within[part].extend(xs)

    def bare_after_bare(s: dict) -> list[float]:
        stamped = set(s["layer_steps"])
        return [x for k, x in enumerate(s["step_us"]) if k not in stamped and k - 1 not in stamped]

    # across calls, paired per repetition: a step of each method against the sampled call's bare-after-bare steps
    across = {}
    for name in names:
        diffs = [statistics.median(s["step_us"]) - statistics.median(bare_after_bare(t))
                 for s, t in zip(samples[name], samples[sampled])]
        across[name] = _ci_row(diffs)
    return {"every": every, "new_tokens": new_tokens, "reps": reps, "errors": errors,
            "compiled_decode": all(s["compiled_decode"] for ss in samples.values() for s in ss),
            "host_step_median_us": {n: statistics.median(x for s in ss for x in s["step_us"]) for n, ss in samples.items()},
            "gpu_step_median_us": {n: statistics.median(x for s in ss for x in s["gpu_step_us"]) for n, ss in samples.items()},
            "within_call_host_us": {p: _ci_row(xs) for p, xs in within.items()},
            "within_call_gpu_us": {p: _ci_row(xs) for p, xs in gpu_within.items()},
            "step_median_minus_sampled_bare_after_bare_us": across,
            "profiles": profiles,
            "samples": {n: [{"step_us": s["step_us"], "gpu_step_us": s["gpu_step_us"]} for s in ss]
                        for n, ss in samples.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny Llama on the CPU (smoke run; CPU figures)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--every", type=int, default=4, help="layer_every of the sampled call (at least 3)")
    ap.add_argument("--config", default="llama_b1", choices=["llama_b1", "llava_b1"])
    ap.add_argument("--profile", action="store_true", help="one cProfile'd call of each method")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.every < 3:
        ap.error("--every must be at least 3 (a period needs a bare step that follows a bare step)")

    import torch

    import models
    from stagetrace.testing import tiny

    cuda = torch.cuda.is_available() and not args.cpu_tiny
    family = args.config.split("_b")[0]
    if cuda:
        case = models.llava_realistic(batch=1) if family == "llava" else models.llama_realistic(batch=1)
    else:
        case = tiny.build(family, batch=1)
    case.model.eval()
    payload: dict[str, Any] = {
        "benchmark": "compiled_switch", "env": environment(), "device": "cuda" if cuda else "cpu",
        "config": args.config, "params": {k: v for k, v in vars(args).items() if k != "out"},
        "results": run(case, cuda, args.reps, args.warmup, args.new_tokens, args.every, args.profile)}
    path = save("compiled_switch" if cuda else "compiled_switch-cpu-tiny", payload, args.out)
    r = payload["results"]
    print(f"{args.config}, layer_every={r['every']}, {r['reps']} reps, compiled decode {r['compiled_decode']}, "
          f"errors {len(r['errors'])}")
    print("median step µs, host | GPU: " + ", ".join(
        f"{n} {r['host_step_median_us'][n]:.1f} | {r['gpu_step_median_us'][n]:.1f}" for n in r["host_step_median_us"]))
    rows = [[part, "{:+.1f} [{:+.1f}, {:+.1f}]".format(h["median"], *h["ci95"]),
             "{:+.1f} [{:+.1f}, {:+.1f}]".format(g["median"], *g["ci95"]), h["n"]]
            for (part, h), g in zip(r["within_call_host_us"].items(), r["within_call_gpu_us"].values())]
    print("within a call, minus the period's last bare step (µs):")
    print(table(rows, ["step", "host", "GPU", "n"]))
    print("a call's median step minus the sampled call's bare-after-bare steps, paired per rep (µs):")
    print(table([[n, "{:+.1f} [{:+.1f}, {:+.1f}]".format(v["median"], *v["ci95"])]
                 for n, v in r["step_median_minus_sampled_bare_after_bare_us"].items()], ["method", "host"]))
    for n, text in r["profiles"].items():
        print(f"\n--- cProfile, one call of {n} (by own time) ---\n{text}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
