"""What tracing costs compiled decode (static cache, CUDA graphs), and what a GPU-side stamp costs.

  python benchmarks/compiled.py              # GPU: realistic Llama b1 (and LLaVA b1), 32 new tokens
  python benchmarks/compiled.py --cpu-tiny   # CPU smoke run: tiny Llama, dynamo's eager backend

Part 1, stamps: a CUDA graph of N chained ``torch.ops.stagetrace.stamp`` calls on a
decode-sized hidden state (1 x 1 x 2048 bf16) against graphs of N plain copies and of
one copy: GPU µs per stamp, per copy; host µs of one eager stamp; %globaltimer step.

Part 2, compiled decode: ``generate()`` with a static cache, so transformers compiles the
decode step (inductor, mode="reduce-overhead": CUDA graphs). Interleaved repetitions of
  plain               the compiled run untraced (baseline; plain_again is the A/A row)
  stagetrace          stage level (events from the generate loop, outside the graph); the lead's
                      mark (the forward's return) on every 8th step, the default
  stagetrace_lead_every1  stage level with the lead's mark on every step (lead_every=1)
  stagetrace_layers   plus stamps around every decoder layer inside the graph: one per boundary
                      (a layer's end and the next one's begin are one point of the graph), so
                      since session 6 the same stamps and graph as _shared (before: two per boundary)
  stagetrace_layers_shared  layer_marks="shared": one stamp per boundary between layers
  stagetrace_layers_matmul  those stamps moved to each layer's last matmul by the tracer's inductor
                      pass (layer_marks="matmul"): the compiler fuses across layers again
  stagetrace_layers_every8  stamps on every 8th step only (layer_every=8): the stamped graph
                      runs on those steps, the bare one on the others
                      (with compiled_decode.WARM_GUARDS, the default since session 14: each
                      switch made at the stop check before its step, the next graph's guards
                      checked there)
  stagetrace_layers_every8_cold  the same with WARM_GUARDS off (the switch at the step itself)
  stagetrace_layers_every8_matmul  every 8th step with layer_marks="matmul": the stamped graph
                      fuses across layers as the bare one does (fewer kernels on the stamped step)
  stagetrace_layers_every32  layers on the prefill and decode step 0 only (32 new tokens): with
                      _prefill and every8, what one stamped step adds
  stagetrace_layers_prefill  layer_detail="prefill": layers on the prefill only (eager hooks),
                      the decode steps at stage level
  host_clock          stage level's hooks and wrappers marking the host clock, no CUDA event:
                      stagetrace - host_clock is what the events add, host_clock - plain the Python
  stagetrace_no_lead  stage level without the FORWARD_RETURN mark (a probe, not an option: what
                      the lead's one mark per step costs)
  stagetrace_prepare_mark  stage level with every step marked where generate() prepares its inputs,
                      after the stop check's sync (the placement before session 12; a probe): the
                      default marks a step where the step before it issued its stopping criteria
  stagetrace_prepare_wrapped  stage level with the input preparation's wrapper kept on every step
                      (before session 15; a probe): the default takes it off for the steps that
                      need nothing of it and counts them where their forward returns
Wall overhead is paired per repetition; beside it, stage level's direct in-context cost
(``--direct-calls``: every native mark timed around itself, per kind), the tracer's own Python
outside its marks in the same number of calls (``step_python``: each per-step hook timed around
itself and around what it wraps) and with what the call does after generate() returns
(``resolve_ms``); the GPU-side cost of the stamps is also read off
the traced runs' own decode-step times (layers vs stage level; a step here is mostly host
work outside the graph, so these carry host noise), and the stamped ways are compared on
the GPU's own clock by the decoder stack's time per step, first layer begin to last layer
end (``layer_stack_us``: the graph replays its stamps back to back, host noise stays out).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import TimedTimeline, bootstrap_median_ci, environment, quantile, save, table, timed_ms  # noqa: E402


def stamp_cost(cuda: bool, n: int, replays: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from stagetrace.low_level import _C
    from stagetrace.low_level import graph_stamps as gs

    device = torch.device("cuda" if cuda else "cpu")
    ring = gs.ring_for(device)
    rid = gs.ring_id(ring)
    op = torch.ops.stagetrace.stamp.default
    x = torch.zeros(1, 1, 2048, dtype=torch.bfloat16, device=device)
    out: dict[str, Any] = {"n": n, "tensor": "1x1x2048 bf16"}

    # Host cost of one eager stamp through the op (what a capture pays once, per stamp).
    stream = torch.cuda.current_stream().cuda_stream if cuda else 0
    ring.reset(stream)
    for _ in range(50):
        op(x, rid, 1)
    if cuda:
        torch.cuda.synchronize()
    ring.reset(stream)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        op(x, rid, 1)
    out["host_us_per_eager_op"] = (time.perf_counter_ns() - t0) / 1e3 / n
    if cuda:
        torch.cuda.synchronize()
        ring.reset(stream)
        t0 = time.perf_counter_ns()
        for _ in range(n):
            ring.stamp(1, stream)
        out["host_us_per_calibration_stamp"] = (time.perf_counter_ns() - t0) / 1e3 / n
        torch.cuda.synchronize()
    if not cuda:
        return out

    def graph_of(body: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body(x)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body(x)
        return g

    def chain(k: int, f: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def body(y: torch.Tensor) -> torch.Tensor:
            for i in range(k):
                y = f(y, i)
            return y
        return body

    graphs = {"stamps": graph_of(chain(n, lambda y, i: op(y, rid, i & 0xFF))),
              "copies": graph_of(chain(n, lambda y, i: y.clone())),
              "one_copy": graph_of(chain(1, lambda y, i: y.clone()))}

    def replay_us(g: Any) -> float:
        times = []
        for _ in range(replays):
            ring.reset(torch.cuda.current_stream().cuda_stream)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return statistics.median(times)

    for g in graphs.values():  # warm replays (clocks up)
        replay_us(g)
    t = {k: replay_us(g) for k, g in graphs.items()}
    out["graph_replay_us"] = t
    out["gpu_us_per_stamp"] = (t["stamps"] - t["one_copy"]) / (n - 1)
    out["gpu_us_per_plain_copy"] = (t["copies"] - t["one_copy"]) / (n - 1)
    out["globaltimer_resolution_ns"] = int(_C.globaltimer_resolution_ns(torch.cuda.current_device()))
    replay_us(graphs["stamps"])  # last: its stamps are what the ring holds now
    labels, t_ns, dropped = ring.read(torch.cuda.current_stream().cuda_stream)
    out["stamps_read_back"] = {"count": len(labels), "dropped": int(dropped),
                               "in_order": bool((labels == (np.arange(n) & 0xFF)).all()) if len(labels) == n else False}
    return out


METHODS = ("plain", "stagetrace", "stagetrace_lead_every1", "stagetrace_layers", "stagetrace_layers_shared",
           "stagetrace_layers_matmul", "stagetrace_layers_every8", "stagetrace_layers_every8_cold",
           "stagetrace_layers_every8_matmul",
           "stagetrace_layers_every32", "stagetrace_layers_prefill", "host_clock", "stagetrace_no_lead",
           "stagetrace_prepare_mark", "stagetrace_prepare_wrapped", "plain_again")


def layer_stack_us(rec: Any) -> list[float]:
    """Per decode step with layer spans: µs from its first layer's begin to its last layer's end —
    GPU time of the decoder stack, stamps included, read off the stamps themselves (a CUDA-graph
    replay runs them back to back, so host noise does not enter)."""
    import numpy as np

    from stagetrace.spans import KIND_CODE

    sp = rec.spans
    steps = np.flatnonzero(sp.kind == KIND_CODE["step"])
    layers = np.flatnonzero(sp.kind == KIND_CODE["layer"])
    out = []
    for i in steps:
        inside = layers[(sp.start_ns[layers] >= sp.start_ns[i]) & (sp.end_ns[layers] <= sp.end_ns[i])]
        if len(inside):
            out.append((int(sp.end_ns[inside].max()) - int(sp.start_ns[inside].min())) / 1e3)
    return out


def direct_cost(model: Any, kw: dict[str, Any], cuda: bool, calls: int) -> dict[str, Any]:
    """Stage level's marks timed around each native call inside the compiled decode (the
    direct in-context cost; ``TimedTimeline``), per call and per mark kind, after one call
    that is not counted."""
    import numpy as np

    import stagetrace
    from stagetrace.labels import Kind, kind_of
    from stagetrace.lead import CAUGHT_UP_US, lead_ns
    from stagetrace.low_level import new_timeline

    per_call, waited_per_call, by_kind, step_leads_us = [], [], {}, []
    for i in range(calls + 1):
        tl = TimedTimeline(new_timeline("cuda" if cuda else "cpu", capacity=1 << 12))
        with stagetrace.trace(model, timeline=tl) as tracer:
            model.generate(**kw)
        if i == 0:
            continue
        per_call.append(sum(tl.cost_ns) / 1e3)
        kinds = kind_of(np.asarray(tl.labels)).tolist()
        for lab, ns in zip(kinds, tl.cost_ns):
            by_kind.setdefault(Kind(lab).name, []).append(ns / 1e3)
        # Which marks the call waited for: a mark issued while the GPU still had more queued work
        # than the mark's own cost (its lead, lead.py; up to CAUGHT_UP_US of it launch latency)
        # cost the call nothing; the others' cost is on its critical path. Read per mark where the
        # record kept every timed mark (no stop-check mark dropped), else for the step marks
        # alone, matched in order.
        marks = tracer.records[-1].marks
        leads_us = lead_ns(marks.device_ns, marks.host_ns) / 1e3
        steps = kind_of(marks.labels) == Kind.DECODE_FORWARD
        step_leads_us += leads_us[steps].tolist()
        costs_us = np.asarray(tl.cost_ns) / 1e3
        if len(costs_us) == len(marks) and (np.asarray(tl.labels) == marks.labels).all():
            hidden_us = float(costs_us[leads_us > costs_us + CAUGHT_UP_US].sum())
        else:
            step_costs_us = costs_us[np.asarray(kinds) == Kind.DECODE_FORWARD]
            hidden_us = sum(c for c, lead in zip(step_costs_us, leads_us[steps]) if lead > c + CAUGHT_UP_US)
        waited_per_call.append(per_call[-1] - hidden_us)
    return {"calls": calls, "us_per_call": statistics.median(per_call),
            "us_per_call_waited_for": statistics.median(waited_per_call),
            "step_mark_lead_median_us": statistics.median(step_leads_us) if step_leads_us else None,
            "step_mark_lead_p10_us": quantile(step_leads_us, 0.1) if step_leads_us else None,
            "by_kind_median_us": {k: statistics.median(v) for k, v in sorted(by_kind.items())},
            "by_kind_per_call": {k: len(v) / calls for k, v in sorted(by_kind.items())}}


# generate() calls these once per forward; the tracer wraps each on the model (compiled_decode.py,
# forward_return.py), so a decode step runs that Python on the host's path
STEP_HOOKS = ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation")
# the tracer's functions run once per call, before its first mark or after its last (tracer.py's names)
CALL_PARTS = ("named_inputs", "read_call_inputs", "queue_features", "bind_call_streams", "returned_prompt_check",
              "new_token_count", "FinishedCall")


def step_python_cost(model: Any, kw: dict[str, Any], cuda: bool, calls: int,
                     mark_us: dict[str, float]) -> dict[str, Any]:
    """The tracer's own Python in a stage-level call, outside its native marks: each wrapper of
    ``STEP_HOOKS`` timed around itself and around the method it wraps (a timer on the class, set
    before the tracer wraps it), and the stop check's hook (``CompiledDecodeMarks._after_stop_check``),
    each less the native marks it issued (counted off the timeline's length, outside the timed
    window, at ``mark_us``: the median in-context cost of a mark of the kind it issues, from
    ``direct_cost``). The same two timers around an untraced call (nothing between them) give
    their own cost, subtracted from the wrapped hooks. Per call, after one call that is not counted."""
    import stagetrace
    from stagetrace.low_level import new_timeline
    from stagetrace.tracing import compiled_decode

    # the kind of mark each hook issues: a step's start (input preparation, stop check), a forward's return
    issues = {"prepare_inputs_for_generation": "DECODE_FORWARD", "_update_model_kwargs_for_generation":
              "FORWARD_RETURN", "stop_check_hook": "DECODE_FORWARD"}
    names = [n for n in STEP_HOOKS if callable(getattr(type(model), n, None))]
    inner_ns = {n: [0] for n in names}  # the wrapped method's time inside the current outer call
    spent: dict[str, list[float]] = {}  # per hook: each invocation's own µs
    tl_box: list[Any] = [None]

    def n_marks() -> int:
        return len(tl_box[0]) if tl_box[0] is not None else 0

    def own_us(key: str, elapsed_ns: int, marks: int) -> None:
        spent.setdefault(key, []).append(elapsed_ns / 1e3 - marks * mark_us.get(issues.get(key, ""), 0.0))

    def timer(fn: Callable[..., Any], record: Callable[[int], None]) -> Callable[..., Any]:
        """``fn`` with its own elapsed ns handed to ``record`` (outside the timed window)."""
        @functools.wraps(fn)  # generate() reads the input preparation's signature
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                record(time.perf_counter_ns() - t0)

        return timed

    def inner_timer(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        box = inner_ns[name]

        def add(ns: int) -> None:
            box[0] += ns

        return timer(fn, add)

    def outer_timer(name: str, fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        @functools.wraps(fn)  # generate() reads the input preparation's signature
        def timed(*args: Any, **kwargs: Any) -> Any:
            inner_ns[name][0], m0 = 0, n_marks()
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter_ns()
                own_us(key, t1 - t0 - inner_ns[name][0], n_marks() - m0)

        return timed

    after = compiled_decode.CompiledDecodeMarks._after_stop_check
    make_prepare_wrapper = compiled_decode.CompiledDecodeMarks._step_marks

    def timed_prepare_wrapper(self: Any, inner: Callable[..., Any]) -> Callable[..., Any]:
        # the tracer takes its own wrapper of the input preparation off the model for the steps that
        # need nothing of it (compiled_decode.py): a timer placed over it would keep it on, so the
        # timer is the wrapper object the tracer places and takes off
        return outer_timer("prepare_inputs_for_generation", make_prepare_wrapper(self, inner),
                           "prepare_inputs_for_generation")

    def timed_after(self: Any, *args: Any) -> None:
        m0 = n_marks()
        t0 = time.perf_counter_ns()
        after(self, *args)
        own_us("stop_check_hook", time.perf_counter_ns() - t0, n_marks() - m0)

    # the tracer's work around generate() itself (before the call's first mark, after its last), each part
    # timed around itself in the traced call (a timer's own ~0.2 µs included): what the host adds at the
    # call's two ends, where the GPU is idle
    from stagetrace.low_level import Marks
    from stagetrace.tracing import features, tracer as tracer_mod

    def part_timer(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return timer(fn, lambda ns: spent.setdefault(f"call part: {key}", []).append(ns / 1e3))

    call_parts = [(tracer_mod, n) for n in CALL_PARTS] + [(tracer_mod.Tracer, "_after_call"),
                                                          (features.PendingFeatures, "hold")]
    from_timeline = Marks.from_timeline.__func__

    per_call: dict[str, list[float]] = {}
    invocations: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(mock.patch.object(type(model), n, inner_timer(n, getattr(type(model), n))))
        stack.enter_context(mock.patch.object(compiled_decode.CompiledDecodeMarks, "_after_stop_check", timed_after))
        stack.enter_context(mock.patch.object(compiled_decode.CompiledDecodeMarks, "_step_marks", timed_prepare_wrapper))
        for i in range(calls + 1):
            for traced in (False, True):  # interleaved: the timers alone, then the same call traced
                spent.clear()
                with contextlib.ExitStack() as call_stack:
                    if traced:
                        for owner, n in call_parts:
                            call_stack.enter_context(mock.patch.object(owner, n, part_timer(n, getattr(owner, n))))
                        call_stack.enter_context(mock.patch.object(Marks, "from_timeline", classmethod(
                            part_timer("Marks.from_timeline", from_timeline))))
                        tl_box[0] = new_timeline("cuda" if cuda else "cpu", capacity=1 << 12)
                        call_stack.enter_context(stagetrace.trace(model, timeline=tl_box[0]))
                    for n in names:  # over the tracer's wrapper (or the bound method, untraced)
                        if traced and n == "prepare_inputs_for_generation":
                            continue  # the tracer's wrapper is timed itself (timed_prepare_wrapper)
                        call_stack.enter_context(mock.patch.object(model, n, outer_timer(
                            n, getattr(model, n), n if traced else f"{n} (timers alone)")))
                    model.generate(**kw)
                tl_box[0] = None
                if i > 0:
                    for key, xs in spent.items():
                        per_call.setdefault(key, []).append(sum(xs))
                        invocations[key] = len(xs)
    out = {k: statistics.median(v) for k, v in per_call.items()}
    # the timers' own cost, per invocation of the untimed call, taken off each invocation of the traced one
    # (the tracer's input preparation runs on the prefill and the steps that need it only)
    alone_per_invocation = {n: out[f"{n} (timers alone)"] / invocations[f"{n} (timers alone)"] for n in names
                            if invocations.get(f"{n} (timers alone)")}
    net = {n: out[n] - alone_per_invocation.get(n, 0.0) * invocations.get(n, 0) for n in names if n in out}
    net["stop_check_hook"] = out.get("stop_check_hook", 0.0)
    parts = {k.removeprefix("call part: "): v for k, v in out.items() if k.startswith("call part: ")}
    return {"calls": calls, "us_per_call": net, "us_per_call_total": sum(net.values()),
            "call_parts_us": parts, "call_parts_us_total": sum(parts.values()),
            "us_per_call_raw": out, "mark_us_subtracted": mark_us, "invocations_last_call": invocations}


def compiled_decode_kwargs(case: Any, cuda: bool, new_tokens: int) -> dict[str, Any]:
    """generate() kwargs under which transformers compiles the decode step itself (a static
    cache): its default on CUDA (inductor, CUDA graphs), dynamo's eager backend on the CPU."""
    case.model.generation_config.cache_implementation = "static"
    kw = dict(case.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              **case.generate_kwargs)
    if not cuda:
        from transformers import CompileConfig

        cc = CompileConfig(backend="eager", mode=None)
        cc._compile_all_devices = True  # what a CUDA device gets by default
        kw["compile_config"] = cc
    return kw


