"""What a mark costs inside a real generate(), timed around the native call itself, and
whether the dearest marks add their cost to the call or only take it from the next CUDA call.

  python benchmarks/direct_cost.py              # GPU: realistic LLaVA b1, 16 new tokens, pinned to one core
  python benchmarks/direct_cost.py --cpu-tiny   # CPU smoke run (host timeline; labelled CPU)

Part 1, direct: the tracer runs with a timeline whose ``mark()`` times the native call
(``perf_counter_ns`` right before and after it, nothing else between); per mark kind the
count and the median, p10 and p90 µs, at stage level and with every layer marked, beside
the same native call in a tight loop (``bench_event_record_ns``) and the timer's own cost.
Multiplied by the marks per call, this is the direct in-context cost of tracing a call.

Part 2, after the sync: eager generate() syncs once per step (it reads whether every
sequence has finished) and then starts the next forward; the forward-begin mark is the
first CUDA call after that sync. A timing pre-hook on the model (it fires before the
tracer's) and a post-hook time each decode forward on the host, interleaved call by call:

  plain              no tracer
  stage              stagetrace at stage level (the forward-begin mark inside the timed span)
  probe_marks        no tracer; a pre-hook records two native marks, each timed
  probe_launch       no tracer; a pre-hook launches one tiny kernel, timed
  probe_mark_launch  no tracer; a pre-hook records a native mark, then launches the kernel
  layers             stagetrace with every layer marked: what 44 layer marks add to a decode forward
  layers_host_clock  the same hooks, wrappers and native calls to the host clock (no CUDA event):
                     layers - layers_host_clock is what recording the events adds, the rest is Python

``stage - plain`` is what the forward-begin mark adds to a step's host time (noisy: a step
is milliseconds of host work). The probes answer it directly: if the first of two marks is
dear and the second cheap, the first CUDA call there is dear; if a lone kernel launch there
costs what the mark plus the launch after it cost, the mark only takes that cost from the
forward's first kernel launch instead of adding it.

Part 4, inside one call: with ``layer_every=2`` a step with layer marks is followed by one
without; their difference, paired step by step, is what the marks (and switching their
wrappers in) add to a step — by CUDA events (pair and shared marks), by the host clock, and
with the layer marks dropped in Python (the wrappers and their switching alone). With
``layer_every=4``, whether a marked step leaves a cost on the steps after it: the step right
after it against the third after it.

Part 5, after the call: where ``resolve_ms`` (the host time from generate()'s return to the
traced call's) goes — the sync and the native resolve (``Marks.from_timeline``), the record
(``build_record``), and the same build run once more right after it on the same marks: what
the record costs with warm caches, against what it costs coming after the model's own work.

Part 3, outside generate() (GPU only): a tiny kernel, a sync through ``.item()`` as
generate() does, then either [mark, kernel launch] or [kernel launch], each call timed,
interleaved: the first CUDA call after a sync costs the same whether it is our mark or a
kernel launch, and a launch right after our mark costs what a launch costs unsynced.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import TimedTimeline, bootstrap_median_ci, environment, pin_cpu, quantile, save, table  # noqa: E402


def _stats_us(ns: list[int]) -> dict[str, float]:
    us = [x / 1e3 for x in ns]
    return {"n": len(us), "median_us": statistics.median(us), "p10_us": quantile(us, 0.1),
            "p90_us": quantile(us, 0.9), "mean_us": statistics.fmean(us)}


def _timer_floor_ns(n: int = 20000) -> float:
    now = time.perf_counter_ns
    xs = []
    for _ in range(n):
        t0 = now()
        t1 = now()
        xs.append(t1 - t0)
    return statistics.median(xs)


def direct(model: Any, kw: dict[str, Any], cuda: bool, reps: int, layer_detail: str) -> dict[str, Any]:
    """Part 1: every native mark of real traced calls, timed around the call itself."""
    import stagetrace
    from stagetrace.labels import Kind, kind_of
    from stagetrace.low_level import new_timeline

    timed = TimedTimeline(new_timeline("cuda" if cuda else "cpu", capacity=1 << 15))
    with stagetrace.trace(model, layer_detail=layer_detail, timeline=timed, keep_marks=False) as tracer:
        model.generate(**kw)  # warm-up
        timed.cost_ns.clear()
        timed.labels.clear()
        for _ in range(reps):
            model.generate(**kw)
    errors = [r.error for r in tracer.records if r.error]
    by_kind: dict[str, list[int]] = {}
    for lab, ns in zip(timed.labels, timed.cost_ns):
        by_kind.setdefault(Kind(kind_of(lab)).name, []).append(ns)
    per_call_us = sum(timed.cost_ns) / 1e3 / reps
    return {"layer_detail": layer_detail, "calls": reps, "errors": errors,
            "marks_per_call": len(timed.cost_ns) / reps, "direct_cost_per_call_us": per_call_us,
            "all": _stats_us(timed.cost_ns), "by_kind": {k: _stats_us(v) for k, v in sorted(by_kind.items())}}


def after_sync(model: Any, kw: dict[str, Any], cuda: bool, reps: int) -> dict[str, Any]:
    """Part 2: each decode forward's host time, plain vs stage level vs a two-mark probe."""
    import stagetrace
    from stagetrace.low_level import new_timeline

    now = time.perf_counter_ns
    state = {"t": 0, "forwards": 0, "on": False}
    forward_ns: list[int] = []

    def pre(module: Any, args: Any, kwargs: Any) -> None:
        state["t"] = now()

    def post(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        t = now()
        if state["on"]:
            state["forwards"] += 1
            if state["forwards"] > 1:  # decode forwards only: the first is the prefill
                forward_ns.append(t - state["t"])

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    import torch

    probe_tl = new_timeline("cuda" if cuda else "cpu", capacity=1 << 12)
    if cuda:
        probe_tl.bind_stream(torch.cuda.current_stream().cuda_stream)
    scratch = torch.ones(16, device="cuda" if cuda else "cpu")
    probe_ns: dict[str, list[int]] = {k: [] for k in ("first_mark", "second_mark", "launch_alone",
                                                      "mark_before_launch", "launch_after_mark")}

    def probe(what: str) -> Any:
        """A pre-hook on decode forwards: where the tracer's forward-begin mark would go."""
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            if not (state["on"] and state["forwards"] >= 1):
                return
            t0 = now()
            if what == "launch":
                scratch.mul_(1.0)  # a kernel launch: the forward's own first CUDA call stands in
                probe_ns["launch_alone"].append(now() - t0)
                return
            probe_tl.mark(1)
            t1 = now()
            if what == "marks":
                probe_tl.mark(2)
                probe_ns["first_mark"].append(t1 - t0)
                probe_ns["second_mark"].append(now() - t1)
            else:
                scratch.mul_(1.0)
                probe_ns["mark_before_launch"].append(t1 - t0)
                probe_ns["launch_after_mark"].append(now() - t1)
        return hook

    from stagetrace.testing.reference import HostClockTimeline

    tracers = {"stage": stagetrace.trace(model, keep_marks=False),
               "layers": stagetrace.trace(model, layer_detail="all", keep_marks=False),
               "layers_host_clock": stagetrace.trace(model, layer_detail="all", keep_marks=False,
                                                     timeline=HostClockTimeline())}
    variants = ["plain", "stage", "probe_marks", "probe_launch", "probe_mark_launch", "layers", "layers_host_clock"]
    step_ns: dict[str, list[list[int]]] = {v: [] for v in variants}
    try:
        for rep in range(reps + 1):
            if rep == 1:  # the first round warms up
                for xs in probe_ns.values():
                    xs.clear()
            for v in variants[rep % len(variants):] + variants[: rep % len(variants)]:
                probe_handle = (model.register_forward_pre_hook(probe(v[len("probe_"):]), with_kwargs=True)
                                if v.startswith("probe_") else None)
                tracer = tracers.get(v)
                if tracer is not None:
                    tracer.start()
                probe_tl.reset()
                forward_ns.clear()
                state.update(forwards=0, on=True)
                try:
                    model.generate(**kw)
                finally:
                    state["on"] = False
                    if tracer is not None:
                        tracer.stop()
                        tracer.clear()
                    if probe_handle is not None:
                        probe_handle.remove()
                if rep:  # the first round warms up
                    step_ns[v].append(list(forward_ns))
    finally:
        for h in handles:
            h.remove()
    med = {v: [statistics.median(c) for c in calls] for v, calls in step_ns.items()}  # per call: median step
    out: dict[str, Any] = {"calls_each": reps,
                           "decode_forward_host_us": {v: _stats_us([x for c in calls for x in c])
                                                      for v, calls in step_ns.items()}}
    pairs = [(v, "plain") for v in variants[1:]] + [("layers", "stage"), ("layers", "layers_host_clock"),
                                                     ("layers_host_clock", "stage")]
    for v, base in pairs:  # per call, the median forward of one against the other's, same round
        paired = [(a - b) / 1e3 for a, b in zip(med[v], med[base])]
        lo, hi = bootstrap_median_ci(paired)
        out[f"{v}_minus_{base}_us"] = {"median": statistics.median(paired), "ci95": [lo, hi]}
    out["probe"] = {k: _stats_us(v) for k, v in probe_ns.items()}
    return out


def within_call(model: Any, kw: dict[str, Any], calls: int) -> dict[str, Any]:
    """Part 4: inside one call, a decode step that carries layer marks against the step right
    after it, which carries none (``layer_every=2``: the wrappers are switched in for the one
    and out for the other): what layer marks add to a step, paired step by step, so the drift
    between calls that whole-call figures fight does not enter. By CUDA events and by the host
    clock (the same wrappers and native calls, no event); step times are the record's own."""
    import stagetrace
    from stagetrace.testing.reference import HostClockTimeline

    from stagetrace.labels import Kind

    class LayerMarksDropped(HostClockTimeline):
        """Layer marks go to a Python no-op (the wrappers and their switching remain)."""

        def __init__(self) -> None:
            super().__init__()
            native, layer_kinds = self._native.mark, (int(Kind.LAYER_BEGIN), int(Kind.LAYER_END))
            self.mark = lambda lab: None if (lab & 0xFF) in layer_kinds else native(lab)

    out: dict[str, Any] = {"calls_each": calls, "layers": len(stagetrace.trace(model).layout.layers)}
    ways = (("events", None, "pair"), ("events_shared", None, "shared"), ("host_clock", HostClockTimeline, "pair"),
            ("no_layer_marks", LayerMarksDropped, "pair"))
    for name, timeline, layer_marks in ways:
        tracer = stagetrace.trace(model, layer_detail="all", layer_every=2, keep_marks=False, layer_marks=layer_marks,
                                  timeline=timeline() if timeline else None)
        diffs: list[float] = []
        with tracer:
            for _ in range(calls + 1):
                model.generate(**kw)
        for rec in tracer.records[1:]:  # the first call warms up
            steps = rec.decode_step_ms
            marked = {k for k in range(len(steps)) if k % 2 == 0}  # layer_every=2's steps (the wrappers' too)
            if rec.layer_steps and set(rec.layer_steps) != marked:
                raise RuntimeError(f"layer spans on steps {rec.layer_steps}, not every other one")
            diffs += [(steps[k] - steps[k + 1]) * 1e3 for k in range(len(steps) - 1)
                      if k in marked and k + 1 not in marked]
        lo, hi = bootstrap_median_ci(diffs)
        out[name] = {"pairs": len(diffs), "marked_minus_next_step_us": statistics.median(diffs), "ci95": [lo, hi]}
    # Does a marked step leave a cost on the steps after it (caches, the wrappers switched out)?
    # layer_every=4: the step right after a marked one against the third after it (the one
    # before the next marked step), and the marked step against that third step.
    tracer = stagetrace.trace(model, layer_detail="all", layer_every=4, keep_marks=False)
    with tracer:
        for _ in range(calls + 1):
            model.generate(**kw)
    after: list[float] = []
    marked_vs_clean: list[float] = []
    for rec in tracer.records[1:]:
        steps = rec.decode_step_ms
        for k in range(0, len(steps) - 3, 4):
            after.append((steps[k + 1] - steps[k + 3]) * 1e3)
            marked_vs_clean.append((steps[k] - steps[k + 3]) * 1e3)
    for key, xs in (("after_marked_minus_third_after_us", after), ("marked_minus_third_after_us", marked_vs_clean)):
        lo, hi = bootstrap_median_ci(xs) if len(xs) > 1 else (float("nan"), float("nan"))
        out.setdefault("every4", {})[key] = {"pairs": len(xs), "median": statistics.median(xs) if xs else None,
                                             "ci95": [lo, hi]}
    return out


# part 5's rows, in print order: indented names are parts of the row above them
AFTER_CALL_ROWS = ("resolve_us", "from_timeline_us", "hold_features_us", "resolve_rest_us",
                   "build_after_each_call_us", "build_batched_us", "stage_math_us", "leads_us", "layer_steps_us",
                   "meta_us", "expectations_us", "build_rest_us")


def after_call(model: Any, kw: dict[str, Any], reps: int, layer_detail: str) -> dict[str, Any]:
    """Part 5: what tracing costs after generate() returns, per call (µs).

    Inside the traced call (``resolve_ms``): the one sync and the native resolve
    (``Marks.from_timeline``), the features' host copies (``PendingFeatures.hold``), the rest.
    Outside it, the record built from what the call left (``build_ms``), two ways: read after
    every call (``tracer.records`` right after ``generate()``: the build runs in the call's
    wake, on cold caches; the first ``reps`` calls) and batched (the next ``reps`` calls not
    read until the end: their records built back to back). The parts of a build: the stage math
    (``stages_from_marks``), the leads (``call_leads``), the decode steps with layers
    (``layer_steps``), the metadata with the feature counts (``Tracer._meta``), what the record
    must show (``Tracer._expectations``), the rest (the record's own construction). The tracer's
    own functions are swapped for timed twins for the run, then put back."""
    import types

    import stagetrace
    from stagetrace.tracing import features as features_mod
    from stagetrace.tracing import record as record_mod
    from stagetrace.tracing import tracer as tracer_mod

    parts: dict[str, list[float]] = {k: [] for k in ("from_timeline", "hold_features", "stage_math", "leads",
                                                     "layer_steps", "meta", "expectations")}

    def timed(name: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            out = fn(*args, **kwargs)
            parts[name].append((time.perf_counter_ns() - t0) / 1e3)
            return out
        return run

    real_marks = tracer_mod.Marks
    swaps = [(tracer_mod, "Marks", types.SimpleNamespace(from_timeline=timed("from_timeline", real_marks.from_timeline))),
             (features_mod.PendingFeatures, "hold", timed("hold_features", features_mod.PendingFeatures.hold)),
             (record_mod, "stages_from_marks", timed("stage_math", record_mod.stages_from_marks)),
             (record_mod, "call_leads", timed("leads", record_mod.call_leads)),
             (record_mod, "layer_steps", timed("layer_steps", record_mod.layer_steps)),
             (tracer_mod.Tracer, "_meta", timed("meta", tracer_mod.Tracer._meta)),
             (tracer_mod.Tracer, "_expectations", timed("expectations", tracer_mod.Tracer._expectations))]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in swaps]
    for owner, name, twin in swaps:
        setattr(owner, name, twin)
    skip = 2  # the first calls warm up
    n_each = skip + reps
    try:
        with stagetrace.trace(model, layer_detail=layer_detail, keep_marks=False) as tracer:
            for _ in range(n_each):  # read after every call: built in its wake
                model.generate(**kw)
                tracer.records  # noqa: B018
            for _ in range(reps):  # not read: built back to back below
                model.generate(**kw)
            records = tracer.records
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)
    # every record was built in call order, each build's parts once: index them by call
    build_parts = ("stage_math", "leads", "layer_steps", "meta", "expectations")
    calls = range(skip, len(records))
    inside = [records[i].resolve_ms * 1e3 for i in calls]
    resolve_rest = [records[i].resolve_ms * 1e3 - parts["from_timeline"][i] - parts["hold_features"][i] for i in calls]
    build_rest = [records[i].build_ms * 1e3 - sum(parts[k][i] for k in build_parts) for i in calls]
    out = {"calls": len(inside), "marks_per_call": records[-1].n_marks,
           "resolve_us": _stats_us([int(x * 1e3) for x in inside]),
           "resolve_rest_us": _stats_us([int(x * 1e3) for x in resolve_rest]),
           "build_after_each_call_us": _stats_us([int(records[i].build_ms * 1e6) for i in range(skip, n_each)]),
           "build_batched_us": _stats_us([int(records[i].build_ms * 1e6) for i in range(n_each, len(records))]),
           "build_rest_us": _stats_us([int(x * 1e3) for x in build_rest])}
    for name in ("from_timeline", "hold_features", *build_parts):
        out[f"{name}_us"] = _stats_us([int(parts[name][i] * 1e3) for i in calls])
    return out


