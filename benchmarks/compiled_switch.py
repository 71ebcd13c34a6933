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
step against the sampled call's bare-after-bare steps. ``--profile`` adds cProfile of the
compiled call of steps N, 2N, … of each method: host functions by own time (where the sampled
call's stamped step spends what the same step of an every-step call does not).

Each step's host time is also split: the time inside the compiled call (dynamo's guards and
cache lookup, the graph's wrapper, CUDA-graph trees' replay); of that, the time before the compiled
graph is entered (dynamo: ``graph_entry_clock`` times each ``__compiled_fn_*`` global as it is
called) and, within it, until dynamo's cache lookup returned (its guard checks, off torch's
``set_guard_complete_hook``; the rest is the chosen entry's bytecode reading the graph's inputs off
the frame); and inside the CUDA-graph tree manager's ``run`` (on CUDA). The rest of a step is
generate()'s loop and the tracer's marks. So a step that costs more than another says where:
dynamo's lookup, the entry's bytecode, the tree, or outside.
"""
from __future__ import annotations

import argparse
import contextlib
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


def step_kinds(n_steps: int, layer_steps: list[int]) -> list[str]:
    """Each decode step's kind: ``stamped``, ``first_bare`` (right after a stamped step: the
    switch back), ``last_bare`` (right before one: its host interval holds the switch in),
    ``bare`` (the others); step 0 is ``first`` (the hooks come off there)."""
    stamped = set(layer_steps)
    kinds = []
    for k in range(n_steps):
        kinds.append("first" if k == 0 else "stamped" if k in stamped else "first_bare" if k - 1 in stamped
                     else "last_bare" if k + 1 in stamped else "bare")
    return kinds


def guards_us(calls_in_ns: list[int], graph_in: list[tuple[str, int]],
              event: str | None = None) -> list[float | None]:
    """Per compiled call: host µs from its entry to the first clocked event inside it — its first
    graph's entry (``event`` None: dynamo's lookup and the chosen entry's bytecode) or the named
    one ("lookup": dynamo's cache lookup alone); None where none came (a graph compiled after the
    clock was set, a torch without the lookup hook)."""
    out: list[float | None] = []
    ends = calls_in_ns[1:] + [None]
    for t0, t1 in zip(calls_in_ns, ends):
        inside = [t for name, t in graph_in if t >= t0 and (t1 is None or t < t1)
                  and (name == event if event else name.startswith("__compiled_fn"))]
        out.append((inside[0] - t0) / 1e3 if inside else None)
    return out


def split_by_kind(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Median host µs per step kind: the whole step, inside the compiled call, of that before its
    graph was entered (dynamo's cache lookup and the chosen entry's bytecode) and before the
    lookup ended (guard checks), inside the CUDA-graph tree's runs (None where no tree ran); and the median number of tree runs per
    step (more than one: the compiled call is split into several graphs)."""
    parts: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        kinds = step_kinds(len(s["compiled_us"]), s["layer_steps"])
        for k, kind in enumerate(kinds):
            d = parts.setdefault(kind, {"step": [], "compiled": [], "guards": [], "lookup": [], "tree": [],
                                        "tree_runs": []})
            if k < len(s["step_us"]):
                d["step"].append(s["step_us"][k])
            d["compiled"].append(s["compiled_us"][k])
            for part in ("guards", "lookup"):
                xs = s.get(f"{part}_us", [])
                if k < len(xs) and xs[k] is not None:
                    d[part].append(xs[k])
            if s["tree_runs"][k]:
                d["tree"].append(s["tree_us"][k])
            d["tree_runs"].append(s["tree_runs"][k])
    return {kind: {p: (statistics.median(xs) if xs else None) for p, xs in d.items()} for kind, d in parts.items()}


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


def compiled_graph_entries() -> dict[str, dict[str, Any]]:
    """The graphs dynamo has compiled so far, as the globals their transformed frames call them by
    (``__compiled_fn_*``, in the module of the frame that was compiled): name -> that module's dict."""
    found = {}
    for mod in list(sys.modules.values()):
        g = getattr(mod, "__dict__", None)
        if isinstance(g, dict):
            for name in [n for n in g if isinstance(n, str) and n.startswith("__compiled_fn")]:
                found[name] = g
    return found


