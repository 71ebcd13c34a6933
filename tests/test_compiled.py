"""Compiled code on the CPU (dynamo): generate()'s own compiled decode and a forward compiled
by hand, traced without graph breaks or recompiles, or refused with the reason."""
from __future__ import annotations

import contextlib
import functools

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


@pytest.mark.parametrize("detail, every, switches, layer_steps, prepared", [
    ("off", 2, [False], [], [False] * 6),
    ("all", 2, [True, False] * 3, [0, 2, 4], [True, False] * 3),  # 7 new tokens: decode steps 0-5
    ("all", 3, [True, False, True, False], [0, 3], [True, False, False] * 2),
    ("all", 1, [True], [0, 1, 2, 3, 4, 5], [True] * 6),
])
def test_a_compiled_step_switches_graphs_only_where_the_graph_changes(detail, every, switches, layer_steps,
                                                                      prepared, monkeypatch):
    """The module hooks come off once per call, before its first compiled step; after it the
    layers' forwards change only on a step into or out of the stamped graph, and only a
    stamped step is calibrated. A step that keeps its graph (stage level after the first, a
    bare step after a bare one) calls nothing but its mark, and runs without the input
    preparation's wrapper: only the stamped steps, whose mark sits beside their calibration,
    are begun there (``prepared``)."""
    from stagetrace.tracing.compiled_decode import CompiledDecodeMarks
    from stagetrace.tracing.stamps import LayerStamps
    from stagetrace.tracing.tracer import Tracer

    seen: list[bool] = []
    calibrated: list[int] = []
    begun: list[bool] = []
    switch, calibrate, begin = Tracer._before_compiled_step, LayerStamps.calibrate, CompiledDecodeMarks._begin_step
    monkeypatch.setattr(Tracer, "_before_compiled_step", lambda self, stamped: seen.append(stamped) or switch(
        self, stamped))
    monkeypatch.setattr(LayerStamps, "calibrate", lambda self, lab: calibrated.append(lab) or calibrate(self, lab))
    monkeypatch.setattr(CompiledDecodeMarks, "_begin_step", lambda self, c, prepared: begun.append(prepared) or begin(
        self, c, prepared))
    case = tiny.build("llama")
    kw = gen_kwargs(case, 7, **static_compiled(case))
    plain = tokens(case.model.generate(**kw))
    before = hook_state(case.model)
    with pytest.warns(UserWarning) if detail == "all" else contextlib.nullcontext():
        with stagetrace.trace(case.model, layer_detail=detail, layer_every=every) as tracer:
            for _ in range(2):
                assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert seen == switches * 2 and hook_state(case.model) == before
    assert len(calibrated) == 2 * len(layer_steps) and begun == prepared * 2
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




# ---------------------------------------------------------------- where a compiled step's mark goes

