"""Compiled code on the CPU (dynamo): generate()'s own compiled decode and a forward compiled
by hand, traced without graph breaks or recompiles, or refused with the reason."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import stagetrace
from stagetrace.testing import tiny
from stagetrace.labels import Kind, kind_of
from stagetrace.tracing import TracingError
from stagetrace.tracing.tracer import COMPILED_LEAD_EVERY

from helpers import DEVICES, assert_partition, build_on, gen_kwargs, hook_state, static_compiled, tokens

FAMILIES = list(tiny.FAMILIES)

@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl"])
def test_compiled_decode_is_traced_without_graph_breaks_or_recompiles(family):
    import torch._dynamo
    from torch._dynamo.utils import counters

    case = tiny.build(family)
    kw = gen_kwargs(case, 5, **static_compiled(case))
    torch._dynamo.reset()
    counters.clear()
    plain = tokens(case.model.generate(**kw))  # untraced: compiles the decode step once
    frames = dict(counters["frames"])
    assert frames.get("ok", 0) >= 1, "generate() did not compile the decode step"
    before = hook_state(case.model)
    with stagetrace.trace(case.model, layer_detail="prefill") as tracer:
        for _ in range(3):
            assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert dict(counters["frames"]) == frames, "tracing made dynamo compile again"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert hook_state(case.model) == before
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and rec.output_tokens == 5 and len(rec.decode_step_ms) == 4
        assert len([s for s in rec.spans if s.name.startswith("layer")]) == 2  # prefill layers only
        # the forward's return is marked outside the graph, on every COMPILED_LEAD_EVERY-th step by default
        assert rec.lead_every == COMPILED_LEAD_EVERY > 4 and rec.lead["decode"]["steps_read"] == 1
        assert rec.decode_step_lead_us[0] is not None and rec.decode_step_lead_us[1:] == [None] * 3
        assert (rec.vision_ms is not None) == (family != "llama")


def _returns_marked(rec) -> list[int]:
    """The decode steps whose forward's return was marked (the prefill's is always marked)."""
    steps = [k for k, lead in enumerate(rec.decode_step_lead_us) if lead is not None]
    assert int((kind_of(rec.marks.labels) == Kind.FORWARD_RETURN).sum()) == 1 + len(steps)
    return steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead_every, want", [(None, [0, 8]), (1, list(range(9))), (3, [0, 3, 6])])
def test_a_compiled_decode_marks_the_lead_on_every_nth_step_and_the_record_says_which(lead_every, want, device):
    """The lead's one mark in a compiled step costs a share of a ~3 ms step: by default it is
    taken on every 8th compiled step (every step of an eager decode); the record says which,
    and a step without it is unknown, never host-bound."""
    case = build_on("llama", device)
    kw = gen_kwargs(case, 10, **static_compiled(case, device))
    plain = tokens(case.model.generate(**kw))
    with stagetrace.trace(case.model, lead_every=lead_every) as tracer:
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
        eager = tokens(case.model.generate(**kw, disable_compile=True))  # the same static cache, eager
    compiled_rec, eager_rec = tracer.records
    assert compiled_rec.compiled_decode and not eager_rec.compiled_decode
    assert _returns_marked(compiled_rec) == want and compiled_rec.lead_every == (lead_every or COMPILED_LEAD_EVERY)
    assert compiled_rec.lead["decode"]["steps_read"] == len(want)
    every_eager = lead_every or 1
    assert _returns_marked(eager_rec) == list(range(0, 9, every_eager)) and eager_rec.lead_every == every_eager
    assert torch.equal(eager, plain)
    for rec in tracer.records:
        assert_partition(rec)
        unread = "n/a" if rec.backend == "cpu" else "unknown"  # the CPU has one clock: no lead anywhere
        verdicts = rec.decode_step_verdict
        assert [v for k, v in enumerate(verdicts) if k not in _returns_marked(rec)] == (
            [unread] * (9 - len(_returns_marked(rec))))
        assert all(verdicts[k] in ({"n/a"} if device == "cpu" else {"host-bound", "gpu-bound", "mixed"})
                   for k in _returns_marked(rec))
        assert rec.lead["decode"]["verdict"] in ({"n/a"} if device == "cpu" else {"host-bound", "gpu-bound", "mixed"})


@pytest.mark.parametrize("detail, every, switches, layer_steps", [
    ("off", 2, [False], []),
    ("all", 2, [True, False] * 3, [0, 2, 4]),  # 7 new tokens: decode steps 0-5
    ("all", 3, [True, False, True, False], [0, 3]),
    ("all", 1, [True], [0, 1, 2, 3, 4, 5]),
])
def test_a_compiled_step_switches_graphs_only_where_the_graph_changes(detail, every, switches, layer_steps,
                                                                      monkeypatch):
    """The module hooks come off once per call, before its first compiled step; after it the
    layers' forwards change only on a step into or out of the stamped graph, and only a
    stamped step is calibrated. A step that keeps its graph (stage level after the first, a
    bare step after a bare one) calls nothing but its mark."""
    from stagetrace.tracing.stamps import LayerStamps
    from stagetrace.tracing.tracer import Tracer

    seen: list[bool] = []
    calibrated: list[int] = []
    switch, calibrate = Tracer._before_compiled_step, LayerStamps.calibrate
    monkeypatch.setattr(Tracer, "_before_compiled_step", lambda self, stamped: seen.append(stamped) or switch(
        self, stamped))
    monkeypatch.setattr(LayerStamps, "calibrate", lambda self, lab: calibrated.append(lab) or calibrate(self, lab))
    case = tiny.build("llama")
    kw = gen_kwargs(case, 7, **static_compiled(case))
    plain = tokens(case.model.generate(**kw))
    before = hook_state(case.model)
    with pytest.warns(UserWarning) if detail == "all" else contextlib.nullcontext():
        with stagetrace.trace(case.model, layer_detail=detail, layer_every=every) as tracer:
            for _ in range(2):
                assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert seen == switches * 2 and hook_state(case.model) == before
    assert len(calibrated) == 2 * len(layer_steps)
    n_layers = len(tracer.layout.layers)
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and rec.layer_steps == layer_steps and not rec.error
        steps = [s for s in rec.spans if s.kind == "step"]
        for k, step in enumerate(steps):  # each stamped step's layers sit inside it, the bare ones have none
            inside = [s for s in rec.spans if s.kind == "layer" and s.depth == 3
                      and step.start_ns <= s.start_ns and s.end_ns <= step.end_ns]
            assert len(inside) == (n_layers if k in layer_steps else 0), k


def test_the_hooks_a_compiled_decode_takes_off_come_back_as_the_same_objects():
    """A compiled call takes the module hooks and wrappers off before its first step and puts
    them back after; they are made once and placed again as they are (no new closures per
    call), with exactly the hooks of the first install in place between calls."""
    case = tiny.build("llava")
    kw = gen_kwargs(case, 4, **static_compiled(case))
    case.model.generate(**kw)  # compiles; transformers places its own output-capture hooks on a first call
    before = hook_state(case.model)

    def placed(model):  # every hook function and instance-level wrapper of ours, by identity
        hooks = {(name, d, id(fn)) for name, m in model.named_modules()
                 for d in ("_forward_hooks", "_forward_pre_hooks") for fn in getattr(m, d).values()
                 if fn.__module__.startswith("stagetrace")}  # transformers adds its own on a first call
        wrappers = {(name, a, id(v)) for name, m in model.named_modules() for a, v in vars(m).items()
                    if callable(v) and not isinstance(v, nn.Module)
                    and str(getattr(v, "__module__", "")).startswith("stagetrace")}
        return hooks, wrappers

    with stagetrace.trace(case.model) as tracer:
        first = placed(case.model)
        assert first[0] and first[1]
        for _ in range(2):
            case.model.generate(**kw)
            assert placed(case.model) == first
    assert hook_state(case.model) == before
    assert all(rec.compiled_decode and rec.vision_ms > 0 for rec in tracer.records)


def test_a_bare_step_that_stamps_fails_its_record_instead_of_lending_its_stamps(monkeypatch):
    """Sampled, a bare step has no calibration: stamps it took would be counted to the
    stamped step before it. If the graph switch fails (here: the stamps never come off), the
    record says the stamps do not line up, and places none."""
    from stagetrace.tracing.stamps import LayerStamps

    monkeypatch.setattr(LayerStamps, "remove", lambda self: None)
    case = tiny.build("llama")
    kw = gen_kwargs(case, 7, **static_compiled(case))
    with pytest.warns(UserWarning):
        with stagetrace.trace(case.model, layer_detail="all", layer_every=3) as tracer:
            case.model.generate(**kw)
    monkeypatch.undo()
    tracer._stamps.remove()  # what the patched remove() left behind
    (rec,) = tracer.records
    assert rec.error and "a step that ran the bare graph stamped" in rec.error
    assert rec.layer_steps == []


def test_a_decode_step_first_compiled_under_tracing_serves_untraced_calls_too():
    import torch._dynamo
    from torch._dynamo.utils import counters

    case = tiny.build("llama")
    kw = gen_kwargs(case, 4, **static_compiled(case))
    torch._dynamo.reset()
    counters.clear()
    with stagetrace.trace(case.model) as tracer:
        traced = tokens(case.model.generate(**kw))  # compiles here, with the hooks already off
    frames = dict(counters["frames"])
    assert torch.equal(tokens(case.model.generate(**kw)), traced)
    assert dict(counters["frames"]) == frames and not counters["graph_break"]
    assert tracer.records[0].compiled_decode and len(tracer.records[0].decode_step_ms) == 3


def test_compiled_decode_refuses_what_it_cannot_time(monkeypatch):
    case = tiny.build("llama")
    kw = gen_kwargs(case, 3, **static_compiled(case))
    monkeypatch.setattr(stagetrace.tracing.compiled, "COMPILED_DECODE_VALIDATED_ON", ())
    with stagetrace.trace(case.model) as tracer:
        with pytest.raises(TracingError, match="not yet validated on cpu.*disable_compile=True"):
            case.model.generate(**kw)
        out = case.model.generate(**kw, disable_compile=True)  # the eager static-cache run is traced
    (rec,) = tracer.records
    assert_partition(rec)
    assert not rec.compiled_decode
    assert out.shape[1] == case.prompt_len + 3 and len(rec.decode_step_ms) == 2


def test_a_forward_compiled_by_hand_is_traced_without_recompiles():
    import torch._dynamo
    from torch._dynamo.utils import counters

    case = tiny.build("llama")
    case.model.forward = torch.compile(case.model.forward, backend="eager")
    kw = gen_kwargs(case, 5)
    torch._dynamo.reset()
    counters.clear()
    plain = tokens(case.model.generate(**kw))
    case.model.generate(**kw)  # the second call settles dynamo's dynamic shapes
    frames = dict(counters["frames"])
    with stagetrace.trace(case.model) as tracer:
        for _ in range(3):
            assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert dict(counters["frames"]) == frames and not counters["graph_break"]
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and len(rec.decode_step_ms) == 4
        assert _returns_marked(rec) == [0] and rec.lead_every == COMPILED_LEAD_EVERY  # compiled: sampled by default


def test_a_forward_compiled_by_hand_keeps_its_stamps_across_calls_under_a_compiled_decode():
    """A forward compiled by hand with a static cache: generate() compiles its decode step
    too, whose guard takes the module hooks off; after the call the hooks come back and the
    forward's own stamps stay, so every call's prefill keeps its layer spans (they were lost
    from the second call on)."""
    case = tiny.build("llama")
    case.model.forward = torch.compile(case.model.forward, backend="eager")
    kw = gen_kwargs(case, 5, **static_compiled(case))
    plain = tokens(case.model.generate(**kw))
    with pytest.warns(UserWarning, match="stamp"):
        with stagetrace.trace(case.model, layer_detail="all") as tracer:
            for _ in range(3):
                assert torch.equal(tokens(case.model.generate(**kw)), plain)
    n_layers = len(tracer.layout.layers)
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and not rec.error and rec.layer_steps == [0, 1, 2, 3]
        assert len([s for s in rec.spans if s.kind == "layer" and s.depth == 2]) == n_layers, rec.call_index


@pytest.mark.parametrize("case_name", ["vlm", "prefill_layers", "no_stamps", "unvalidated_device"])
def test_a_forward_compiled_by_hand_is_refused_where_it_cannot_be_timed(case_name, monkeypatch):
    from stagetrace.low_level import graph_stamps

    case = tiny.build("llava" if case_name == "vlm" else "llama")
    case.model.forward = torch.compile(case.model.forward, backend="eager")
    kw, match = {"vlm": ({}, "only text-only models"),
                 "prefill_layers": ({"layer_detail": "prefill"}, "run in every forward.*layer_detail='all'"),
                 "no_stamps": ({"layer_detail": "all"}, "need GPU-side stamps: built without.*layer_detail='off'"),
                 "unvalidated_device": ({}, "not yet validated on cpu")}[case_name]
    if case_name == "unvalidated_device":
        monkeypatch.setattr(stagetrace.tracing.compiled, "COMPILED_DECODE_VALIDATED_ON", ())
    if case_name == "no_stamps":
        monkeypatch.setattr(graph_stamps, "stamps_unavailable_reason", lambda device_type: "built without stamps (test)")
    with pytest.raises(TracingError, match=match):
        stagetrace.trace(case.model, **kw).start()
    assert "generate" not in case.model.__dict__ and "forward" in case.model.__dict__


