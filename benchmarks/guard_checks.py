"""Sampled layer stamps under compiled decode: what dynamo's guard check of each cache entry costs
when it runs back to back, outside generate() — beside ``compiled_switch.py``, which times the same
lookup inside real calls.

  python benchmarks/guard_checks.py             # GPU: realistic Llama b1
  python benchmarks/guard_checks.py --cpu-tiny  # CPU: a 22-layer tiny Llama, dynamo's eager backend

Why: a sampled call's stamped step spends 170–250 µs more than a bare step in dynamo's cache lookup
(``compiled_switch.py``'s split), more the longer since its graph last ran. Here the two entries
of the compiled decode step (bare and stamped) are checked directly, with the frame's own inputs as
a decode step passes them, in a loop: each entry staying in use (an every-step call, a bare step
after a bare one), and right after the tracer switched the layers' forwards (the entry that no
longer matches fails, the other one is checked for the first time since the switch). If these
warm checks cost about the same, what a real stamped step pays is not the checks' own work but
running them cold, after the steps in between.

With ``--evict-mb`` each entry is also checked right after a walk over a buffer larger than the CPU's
last-level cache: the same check, cold.

This reads dynamo's private structures (``_debug_get_cache_entry_list``, each entry's guard
manager) and the tracer's (``_before_compiled_step``); a probe, not an API.
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
from _env import environment, save, table  # noqa: E402
from compiled import compiled_decode_kwargs  # noqa: E402


def evict_caches(buffer: Any) -> None:
    """Walk a buffer larger than the CPU's last-level cache: what the guard check reads next comes
    from memory, as after a real decode step's host work in between."""
    buffer += 1


def run(case: Any, cuda: bool, reps: int, evict_mb: int = 0) -> dict[str, Any]:
    import torch
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    import stagetrace
    from stagetrace.tracing.guard_warm import frame_locals, frame_of_compiled_call

    model = case.model
    kw = compiled_decode_kwargs(case, cuda, 16)
    tracer = stagetrace.trace(model, layer_detail="all", layer_every=4, keep_marks=False)
    step_inputs: dict[str, Any] = {}
    get_compiled_call = type(model).get_compiled_call

    def capturing(self: Any, *args: Any, **kwargs: Any) -> Any:
        compiled_call = get_compiled_call(self, *args, **kwargs)

        def call(*a: Any, **k: Any) -> Any:
            step_inputs["args"], step_inputs["kwargs"] = a, k  # a decode step's inputs, as passed
            return compiled_call(*a, **k)

        return call

    type(model).get_compiled_call = capturing
    try:
        for _ in range(2):  # both graphs compiled (steps 0, 4, 8, 12 stamped)
            with tracer:
                model.generate(**kw)
            tracer.clear()
    finally:
        type(model).get_compiled_call = get_compiled_call
    frame = frame_of_compiled_call(model)
    if frame is None:
        raise RuntimeError("no function of the model's forward chain holds dynamo cache entries")
    code, free = frame
    entries = _debug_get_cache_entry_list(code)

    def now_locals() -> dict[str, Any]:
        return frame_locals(code, free, model, step_inputs["args"], step_inputs["kwargs"])

    def check_us(entry: Any) -> tuple[bool, float]:
        loc = now_locals()
        t0 = time.perf_counter_ns()
        ok = entry.guard_manager.check(loc)
        return bool(ok), (time.perf_counter_ns() - t0) / 1e3

    res: dict[str, list[float]] = {}
    passes: dict[str, list[bool]] = {}

    def add(key: str, entry: Any) -> None:
        ok, us = check_us(entry)
        res.setdefault(key, []).append(us)
        passes.setdefault(key, []).append(ok)

    tracer.start()
    prev_grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # generate() runs under no_grad: its global state is guarded
    try:
        tracer._stamps.ensure_ring()

        def entry_for(stamped: bool) -> Any:
            tracer._before_compiled_step(stamped)  # the layers' forwards as a (bare/stamped) step has them
            loc = now_locals()
            hits = [e for e in entries if e.guard_manager.check(loc)]
            if len(hits) != 1:
                raise RuntimeError(f"{len(hits)} of {len(entries)} cache entries pass for a "
                                   f"{'stamped' if stamped else 'bare'} step")
            return hits[0]

        bare, stamped = entry_for(False), entry_for(True)
        import numpy as np

        buffer = np.zeros(max(evict_mb, 1) * (1 << 20) // 8)
        gc.collect()
        for _ in range(reps):
            tracer._before_compiled_step(True)
            for _ in range(3):
                add("stamped, stamps staying (every step)", stamped)
            tracer._before_compiled_step(False)
            for _ in range(3):
                add("bare, staying (a bare step after a bare one)", bare)
            tracer._before_compiled_step(True)  # the switch into the stamped graph
            add("switch in: the bare entry fails", bare)
            add("switch in: the stamped entry, first check", stamped)
            add("switch in: the stamped entry, second check", stamped)
            tracer._before_compiled_step(False)  # and out
            add("switch out: the stamped entry fails", stamped)
            add("switch out: the bare entry, first check", bare)
            add("switch out: the bare entry, second check", bare)
            if evict_mb:  # each entry checked again, staying in use, but with the CPU's caches evicted first
                tracer._before_compiled_step(True)
                evict_caches(buffer)
                add("stamped, staying, caches evicted before", stamped)
                tracer._before_compiled_step(False)
                evict_caches(buffer)
                add("bare, staying, caches evicted before", bare)
    finally:
        torch.set_grad_enabled(prev_grad)
        tracer.stop()
    expect_pass = {key: "fails" not in key for key in res}
    wrong = [key for key, ok in passes.items() if any(o != expect_pass[key] for o in ok)]
    return {"entries": len(entries), "frame": f"{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})",
            "check_us": {key: {"median": statistics.median(xs), "n": len(xs)} for key, xs in res.items()},
            "unexpected_results": wrong}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-tiny", action="store_true", help="a 22-layer tiny Llama on the CPU (CPU figures)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--evict-mb", type=int, default=64,
                    help="also check each entry after walking a buffer of this many MiB (more than the CPU's "
                         "last-level cache: the guard check then runs cold); 0: not")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available() and not args.cpu_tiny
    if cuda:
        import models

        case = models.llama_realistic(batch=1)
    else:
        from stagetrace.testing import tiny

        case = tiny.build("llama", batch=1, num_hidden_layers=22)  # as many layers as the realistic one
    case.model.eval()
    payload: dict[str, Any] = {"benchmark": "guard_checks", "env": environment(), "device": "cuda" if cuda else "cpu",
                               "params": {k: v for k, v in vars(args).items() if k != "out"},
                               "results": run(case, cuda, args.reps, args.evict_mb)}
    path = save("guard_checks" if cuda else "guard_checks-cpu-tiny", payload, args.out)
    r = payload["results"]
    print(f"{r['entries']} cache entries on {r['frame']}; unexpected results: {r['unexpected_results'] or 'none'}")
    print(table([[k, v["median"], v["n"]] for k, v in r["check_us"].items()], ["guard check", "median µs", "n"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