def test_a_compiled_step_begins_where_the_step_before_it_issued_its_stopping_criteria(monkeypatch):
    """Greedy compiled decode: each step's mark is taken right after the stopping criteria of
    the step before it (or of the prefill) are issued — before generate() reads whether to go
    on, which waits for the GPU — and before that step's input preparation. The call's last stop
    check begins no step: its mark is dropped, so there is one mark per step and the partition
    holds; the record counts the steps that began there. Eager decode is unchanged."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    import time

    stop_ns: list[int] = []
    prepare_ns: list[int] = []

    class Clock(StoppingCriteria):  # a user's own criterion: issued before the mark that follows the list
        def __call__(self, input_ids, scores, **kwargs):
            stop_ns.append(time.monotonic_ns())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    case = tiny.build("llava")
    cls = type(case.model)
    prepare = cls.prepare_inputs_for_generation
    @functools.wraps(prepare)  # generate() reads this signature
    def timed_prepare(self, *args, **kwargs):
        prepare_ns.append(time.monotonic_ns())
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(cls, "prepare_inputs_for_generation", timed_prepare)
    kw = gen_kwargs(case, 6, **static_compiled(case), stopping_criteria=StoppingCriteriaList([Clock()]))
    plain = tokens(case.model.generate(**kw))
    before = hook_state(case.model)
    with stagetrace.trace(case.model) as tracer:
        stop_ns.clear(), prepare_ns.clear()
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
        compiled_stop, compiled_prepare = list(stop_ns), list(prepare_ns)
        assert torch.equal(tokens(case.model.generate(**kw, disable_compile=True)), plain)
    assert hook_state(case.model) == before
    compiled, eager = tracer.records
    for rec in tracer.records:
        assert_partition(rec)
        assert not rec.error and not rec.warnings and len(rec.decode_step_ms) == 5
        assert int((kind_of(rec.marks.labels) == Kind.DECODE_FORWARD).sum()) == 5
    assert compiled.compiled_decode and compiled.decode_steps_from_stop_check == 5
    assert not eager.compiled_decode and eager.decode_steps_from_stop_check == 0
    assert len(compiled_stop) == 6 and len(compiled_prepare) == 6  # the prefill's and each step's
    step_marks = compiled.marks.host_ns[kind_of(compiled.marks.labels) == Kind.DECODE_FORWARD]
    for k, t in enumerate(step_marks):  # between the stop check before step k and step k's preparation
        assert compiled_stop[k] < t < compiled_prepare[k + 1], k
    assert compiled.to_dict()["decode_steps_from_stop_check"] == 5


def test_a_call_its_criteria_stop_early_drops_the_mark_of_its_last_stop_check():
    """A call stopped by a criterion that reads the tokens (not its maximum length) took a mark
    at its last stop check, which begins no step: it is dropped, and the steps are the tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAt(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.length, dtype=torch.bool,
                              device=input_ids.device)

    case = tiny.build("llama")
    prompt = case.inputs["input_ids"].shape[-1]
    kw = gen_kwargs(case, 8, **static_compiled(case))
    kw.pop("min_new_tokens")
    kw["stopping_criteria"] = StoppingCriteriaList([StopAt(prompt + 4)])
    plain = tokens(case.model.generate(**kw))
    assert plain.shape[-1] == prompt + 4
    with stagetrace.trace(case.model) as tracer:
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
    rec = tracer.records[0]
    assert_partition(rec)
    assert not rec.error and not rec.warnings and rec.output_tokens == 4
    assert rec.decode_steps_from_stop_check == len(rec.decode_step_ms) == 3
    assert int((kind_of(rec.marks.labels) == Kind.DECODE_FORWARD).sum()) == 3 and rec.n_marks == len(rec.marks)


def test_beam_search_takes_no_stop_check_marks():
    """Beam search reorders its beams after the stopping criteria, so a mark there would not be
    the next step's start: transformers decodes beams eagerly even with a static cache (its
    steps are marked at their forwards), and were it to compile them the call's
    ``stop_check_marks`` would be off (the unit test below). No stop-check mark is left."""
    case = tiny.build("llama")
    kw = gen_kwargs(case, 5, **static_compiled(case), num_beams=2)
    plain = tokens(case.model.generate(**kw))
    with stagetrace.trace(case.model) as tracer:
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
    rec = tracer.records[0]
    assert_partition(rec)
    assert rec.decode_steps_from_stop_check == 0 and not rec.error
    assert int((kind_of(rec.marks.labels) == Kind.DECODE_FORWARD).sum()) == len(rec.decode_step_ms) == 4


class _Loop:
    """A decoding loop driven by hand: a model with generate()'s two methods the marks wrap."""

    def __init__(self, criteria=()):
        from stagetrace.low_level import PyHostTimeline
        from stagetrace.tracing.call import CallSlot, CallState
        from stagetrace.tracing.compiled_decode import CompiledDecodeMarks
        from transformers import StoppingCriteriaList

        class Model(nn.Module):
            def prepare_inputs_for_generation(self, *args, **kwargs):
                return {}

            def _get_stopping_criteria(self, *args, **kwargs):
                return StoppingCriteriaList(criteria)

        self.model, self.tl, self.slot = Model(), PyHostTimeline(), CallSlot()
        self.marks = CompiledDecodeMarks(self.model, self.slot, self.tl.mark, refusal=lambda cfg: None,
                                         stamps_layers=False, before_step=lambda stamped: None,
                                         calibrate=lambda lab: None, marks_so_far=self.tl.__len__)
        self.marks.install()
        self.call = self.slot.call = CallState(prompt_len=3, fed=3, forward_compiled=False, stamping=False,
                                               forwards=1, compiled_decode=True, stop_check_marks=True)
        self.stops = self.model._get_stopping_criteria()

    def check(self, length=4):
        self.stops(torch.zeros(1, length, dtype=torch.long), torch.zeros(1, 8))

    def step(self):
        """generate()'s order: the input preparation, the forward, then its return (where a step run
        without the preparation's wrapper is counted: the forward-return hook's first call)."""
        self.model.prepare_inputs_for_generation()
        if self.call.prepare_off:
            self.marks.step_returned(self.call)

    def wrapped(self):
        return "prepare_inputs_for_generation" in self.model.__dict__

    def kinds(self):
        from stagetrace.labels import kind_of
        return [Kind(int(k)).name for k in kind_of(self.tl.resolve()[0])]