def outside_generate(reps: int) -> dict[str, Any]:
    """Part 3: the first CUDA call after a sync, our mark or a kernel launch."""
    import torch

    from stagetrace.low_level import new_timeline

    now = time.perf_counter_ns
    x = torch.ones(16, device="cuda")
    tl = new_timeline("cuda", capacity=4 * reps + 16)
    tl.bind_stream(torch.cuda.current_stream().cuda_stream)
    rows: dict[str, list[int]] = {k: [] for k in ("mark_after_sync", "launch_after_mark", "launch_after_sync",
                                                  "mark_unsynced", "launch_unsynced")}
    for i in range(reps + 20):
        keep = i >= 20
        y = x + 1
        y[0].item()  # a sync through a device-to-host copy, as generate() reads its stop flag
        if i % 2:
            t0 = now()
            tl.mark(1)
            t1 = now()
            z = x * 2
            t2 = now()
            if keep:
                rows["mark_after_sync"].append(t1 - t0)
                rows["launch_after_mark"].append(t2 - t1)
        else:
            t0 = now()
            z = x * 2
            t1 = now()
            if keep:
                rows["launch_after_sync"].append(t1 - t0)
        t0 = now()  # more work queued, no sync: the loop costs
        tl.mark(2)
        t1 = now()
        z = z * 2
        t2 = now()
        if keep:
            rows["mark_unsynced"].append(t1 - t0)
            rows["launch_unsynced"].append(t2 - t1)
    torch.cuda.synchronize()
    return {k: _stats_us(v) for k, v in rows.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=20, help="traced calls per configuration (part 1)")
    ap.add_argument("--sync-reps", type=int, default=60, help="calls per variant (part 2)")
    ap.add_argument("--loop-reps", type=int, default=2000, help="repetitions outside generate() (part 3)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--pin-cpu", default="3", metavar="CORES", help="cores to pin to; 'none' for no pinning")
    ap.add_argument("--parts", default="1,2,3,4,5", help="which parts to run (comma-separated)")
    ap.add_argument("--within-calls", type=int, default=30, help="calls per clock (part 4)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))

    import torch

    import models
    from stagetrace.low_level import _C
    from stagetrace.testing import tiny

    pin_cpu(args.pin_cpu)
    cuda = torch.cuda.is_available() and not args.cpu_tiny
    case = models.llava_realistic(batch=1) if cuda else tiny.build("llava")
    model = case.model.eval()
    kw = dict(case.inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              **case.generate_kwargs)
    env = environment()
    loop_us = _C.bench_event_record_ns(0, 20000, torch.cuda.current_stream().cuda_stream) / 1e3 if cuda else None
    payload: dict[str, Any] = {
        "benchmark": "direct_cost", "env": env, "device": "cuda" if cuda else "cpu",
        "model": "realistic LLaVA b1 (CLIP-L/336 + 22-layer Llama, bf16)" if cuda else "tiny LLaVA (CPU smoke run)",
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "timer_floor_us": _timer_floor_ns() / 1e3, "event_record_in_a_loop_us": loop_us, "results": {}}
    res = payload["results"]
    if "1" in parts:
        res["direct_stage"] = direct(model, kw, cuda, args.reps, "off")
        res["direct_layers"] = direct(model, kw, cuda, args.reps, "all")
    if "2" in parts:
        res["after_sync"] = after_sync(model, kw, cuda, args.sync_reps)
    if cuda and "3" in parts:
        res["outside_generate"] = outside_generate(args.loop_reps)
    if "4" in parts:
        res["within_call"] = within_call(model, kw, args.within_calls)
    if "5" in parts:
        res["after_call_stage"] = after_call(model, kw, args.reps, "off")
        res["after_call_layers"] = after_call(model, kw, args.reps, "all")
    path = save("direct_cost" if cuda else "direct_cost-cpu-tiny", payload, args.out)

    print(f"direct in-context cost on {env['card']} (timer floor {payload['timer_floor_us']:.3f} µs; "
          f"event record in a loop {loop_us if loop_us is None else round(loop_us, 3)} µs)")
    for part in [p for p in ("direct_stage", "direct_layers") if p in res]:
        r = res[part]
        print(f"\n{part}: {r['marks_per_call']:.0f} marks per call, {r['direct_cost_per_call_us']:.1f} µs per call")
        print(table([[k, v["n"], v["median_us"], v["p10_us"], v["p90_us"]] for k, v in r["by_kind"].items()],
                    ["mark kind", "n", "median µs", "p10 µs", "p90 µs"]))
    s = res.get("after_sync")
    if s:
        print("\nafter the sync: each decode forward's host time")
        print(table([[v, d["n"], d["median_us"]] for v, d in s["decode_forward_host_us"].items()],
                    ["variant", "forwards", "median µs"]))
        for key, d in s.items():
            if key.endswith("_us") and isinstance(d, dict) and "ci95" in d:
                print(f"{key[:-3].replace('_minus_', ' - ')}: {d['median']:+.2f} µs per forward "
                      f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]")
        print(table([[k, v["n"], v["median_us"], v["p10_us"], v["p90_us"]] for k, v in s["probe"].items()],
                    ["at the forward's start", "n", "median µs", "p10 µs", "p90 µs"]))
    if "within_call" in res:
        w = res["within_call"]
        print(f"\ninside one call (layer_every=2, {w['layers']} layers): a step with layer marks minus the next step")
        for name in ("events", "events_shared", "host_clock", "no_layer_marks"):
            print(f"  {name}: {w[name]['marked_minus_next_step_us']:+.1f} µs [{w[name]['ci95'][0]:+.1f}, "
                  f"{w[name]['ci95'][1]:+.1f}] over {w[name]['pairs']} pairs")
        for key, d in w["every4"].items():
            if d["median"] is not None:
                print(f"  layer_every=4, {key[:-3].replace('_', ' ')}: {d['median']:+.1f} µs "
                      f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] over {d['pairs']} pairs")
    for part in [p for p in ("after_call_stage", "after_call_layers") if p in res]:
        r = res[part]
        print(f"\n{part}: after generate() returns: in the call (resolve), and the record's build ({r['marks_per_call']} marks, {r['calls']} calls)")
        print(table([[k[:-3], r[k]["median_us"], r[k]["p10_us"], r[k]["p90_us"]]
                     for k in AFTER_CALL_ROWS if k in r],
                    ["part", "median µs", "p10 µs", "p90 µs"]))
    if "outside_generate" in res:
        print("\noutside generate()")
        print(table([[k, v["median_us"], v["p10_us"], v["p90_us"]] for k, v in res["outside_generate"].items()],
                    ["call", "median µs", "p10 µs", "p90 µs"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