@contextlib.contextmanager
def graph_entry_clock(entries_ns: list[tuple[str, int]]) -> Any:
    """While open, each compiled graph records (its name, the host clock) as it is entered, and
    dynamo's cache lookup ("lookup", the host clock) as its guards pass (``set_guard_complete_hook``,
    where this torch has it). From a compiled call's entry to the lookup's end is dynamo's lookup
    (guard checks of every entry tried); from there to the graph's entry the chosen entry's own
    bytecode (reading the graph's inputs off the frame); the rest the graph's wrappers and replay.
    The graph timer is a frame dynamo skips."""
    import torch
    from torch._dynamo.eval_frame import skip_code

    found = compiled_graph_entries()
    saved = {name: g[name] for name, g in found.items()}

    def clocked(name: str, fn: Any) -> Any:
        def graph_entry(*args: Any, **kwargs: Any) -> Any:
            entries_ns.append((name, time.perf_counter_ns()))
            return fn(*args, **kwargs)

        skip_code(graph_entry.__code__)
        return graph_entry

    def lookup_done(cache_hit: bool) -> bool:
        entries_ns.append(("lookup" if cache_hit else "lookup_miss", time.perf_counter_ns()))
        return cache_hit  # what dynamo does with the lookup: False would force a compile

    for name, g in found.items():
        g[name] = clocked(name, g[name])
    set_hook = getattr(torch._C._dynamo.eval_frame, "set_guard_complete_hook", None)
    previous = set_hook(lookup_done) if set_hook is not None else None
    try:
        yield sorted(found)
    finally:
        if set_hook is not None:
            set_hook(previous)
        for name, g in found.items():
            g[name] = saved[name]