def test_a_stop_check_mark_begins_a_step_only_as_the_one_mark_right_before_it():
    loop = _Loop()
    c = loop.call
    assert loop.wrapped()
    loop.check()                               # one check: the step needs nothing of its preparation's wrapper
    assert not loop.wrapped() and c.prepare_off and c.module_hooks_off  # the first step's switch made here
    loop.step()                                # used: counted at its forward's return
    assert c.steps_from_stop_check == 1 and c.decode_forwards == 1
    loop.check(), loop.check()                 # two checks (a loop that checks twice): both stale ...
    assert loop.wrapped() and not c.prepare_off
    loop.step()                                # ... and the step marked at its preparation
    loop.check(), loop.tl.mark(int(Kind.FORWARD_RETURN)), loop.step()  # something marked after it: stale,
    assert c.unmarked_steps == 1               # and the step, run without the wrapper, has no start: said
    loop.check()                               # the last check: no step follows
    assert c.steps_from_stop_check == 1 and c.decode_forwards == 3
    assert loop.kinds() == ["DECODE_FORWARD", "DECODE_FORWARD", "DECODE_FORWARD", "DECODE_FORWARD",
                            "DECODE_FORWARD", "FORWARD_RETURN", "DECODE_FORWARD"]
    assert c.unused_marks() == [1, 2, 4, 6]
    loop.marks.end_call(c)                     # the wrapper is back for the next call
    assert loop.wrapped() and not c.prepare_off
    loop.marks.remove()
    assert "_get_stopping_criteria" not in loop.model.__dict__ and not loop.wrapped()


def test_a_step_begun_with_no_mark_fails_its_record():
    """By construction nothing marks between a stop check and the step it marked; were something
    to, the step run without its preparation's wrapper would have no start: the record says its
    stages are unknown rather than placing one."""
    case = tiny.build("llama")
    kw = gen_kwargs(case, 5, **static_compiled(case))
    model = case.model
    with stagetrace.trace(model) as tracer:
        inner = model._has_unfinished_sequences  # generate() reads it between a step's stop check and the next step

        def marking(*args, **kwargs):
            if tracer._slot.call is not None and tracer._slot.call.decode_forwards == 2:
                tracer._timeline.mark(int(Kind.FORWARD_RETURN))
            return inner(*args, **kwargs)

        model._has_unfinished_sequences = marking
        try:
            with pytest.warns(RuntimeWarning, match="began with no mark"):
                model.generate(**kw)
                rec = tracer.records[0]
        finally:
            del model._has_unfinished_sequences
        model.generate(**kw)  # the next call is timed as usual
    assert rec.error and "cannot be told apart" in rec.error
    ok = tracer.records[1]
    assert not ok.error and ok.compiled_decode and ok.decode_steps_from_stop_check == len(ok.decode_step_ms) == 4


@pytest.mark.parametrize("change", ["eager", "beams", "stamped", "prefill", "max_length"])
def test_a_stop_check_takes_no_mark_where_no_compiled_step_may_follow_it(change):
    from transformers import MaxLengthCriteria

    loop = _Loop([MaxLengthCriteria(max_length=4)] if change == "max_length" else [])
    c = loop.call
    if change == "eager":
        c.compiled_decode = False
    elif change == "beams":
        c.stop_check_marks = False
    elif change == "stamped":  # the next step runs the stamped graph: its mark goes beside its calibration
        c.stamping, c.layer_every = True, 2
    elif change == "prefill":
        c.fed = 1  # the prompt is not fed yet
    loop.check(length=4)  # "max_length": the loop stops here whatever the GPU says
    assert len(loop.tl) == 0 and c.early_step_mark == -1
    if change == "max_length":
        loop.check(length=3)  # one token short of it: the next step may follow
        assert len(loop.tl) == 1 and c.early_step_mark == 0
        assert isinstance(loop.stops[0], MaxLengthCriteria)