def decode_overhead(name: str, case: Any, cuda: bool, reps: int, warmup: int, new_tokens: int,
                    only: tuple[str, ...] = METHODS, direct_calls: int = 0, step_clock: bool = False,
                    gc_off: bool = False, touch_untraced: bool = False, settle: int = 0) -> dict[str, Any]:
    import torch

    import stagetrace

    model = case.model
    kw = compiled_decode_kwargs(case, cuda, new_tokens)

    def timed(fn: Callable[[], Any]) -> float:
        if not gc_off:
            return timed_ms(fn, cuda)
        gc.disable()  # --gc-off: no collection inside a timed call (a probe of what allocations cost it)
        try:
            return timed_ms(fn, cuda)
        finally:
            gc.enable()

    from stagetrace.testing.reference import HostClockTimeline
    from stagetrace.tracing import compiled_decode, forward_return

    tracers = {"stagetrace": stagetrace.trace(model, keep_marks=False),
               "stagetrace_lead_every1": stagetrace.trace(model, keep_marks=False, lead_every=1),
               "host_clock": stagetrace.trace(model, keep_marks=False, timeline=HostClockTimeline()),
               "stagetrace_no_lead": stagetrace.trace(model, keep_marks=False),
               "stagetrace_prepare_mark": stagetrace.trace(model, keep_marks=False),
               "stagetrace_prepare_wrapped": stagetrace.trace(model, keep_marks=False),
               "stagetrace_layers": stagetrace.trace(model, layer_detail="all", keep_marks=False),
               "stagetrace_layers_shared": stagetrace.trace(model, layer_detail="all", layer_marks="shared",
                                                            keep_marks=False),
               "stagetrace_layers_matmul": stagetrace.trace(model, layer_detail="all", layer_marks="matmul",
                                                            keep_marks=False),
               # the stamped graph on every 8th step only, the bare one on the others
               "stagetrace_layers_every8": stagetrace.trace(model, layer_detail="all", layer_every=8,
                                                            keep_marks=False),
               "stagetrace_layers_every8_cold": stagetrace.trace(model, layer_detail="all", layer_every=8,
                                                                 keep_marks=False),
               "stagetrace_layers_every8_matmul": stagetrace.trace(model, layer_detail="all", layer_every=8,
                                                                   layer_marks="matmul", keep_marks=False),
               "stagetrace_layers_every32": stagetrace.trace(model, layer_detail="all", layer_every=32,
                                                             keep_marks=False),
               "stagetrace_layers_prefill": stagetrace.trace(model, layer_detail="prefill", keep_marks=False)}
    outputs: dict[str, Any] = {}

    step_entries_ns: list[int] = []  # --step-clock: host time at each prepare_inputs_for_generation
    if step_clock:
        # On the class, below the tracer's own wrapper, so every method (plain too) pays it alike.
        inner = type(model).prepare_inputs_for_generation

        @functools.wraps(inner)
        def clocked(*args: Any, **kwargs: Any) -> Any:
            step_entries_ns.append(time.perf_counter_ns())
            return inner(*args, **kwargs)

        # mock.patch puts back exactly what was there (the class may inherit the method); see finally below
        clock_patch = mock.patch.object(type(model), "prepare_inputs_for_generation", clocked)
        clock_patch.start()

    def generate_clocked(res: dict[str, Any]) -> Any:
        step_entries_ns.clear()
        t_in = time.perf_counter_ns()
        out = res.setdefault("out", model.generate(**kw))
        if step_clock and len(step_entries_ns) > 2:  # [prefill, decode step 0, 1, ...]
            e = step_entries_ns
            # head = setup (generate()'s and the tracer's work before the prefill's input preparation)
            # + prefill (from there to the first decode step's: the prefill, its stop check and its wait)
            res["host"] = {"head_ms": (e[1] - t_in) / 1e6, "tail_ms": (time.perf_counter_ns() - e[-1]) / 1e6,
                           "setup_ms": (e[0] - t_in) / 1e6, "prefill_ms": (e[1] - e[0]) / 1e6,
                           "step_ms": statistics.median(b - a for a, b in zip(e[1:], e[2:])) / 1e6}
        return out

    # --touch-untraced: a tracer started and stopped before each untraced call, never called through
    touch = stagetrace.trace(model, keep_marks=False) if touch_untraced else None

    def method(m: str) -> Callable[[], dict]:
        def run() -> dict:
            tr = tracers.get(m)
            if tr is None:
                if touch is not None:  # the model's attributes and hooks set and put back, as before a traced call
                    with touch:
                        pass
                for _ in range(settle):  # untimed: the timed call follows a call of its own kind
                    model.generate(**kw)
                res: dict[str, Any] = {}
                wall = timed(lambda: generate_clocked(res))
                outputs.setdefault(m, res["out"].cpu())
                return {"wall_ms": wall, **res.get("host", {})}
            with contextlib.ExitStack() as stack:
                if m == "stagetrace_no_lead":  # the probe: the lead's mark never installed
                    stack.enter_context(mock.patch.object(forward_return.ForwardReturnMarks, "install",
                                                          lambda self: None))
                if m == "stagetrace_prepare_mark":  # the probe: no step is marked at the stop check
                    stack.enter_context(mock.patch.object(compiled_decode.CompiledDecodeMarks, "_after_stop_check",
                                                          lambda self, *args: None))
                if m == "stagetrace_prepare_wrapped":  # the probe: the input preparation's wrapper never comes off
                    keep_on = compiled_decode.CompiledDecodeMarks._prepare_wrapped
                    stack.enter_context(mock.patch.object(compiled_decode.CompiledDecodeMarks, "_prepare_wrapped",
                                                          lambda self, c, wrapped: keep_on(self, c, True)))
                if m.endswith("_cold"):  # read at install, so patched around the tracer's entry
                    stack.enter_context(mock.patch.object(compiled_decode, "WARM_GUARDS", False))
                stack.enter_context(tr)
                for _ in range(settle):  # untimed, traced: as when a tracer stays on over many calls
                    model.generate(**kw)
                res = {}
                wall = timed(lambda: generate_clocked(res))
            outputs.setdefault(m, res["out"].cpu())
            rec = tr.records[-1]
            tr.clear()
            return {"wall_ms": wall, "record": rec.to_dict(), "layer_stack_us": layer_stack_us(rec),
                    **res.get("host", {})}
        return run

    try:
        names = [m for m in METHODS if m in only or m in ("plain", "plain_again", "stagetrace")]
        methods = {m: method(m) for m in names}
        t_compile = time.perf_counter()
        for _ in range(warmup):
            for fn in methods.values():
                fn()
        compile_and_warmup_s = time.perf_counter() - t_compile
        samples: dict[str, list[dict]] = {m: [] for m in names}
        ran_after: dict[str, list[str]] = {m: [] for m in names}  # per method and repetition: what ran right before
        for rep in range(reps):
            gc.collect()
            previous = "gc.collect"  # the repetition's first call follows the collection
            for m in names[rep % len(names):] + names[: rep % len(names)]:
                samples[m].append(methods[m]())
                ran_after[m].append(previous)
                previous = m
        same_tokens = {m: bool(torch.equal(outputs[m], outputs["plain"])) for m in names}
        direct = direct_cost(model, kw, cuda, direct_calls) if direct_calls > 0 else None
        step_python = (step_python_cost(model, kw, cuda, direct_calls, direct["by_kind_median_us"])
                       if direct is not None else None)
    finally:
        if step_clock:
            clock_patch.stop()
    plain = [s["wall_ms"] for s in samples["plain"]]
    base = statistics.median(plain)
    summary: dict[str, Any] = {}
    for m, ss in samples.items():
        walls = [s["wall_ms"] for s in ss]
        paired = [100 * (w - p) / p for w, p in zip(walls, plain)]
        lo, hi = bootstrap_median_ci(paired)
        row: dict[str, Any] = {"median_ms": statistics.median(walls), "paired_overhead_pct": statistics.median(paired),
                               "paired_overhead_ci95_pct": [lo, hi], "walls_ms": walls}
        if step_clock and all("step_ms" in s for s in ss):
            # the host's own clock, paired per repetition against plain: where the difference lies
            for part in ("head_ms", "setup_ms", "prefill_ms", "step_ms", "tail_ms"):
                diffs_us = [1e3 * (s[part] - p[part]) for s, p in zip(ss, samples["plain"])]
                row[f"host_{part}"] = statistics.median(s[part] for s in ss)
                row[f"host_{part[:-3]}_paired_us"] = statistics.median(diffs_us)
                row[f"host_{part[:-3]}_paired_ci95_us"] = list(bootstrap_median_ci(diffs_us))
            # every repetition's parts, in repetition order (paired with plain's by index), for a later look
            row["host_samples_ms"] = {part: [s[part] for s in ss]
                                      for part in ("setup_ms", "prefill_ms", "step_ms", "tail_ms")}
            # the host time before the first decode step by what ran right before the call: the switch from
            # another method (or the repetition's gc.collect) shows here, in the A/A row as in the others
            heads: dict[str, list[float]] = {}
            for s, before in zip(ss, ran_after[m]):
                heads.setdefault(before, []).append(1e3 * s["head_ms"])
            row["host_head_us_by_previous"] = {before: {"median": statistics.median(xs), "n": len(xs)}
                                              for before, xs in sorted(heads.items())}
        recs = [s["record"] for s in ss if "record" in s]
        if recs:
            errors = [r["error"] for r in recs if r["error"]]
            row["errors"] = errors
            ok = [r for r in recs if not r["error"]]
            row["compiled_decode"] = all(r["compiled_decode"] for r in ok)
            row["n_marks"] = ok[0]["n_marks"] if ok else 0
            row["decode_step_median_ms"] = statistics.median(x for r in ok for x in r["decode_step_ms"])
            row["prefill_median_ms"] = statistics.median(r["prefill_ms"] for r in ok)
            row["resolve_ms"] = statistics.median(r["resolve_ms"] for r in ok)
            row["build_ms"] = statistics.median(r.get("build_ms", 0.0) for r in ok)  # outside the call
            row["layer_marks_after_matmul"] = ok[0].get("layer_marks_after_matmul", 0) if ok else 0
            stack = [x for s in ss for x in s.get("layer_stack_us", [])]
            if stack:  # the stamped ways against each other on the GPU's own clock
                row["layer_stack_median_us"] = statistics.median(stack)
                row["layer_stack_p10_p90_us"] = [quantile(stack, 0.1), quantile(stack, 0.9)]
        if "resolve_ms" in row:  # what the call does after generate() returned (the sync, host copies): a share of it
            row["resolve_pct"] = 100 * row["resolve_ms"] / base
            row["build_pct"] = 100 * row["build_ms"] / base  # the record's build, paid when records are read
        if m == "stagetrace" and direct is not None:
            # beside the wall difference: the marks' own cost inside the call, and with what
            # the call does after generate() returned
            row["direct"] = direct
            row["direct_pct"] = 100 * direct["us_per_call"] / 1e3 / base
            # less the marks issued while the GPU had more queued work than their cost (not waited for)
            row["direct_waited_pct"] = 100 * direct["us_per_call_waited_for"] / 1e3 / base
            row["accounted_pct"] = row["direct_pct"] + row["resolve_pct"]
        if m == "stagetrace" and step_python is not None:  # the tracer's own Python, outside the marks
            row["step_python"] = step_python
            row["step_python_pct"] = 100 * step_python["us_per_call_total"] / 1e3 / base
            if "accounted_pct" in row:  # the marks, the Python around them, the work after generate() returns
                row["accounted_with_python_pct"] = row["accounted_pct"] + row["step_python_pct"]
        summary[m] = row
    layers = len(getattr(tracers["stagetrace"].layout, "layers"))
    step_stage = summary["stagetrace"]["decode_step_median_ms"]
    # the GPU cost of each way of stamping, off the traced runs' own step times
    step_cost = {m: summary[m]["decode_step_median_ms"] - step_stage for m in names
                 if m.startswith("stagetrace_layers") and "decode_step_median_ms" in summary[m]}
    step_layers = summary.get("stagetrace_layers", {}).get("decode_step_median_ms")
    return {"config": name, "methods": summary, "same_tokens": same_tokens,
            "gpu_step_cost_ms": step_cost,
            "compile_and_warmup_s": compile_and_warmup_s,
            "stamps_per_step": layers + 1,  # one per boundary (pair and shared alike) and the last end
            "gpu_step_cost_of_stamps_ms": step_cost.get("stagetrace_layers"),
            "gpu_us_per_stamp_in_decode": None if step_layers is None else 1e3 * (step_layers - step_stage) / (layers + 1),
            "plain_spread_p10_p90_pct": 100 * (quantile(plain, 0.9) - quantile(plain, 0.1)) / base,
            "params": {"reps": reps, "warmup": warmup, "new_tokens": new_tokens,
                       "batch": case.inputs["input_ids"].shape[0], "prompt_len": case.prompt_len}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny Llama on the CPU (smoke run; CPU figures)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--stamps", type=int, default=1000, help="stamps in the chained graph of part 1")
    ap.add_argument("--configs", default="llama_b1,llava_b1")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset (plain, plain_again and stagetrace always run)")
    ap.add_argument("--skip-stamp-cost", action="store_true", help="skip part 1")
    ap.add_argument("--direct-calls", type=int, default=5,
                    help="stage-level calls with every native mark timed (the direct in-context cost); 0: none")
    ap.add_argument("--step-clock", action="store_true",
                    help="host clock at each prepare_inputs_for_generation (every method alike): the paired "
                         "difference split into before the first decode step, per step, and after the last")
    ap.add_argument("--gc-off", action="store_true",
                    help="probe: Python's garbage collector off inside every timed call (each method alike)")
    ap.add_argument("--touch-untraced", action="store_true",
                    help="before each untraced call (plain, plain_again), an unused tracer started and stopped, "
                         "untimed: every timed call then follows its model's attributes and hooks being set, as a "
                         "traced call does (its tracer is entered right before it)")
    ap.add_argument("--settle", type=int, default=0,
                    help="untimed calls of the same method right before each timed one (a traced method's inside "
                         "its tracer): the timed call then follows a call of its own kind, as with a tracer kept on "
                         "over many calls, not the switch from another method")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    import models
    from stagetrace.testing import tiny

    cuda = torch.cuda.is_available() and not args.cpu_tiny
    env = environment()
    name = (("compiled" if cuda else "compiled-cpu-tiny") + ("-gcoff" if args.gc_off else "")
            + ("-touch" if args.touch_untraced else "") + (f"-settle{args.settle}" if args.settle else ""))
    payload: dict[str, Any] = {
        "benchmark": "compiled", "env": env, "device": "cuda" if cuda else "cpu",
        "models": ("realistic Llama (22 layers, 2048 wide, bf16, random weights) and LLaVA (CLIP-L/336 + that "
                   "Llama); static cache, transformers' own compile (inductor, reduce-overhead)") if cuda
        else "tiny random-weight Llama on the CPU, dynamo eager backend (smoke run)",
        "params": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    payload["stamp_cost"] = {} if args.skip_stamp_cost else stamp_cost(cuda, args.stamps, replays=20)
    save(name, payload, args.out)
    for cfg in args.configs.split(","):
        family, batch = cfg.rsplit("_b", 1)
        if cuda:
            case = models.llava_realistic(batch=int(batch)) if family == "llava" else models.llama_realistic(
                batch=int(batch))
        else:
            case = tiny.build(family, batch=int(batch))
        case.model.eval()
        payload["results"].append(decode_overhead(cfg, case, cuda, args.reps, args.warmup, args.new_tokens,
                                                  tuple(args.methods.split(",")), args.direct_calls, args.step_clock,
                                                  args.gc_off, args.touch_untraced, args.settle))
        path = save(name, payload, args.out)  # survives a cut-off
        del case
        if cuda:
            torch.cuda.empty_cache()
            torch._dynamo.reset()

    sc = payload["stamp_cost"]
    print(f"stamps on {env['card']}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in sc.items() if not isinstance(v, dict)))
    for r in payload["results"]:
        costs = ", ".join(f"{m} {ms * 1e3:.1f} µs" for m, ms in r["gpu_step_cost_ms"].items())
        print(f"\n{r['config']}: same tokens as plain {r['same_tokens']}; GPU cost per decode step over stage "
              f"level: {costs}; plain p10-p90 {r['plain_spread_p10_p90_pct']:.2f}%")
        rows = [[m, v["median_ms"], v["paired_overhead_pct"], "[{:.2f}, {:.2f}]".format(*v["paired_overhead_ci95_pct"]),
                 v.get("decode_step_median_ms", ""), v.get("layer_stack_median_us", ""), v.get("n_marks", ""),
                 v.get("layer_marks_after_matmul", ""),
                 f"{v['resolve_ms'] * 1e3:.0f} ({v['resolve_pct']:.2f}%)" if "resolve_pct" in v else "",
                 f"{v['build_ms'] * 1e3:.0f} ({v['build_pct']:.2f}%)" if "build_pct" in v else "",
                 len(v.get("errors", []))] for m, v in r["methods"].items()]
        print(table(rows, ["method", "median ms", "paired %", "95% interval", "step ms", "layer stack µs", "marks",
                           "after matmul", "resolve µs (% of call)", "build µs (% of call)", "errors"]))
        clocked = [(m, v) for m, v in r["methods"].items() if "host_step_paired_us" in v]
        if clocked:
            print("host clock, paired against plain (median µs [95% interval]): before the first decode step "
                  "(of it: before the prefill's input preparation | from there) | a decode step | after the last")
            for m, v in clocked:
                print(f"  {m:20s} " + " | ".join("{:+.1f} [{:+.1f}, {:+.1f}]".format(
                    v[f"host_{p}_paired_us"], *v[f"host_{p}_paired_ci95_us"])
                    for p in ("head", "setup", "prefill", "step", "tail")))
            print("host µs before the first decode step, median, by what ran right before the call:")
            for m, v in clocked:
                print(f"  {m:20s} " + ", ".join(f"after {before} {d['median']:.0f} (n {d['n']})"
                                                for before, d in v["host_head_us_by_previous"].items()))
        st = r["methods"]["stagetrace"]
        if "direct" in st:
            d = st["direct"]
            kinds = ", ".join(f"{k} {v:.1f} µs x{d['by_kind_per_call'][k]:.0f}" for k, v in d["by_kind_median_us"].items())
            print(f"stage level, direct: {d['us_per_call']:.0f} µs a call ({st['direct_pct']:.3f}%), with resolve "
                  f"{st['accounted_pct']:.3f}%; waited for (less the marks issued while the GPU had more queued "
                  f"work than their cost): {d['us_per_call_waited_for']:.0f} µs ({st['direct_waited_pct']:.3f}%), with "
                  f"resolve {st['direct_waited_pct'] + st['resolve_pct']:.3f}%; the step marks' lead: median "
                  f"{d['step_mark_lead_median_us'] or 0:.0f} µs (p10 {d['step_mark_lead_p10_us'] or 0:.0f}); "
                  f"a mark by kind (median, per call): {kinds}")
        if "step_python" in st:
            sp = st["step_python"]
            parts = ", ".join(f"{k} {v:.0f} µs" for k, v in sp["us_per_call"].items())
            print(f"stage level, the tracer's Python outside its marks: {sp['us_per_call_total']:.0f} µs a call "
                  f"({st['step_python_pct']:.3f}%): {parts} (invocations in a call: {sp['invocations_last_call']})"
                  + (f"; marks + Python + resolve: {st['accounted_with_python_pct']:.3f}%"
                     if "accounted_with_python_pct" in st else ""))
            if sp.get("call_parts_us"):
                print(f"stage level, the tracer's work at the call's two ends: {sp['call_parts_us_total']:.0f} µs a "
                      "call: " + ", ".join(f"{k} {v:.1f} µs" for k, v in sp["call_parts_us"].items()))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