def run(case: Any, cuda: bool, reps: int, warmup: int, new_tokens: int, every: int, profile: bool,
        mark_step: bool = False, touch_layer_dicts: bool = False, warm_guards: bool = False) -> dict[str, Any]:
    import torch

    import stagetrace
    from stagetrace.tracing import compiled_decode

    model = case.model
    kw = compiled_decode_kwargs(case, cuda, new_tokens)

    entries_ns: list[int] = []  # host clock at each prepare_inputs_for_generation: [prefill, step 0, 1, ...]
    compiled_ns: list[int] = []  # host time inside each call of the compiled forward (the decode steps)
    compiled_in_ns: list[int] = []  # host clock as each call of the compiled forward begins
    graph_in: list[tuple[str, int]] = []  # (graph, host clock) as a compiled graph is entered (graph_entry_clock)
    tree_ns: list[int] = []  # of that, inside the CUDA-graph tree manager's run (CUDA only), per replay
    trees_per_call: list[tuple[int, int]] = []  # per compiled call: (tree runs, host ns inside them)
    inner = type(model).prepare_inputs_for_generation
    layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)][0] if touch_layer_dicts else []

    def timed_compiled_call(inner_compiled_call: Any) -> Any:
        """The model's get_compiled_call as the traced model has it (the tracer may route stamped
        steps to a compiled call of its own), each call it returns timed."""
        @functools.wraps(inner_compiled_call)
        def get_compiled_call(*args: Any, **kwargs: Any) -> Any:
            return timed(inner_compiled_call(*args, **kwargs))

        return get_compiled_call

    step_profiler: list[cProfile.Profile] = []  # while set: profile the compiled call of steps every, 2·every, …

    def timed(fn: Any) -> Any:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            before = len(tree_ns)
            k = len(compiled_ns)
            prof = step_profiler[0] if step_profiler and k and k % every == 0 else None
            t0 = time.perf_counter_ns()
            compiled_in_ns.append(t0)
            if prof is not None:
                prof.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                if prof is not None:
                    prof.disable()
                compiled_ns.append(time.perf_counter_ns() - t0)
                trees_per_call.append((len(tree_ns) - before, sum(tree_ns[before:])))

        return timed_call

    tree_patch: Any = contextlib.nullcontext()
    if cuda:
        from torch._inductor import cudagraph_trees

        # _run, not run: the compiled graph holds a partial of the manager's bound run, made at
        # compile time; run calls self._run, looked up on the class at each call
        tree_run = cudagraph_trees.CUDAGraphTreeManager._run

        def timed_tree_run(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return tree_run(self, *args, **kwargs)
            finally:
                tree_ns.append(time.perf_counter_ns() - t0)

        tree_patch = mock.patch.object(cudagraph_trees.CUDAGraphTreeManager, "_run", timed_tree_run)

    @functools.wraps(inner)
    def clocked(*args: Any, **kwargs: Any) -> Any:
        entries_ns.append(time.perf_counter_ns())
        if mark_step and cuda:
            torch.compiler.cudagraph_mark_step_begin()
        if touch_layer_dicts:
            for layer in layers:  # a new dict version, the same contents
                d = layer.__dict__
                d["_stagetrace_touch"] = None
                del d["_stagetrace_touch"]
        return inner(*args, **kwargs)

    # plain: the compiled call untraced; plain_hooks_touched: the same with a module hook registered
    # and removed on the model before each call (what a tracer's module hooks do between its calls:
    # the model's hook dicts get new versions) — whether that alone makes a call's first step dear
    tracers: dict[str, Any] = {"plain": None, "plain_hooks_touched": None,
               "stage_level": stagetrace.trace(model, keep_marks=False),
               f"layers_every{every}": stagetrace.trace(model, layer_detail="all", layer_every=every, keep_marks=False),
               "layers_every1": stagetrace.trace(model, layer_detail="all", keep_marks=False)}
    sampled = f"layers_every{every}"
    if warm_guards:  # the sampled call again, each switch made at the stop check before it, its guards checked there
        tracers[f"{sampled}_warm"] = stagetrace.trace(model, layer_detail="all", layer_every=every, keep_marks=False)
    warm_counts = {"warmed": 0, "passed": 0, "off": False}

    def call(name: str) -> dict[str, Any]:
        tr = tracers[name]
        entries_ns.clear()
        compiled_ns.clear()
        compiled_in_ns.clear()
        graph_in.clear()
        tree_ns.clear()
        trees_per_call.clear()
        if name == "plain_hooks_touched":
            model.register_forward_pre_hook(lambda module, args: None).remove()
        gc.disable()
        try:
            with mock.patch.object(compiled_decode, "WARM_GUARDS", name.endswith("_warm")), \
                    tr or contextlib.nullcontext(), mock.patch.object(model, "get_compiled_call",
                                                                   timed_compiled_call(model.get_compiled_call)):
                if cuda:
                    torch.cuda.synchronize()
                t_in = time.perf_counter_ns()
                model.generate(**kw)
                t_out = time.perf_counter_ns()
        finally:
            gc.enable()
        e = entries_ns
        # decode step k's host time: from its prepare_inputs to the next one (the last step has no next)
        step_us = [(b - a) / 1e3 for a, b in zip(e[1:], e[2:])]
        # the call's host time before its first decode step (set-up, prefill) and after its last step began
        row = {"step_us": step_us, "head_us": (e[1] - t_in) / 1e3, "tail_us": (t_out - e[-1]) / 1e3,
               "compiled_us": [x / 1e3 for x in compiled_ns], "guards_us": guards_us(compiled_in_ns, graph_in),
               "lookup_us": guards_us(compiled_in_ns, graph_in, "lookup"),
               "tree_us": [ns / 1e3 for _, ns in trees_per_call], "tree_runs": [n for n, _ in trees_per_call],
               "gpu_step_us": [], "layer_steps": [], "error": None, "compiled_decode": len(compiled_ns) > 0}
        if name.endswith("_warm"):
            warmer = tr._decode.warmer
            warm_counts.update(warmed=warm_counts["warmed"] + warmer.warmed, passed=warm_counts["passed"] + warmer.passed,
                               off=warm_counts["off"] or warmer.off)
            warmer.warmed = warmer.passed = 0
        if tr is not None:
            rec = tr.records[-1]
            tr.clear()
            row.update(gpu_step_us=[1e3 * x for x in rec.decode_step_ms], layer_steps=list(rec.layer_steps or []),
                       error=rec.error, compiled_decode=rec.compiled_decode)
        return row

    with mock.patch.object(type(model), "prepare_inputs_for_generation", clocked), tree_patch, \
            contextlib.ExitStack() as clock_graphs:
        for _ in range(warmup):
            for name in tracers:
                call(name)
        graphs = clock_graphs.enter_context(graph_entry_clock(graph_in))  # every graph is compiled by now
        samples: dict[str, list[dict]] = {name: [] for name in tracers}
        names = list(tracers)
        for rep in range(reps):
            gc.collect()
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                samples[name].append(call(name))
        profiles: dict[str, str] = {}
        if profile:  # the compiled call of steps every, 2·every, … (stamped in the sampled call), 3 calls each
            for name in names:
                step_profiler[:] = [cProfile.Profile()]
                for _ in range(3):
                    call(name)
                buf = io.StringIO()
                pstats.Stats(step_profiler[0], stream=buf).sort_stats("tottime").print_stats(30)
                profiles[name] = buf.getvalue()
                step_profiler.clear()

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
    # the host's time before the first decode step and after the last began, paired per repetition with plain
    head_tail = {name: {part: _ci_row([s[part] - p[part] for s, p in zip(samples[name], samples["plain"])])
                        for part in ("head_us", "tail_us")} for name in names}
    return {"every": every, "new_tokens": new_tokens, "reps": reps, "errors": errors,
            "head_tail_minus_plain_us": head_tail,
            "compiled_decode": all(s["compiled_decode"] for ss in samples.values() for s in ss),
            "host_step_median_us": {n: statistics.median(x for s in ss for x in s["step_us"]) for n, ss in samples.items()},
            "gpu_step_median_us": {n: statistics.median(x for s in ss for x in s["gpu_step_us"]) for n, ss in samples.items()
                                   if tracers[n] is not None},
            "within_call_host_us": {p: _ci_row(xs) for p, xs in within.items()},
            "within_call_gpu_us": {p: _ci_row(xs) for p, xs in gpu_within.items()},
            "step_median_minus_sampled_bare_after_bare_us": across,
            "host_split_median_us": {n: split_by_kind(ss) for n, ss in samples.items()},
            "cudagraph_trees": _tree_facts() if cuda else None, "graphs_clocked": graphs,
            "warm_guards": warm_counts if warm_guards else None,
            "profiles": profiles,
            "samples": {n: [{"step_us": s["step_us"], "gpu_step_us": s["gpu_step_us"]} for s in ss]
                        for n, ss in samples.items()}}


def _tree_facts() -> dict[str, Any]:
    """How many CUDA graphs the tree holds and how often it re-recorded: more nodes than the
    compiled graphs in use means the tree keeps paths per switch pattern."""
    import torch
    from torch._inductor import cudagraph_trees

    try:
        mgr = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
    except Exception as exc:  # a private API: say so, do not fail the run
        return {"error": repr(exc)}
    if mgr is None:
        return {"tree": None}
    nodes, todo = 0, [n for ns in mgr.roots.values() for n in ns]
    while todo:
        node = todo.pop()
        nodes += 1
        todo.extend(c for cs in node.children.values() for c in cs)
    return {"roots": sum(len(v) for v in mgr.roots.values()), "nodes": nodes,
            "recordings": getattr(mgr, "debug_fail_counter", None),
            "inductor": dict(torch._dynamo.utils.counters.get("inductor", {})),
            "graph_breaks": dict(torch._dynamo.utils.counters.get("graph_break", {})),
            "dynamo_stats": dict(torch._dynamo.utils.counters.get("stats", {}))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny Llama on the CPU (smoke run; CPU figures)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--every", type=int, default=4, help="layer_every of the sampled call (at least 3)")
    ap.add_argument("--config", default="llama_b1", choices=["llama_b1", "llava_b1"])
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the compiled call of decode steps every, 2·every, … (the sampled call's stamped "
                         "steps; the same steps of the other methods), over 3 calls of each method")
    ap.add_argument("--mark-step", action="store_true",
                    help="call torch.compiler.cudagraph_mark_step_begin() before every step, every method alike "
                         "(each step then starts a new CUDA-graph tree generation)")
    ap.add_argument("--touch-layer-dicts", action="store_true",
                    help="before every step, every method alike, give each decoder layer's __dict__ a new version "
                         "with the same contents (does a step pay for the layer dicts the stamp switch writes?)")
    ap.add_argument("--dynamo-config", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._dynamo.config.KEY (a probe: e.g. skip_tensor_guards_with_matching_dict_tags=0)")
    ap.add_argument("--warm-guards", action="store_true",
                    help="also the sampled call with compiled_decode.WARM_GUARDS on (guard_warm.py; the default "
                         "since session 14): each switch of graph made at the stop check before its step, the next "
                         "graph's guards checked there. The layers_everyN rows always run with it off")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.every < 3:
        ap.error("--every must be at least 3 (a period needs a bare step that follows a bare step)")

    import torch

    import models
    from stagetrace.testing import tiny

    for item in args.dynamo_config:
        key, _, value = item.partition("=")
        current = getattr(torch._dynamo.config, key)  # an unknown key fails here, by name
        setattr(torch._dynamo.config, key, type(current)(int(value)) if isinstance(current, bool) else type(current)(value))
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
        "results": run(case, cuda, args.reps, args.warmup, args.new_tokens, args.every, args.profile,
                       args.mark_step, args.touch_layer_dicts, args.warm_guards)}
    path = save(("compiled_switch" if cuda else "compiled_switch-cpu-tiny") + ("-markstep" if args.mark_step else "")
                + ("-touch" if args.touch_layer_dicts else "")
                + "".join(f"-{item.partition('=')[0]}" for item in args.dynamo_config),
                payload, args.out)
    r = payload["results"]
    print(f"{args.config}, layer_every={r['every']}, {r['reps']} reps, compiled decode {r['compiled_decode']}, "
          f"errors {len(r['errors'])}")
    print("median step µs, host | GPU: " + ", ".join(
        f"{n} {r['host_step_median_us'][n]:.1f} | {r['gpu_step_median_us'].get(n, float('nan')):.1f}"
        for n in r["host_step_median_us"]))
    rows = [[part, "{:+.1f} [{:+.1f}, {:+.1f}]".format(h["median"], *h["ci95"]),
             "{:+.1f} [{:+.1f}, {:+.1f}]".format(g["median"], *g["ci95"]), h["n"]]
            for (part, h), g in zip(r["within_call_host_us"].items(), r["within_call_gpu_us"].values())]
    print("within a call, minus the period's last bare step (µs):")
    print(table(rows, ["step", "host", "GPU", "n"]))
    print("a call's median step minus the sampled call's bare-after-bare steps, paired per rep (µs):")
    print(table([[n, "{:+.1f} [{:+.1f}, {:+.1f}]".format(v["median"], *v["ci95"])]
                 for n, v in r["step_median_minus_sampled_bare_after_bare_us"].items()], ["method", "host"]))
    print("host µs per step kind (median): step | inside the compiled call | of it before the graph (dynamo) | "
          "of that, the cache lookup (guard checks) | inside the CUDA-graph tree | tree runs")
    for n, kinds in r["host_split_median_us"].items():
        print(f"  {n}: " + "; ".join(f"{k} " + " | ".join("-" if v is None else f"{v:.0f}" for v in d.values())
                                    for k, d in kinds.items()))
    print("the call's host time before its first decode step | after its last step began, minus plain, paired (µs): "
          + "; ".join(f"{n} " + " | ".join("{:+.1f} [{:+.1f}, {:+.1f}]".format(v[p]["median"], *v[p]["ci95"])
                                           for p in ("head_us", "tail_us"))
                      for n, v in r["head_tail_minus_plain_us"].items()))
    print("CUDA-graph trees:", r["cudagraph_trees"])
    if r["warm_guards"] is not None:
        print("guard warming (calls with it on, all together):", r["warm_guards"])
    for n, text in r["profiles"].items():
        print(f"\n--- cProfile of {n}'s compiled call at steps every, 2·every, … (by own time) ---\n{text}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