def test_the_criteria_generate_gets_keep_their_type_and_contents():
    from transformers import MaxLengthCriteria, StoppingCriteriaList
    from stagetrace.tracing.compiled_decode import _with_mark_after

    called = []
    given = StoppingCriteriaList([MaxLengthCriteria(max_length=5)])
    wrapped = _with_mark_after(given, lambda length, max_length: called.append((length, max_length)))
    assert isinstance(wrapped, StoppingCriteriaList) and list(wrapped) == list(given) and wrapped.max_length == 5
    done = wrapped(torch.zeros(2, 5, dtype=torch.long), None)
    assert done.tolist() == [True, True] and called == [(5, 5)]
    other = object()
    assert _with_mark_after(other, lambda: None) is other


def test_layers_whose_forward_is_an_instance_attribute_carry_their_stamps_over_it():
    """A forward already set on the layer instance (accelerate's hooks, a user's wrapper): the
    stamps wrap it for the stamped steps and the user's own attribute comes back after."""
    case = tiny.build("llama")
    layers = [m for m in case.model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        inner = layer.forward
        layer.forward = functools.wraps(inner)(lambda *a, _inner=inner, **k: _inner(*a, **k))
    own = [vars(layer)["forward"] for layer in layers]
    kw = gen_kwargs(case, 5, **static_compiled(case))
    plain = tokens(case.model.generate(**kw))
    with pytest.warns(UserWarning):
        with stagetrace.trace(case.model, layer_detail="all", layer_every=2) as tracer:
            assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert [vars(layer)["forward"] for layer in layers] == own
    rec = tracer.records[0]
    assert_partition(rec)
    assert not rec.error and rec.layer_steps == [0, 2]
    assert len([s for s in rec.spans if s.kind == "layer" and s.depth == 3]) == 2 * len(layers)


def _switches_after_the_first_step(n_steps: int, every: int) -> int:
    stamped = [k % every == 0 for k in range(n_steps)]
    return sum(stamped[k] != stamped[k - 1] for k in range(1, n_steps))


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_warmed_guards_change_nothing_a_call_computes_or_records(monkeypatch, every, device):
    """WARM_GUARDS (guard_warm.py, on by default): after a call's first step every switch between
    the bare and the stamped graph is made at the stop check before its step, where the next
    graph's guards are checked with the last compiled call's locals — and an entry passes there
    (the frame and its locals were rebuilt right: its whole guard tree was read). Tokens, records
    and the model after the calls are those of the same calls without it."""
    import torch._dynamo

    from stagetrace.tracing import compiled_decode

    assert compiled_decode.WARM_GUARDS  # the default
    torch._dynamo.reset()  # the frame's code is shared by every tiny model compiled before: its limit of entries
    case = build_on("llama", device)
    new_tokens = 9  # 8 decode steps
    kw = gen_kwargs(case, new_tokens, **static_compiled(case, device))
    plain = tokens(case.model.generate(**kw))
    before = hook_state(case.model)

    def traced() -> tuple[stagetrace.Tracer, list[torch.Tensor]]:
        with pytest.warns(UserWarning):
            with stagetrace.trace(case.model, layer_detail="all", layer_every=every) as tracer:
                out = [tokens(case.model.generate(**kw)) for _ in range(2)]
        assert hook_state(case.model) == before
        return tracer, out

    warmed, warmed_tokens = traced()
    monkeypatch.setattr(compiled_decode, "WARM_GUARDS", False)
    unwarmed, unwarmed_tokens = traced()
    # the stamped graph is the same graph either way; against the untraced run only where stamps
    # cannot change the rounding (on a GPU the stamped graph's fusions differ: README, Known issues)
    for w, u in zip(warmed_tokens, unwarmed_tokens):
        assert torch.equal(w, u)
        if device == "cpu":
            assert torch.equal(w, plain)
    warmer = warmed._decode.warmer
    assert not unwarmed._decode.warmer.warmed
    assert warmer.warmed == 2 * _switches_after_the_first_step(new_tokens - 1, every)
    assert warmer.passed == warmer.warmed and not warmer.off and warmer._last is None
    for a, b in zip(unwarmed.records, warmed.records):
        assert_partition(b)
        assert not b.error and b.layer_steps == a.layer_steps == list(range(0, new_tokens - 1, every))
        assert [(s.kind, s.name, s.depth) for s in b.spans] == [(s.kind, s.name, s.depth) for s in a.spans]
        assert b.decode_steps_from_stop_check == a.decode_steps_from_stop_check > 0


@pytest.mark.parametrize("detail, every, captures", [("all", 2, True), ("all", 1, False), ("prefill", 1, False),
                                                      ("off", 1, False)])
def test_only_sampled_stamps_capture_the_compiled_calls_inputs(detail, every, captures):
    """Warming needs the last compiled call's inputs only where steps switch between two graphs
    (layer_every > 1); elsewhere ``get_compiled_call`` is left as it is, so no step pays a frame
    for a capture that would never be used."""
    case = tiny.build("llama")
    assert "get_compiled_call" not in vars(case.model)
    with stagetrace.trace(case.model, layer_detail=detail, layer_every=every) as tracer:
        assert ("get_compiled_call" in vars(case.model)) == captures
        assert tracer._decode._warms == captures
    assert "get_compiled_call" not in vars(case.model)


def test_warming_that_fails_turns_itself_off_and_changes_nothing(monkeypatch):
    """Warming reads dynamo's private structures: where they are not what it expects, the first
    failure turns it off for the tracer and the call goes on as without it."""
    import torch._dynamo.eval_frame as eval_frame

    from stagetrace.tracing import compiled_decode

    case = tiny.build("llama")
    kw = gen_kwargs(case, 7, **static_compiled(case))
    plain = tokens(case.model.generate(**kw))
    assert compiled_decode.WARM_GUARDS  # the default

    def gone(code):
        raise AttributeError("no cache entries here")

    monkeypatch.setattr(eval_frame, "_debug_get_cache_entry_list", gone)
    with pytest.warns(UserWarning):
        with stagetrace.trace(case.model, layer_detail="all", layer_every=2) as tracer:
            assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert tracer._decode.warmer.off and tracer._decode.warmer.passed == 0
    (rec,) = tracer.records
    assert_partition(rec)
    assert not rec.error and rec.layer_steps == [0, 2, 4]


def test_stamped_steps_that_dynamo_runs_eagerly_are_said_in_the_record():
    """Dynamo counts its recompile limit per forward function, which transformers' models share; a
    stamped graph is one more entry. Past the limit dynamo runs the step eagerly: the stamps still
    come (launched from Python), but the step and its layers are an eager step's, which an
    untraced call does not run — the record says so. Where the stamped graph compiles, it says
    nothing (its wrappers never run as Python)."""
    import torch._dynamo

    case = tiny.build("llama")
    kw = gen_kwargs(case, 9, **static_compiled(case))
    n_layers = len(stagetrace.trace(case.model).layout.layers)

    def traced_warnings() -> list[str]:
        with pytest.warns(UserWarning):
            with stagetrace.trace(case.model, layer_detail="all", layer_every=4) as tracer:
                case.model.generate(**kw)
        (rec,) = tracer.records
        assert_partition(rec)
        assert not rec.error and rec.layer_steps == [0, 4]
        return [w for w in rec.warnings if "outside a compiled graph" in w]

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    case.model.generate(**kw)  # the bare graph compiled
    assert traced_warnings() == []
    assert not counters["graph_break"]  # the wrappers' check is folded away: one graph per variant
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        case.model.generate(**kw)  # the bare graph takes the one entry allowed
        with pytest.warns(RuntimeWarning, match="outside a compiled graph"):
            (said,) = traced_warnings()
    assert said.startswith(f"{2 * n_layers} layer forwards") and "recompile_limit" in said
    torch._dynamo.reset()
