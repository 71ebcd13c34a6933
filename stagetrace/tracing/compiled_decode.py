"""Marks for generate()'s own compiled decode step (a static cache).

transformers compiles ``__call__`` for decode steps when the cache is static (and the
device qualifies); that decision is ``_valid_auto_compile_criteria``, shadowed here for
the traced model only, so the call learns it once. Module hooks inside a compiled region
would be traced by dynamo (marks that never fire, a recompile per call), so for such a
call the coordinator takes the module hooks off before the first decode step
(``before_step``), and each step is marked outside the graph, in the generate loop (where: below).

Where a step's mark goes. generate() ends every step by issuing its stopping criteria, then
reads on the host whether to go on: a sync, after which the GPU waits, idle, for the host to
prepare the next step. A mark taken in ``prepare_inputs_for_generation`` sits in that idle
wait, so its host cost (10–11 µs in context, measured) is added to the call. For greedy and
sampled decoding the next step's mark is taken instead right where the stopping criteria
return: the same place in the stream up to the few small kernels generate() issues after them
(the stop flag), but issued while the GPU still runs the step, off the call's critical path.
The step then begins when the step before it finished its work on the GPU, the host's idle
wait included, rather than partway into that wait. Each such mark is provisional until the
step's input preparation: it is that step's start only if it is the one stop-check mark
since the last step began and nothing was marked after it; every other one (the call's last
stop check where it did not stop at its maximum length, a loop that checks twice) begins no
step and is dropped before the stage math (``CallState.unused_marks``); at the maximum length
no mark is taken. A step that carries layer stamps keeps its mark at the input
preparation, beside its calibration stamp.

What the input preparation's wrapper is left with. Everything between generate()'s stop-flag
sync and the compiled call's graph launch is on the call's critical path (the GPU is idle), and
a wrapper frame that forwards generate()'s keyword arguments costs 3–6 µs there on an H200 host
(``benchmarks/README.md``, session 15). So a step that needs nothing of its input preparation —
one whose mark the stop check before it took, which runs the graph the step before it ran, and
after which no second stop check came — runs without the wrapper: the stop check before it takes
it off the model (one instance-dict write, ``_prepare_wrapped``) and the step's bookkeeping runs
where its forward returns to generate() (``step_returned``, called by ``forward_return.py``),
while the GPU runs the step. The first step's module hooks come off at the prefill's stop check
for the same reason. The wrapper is back on for a step that needs it (its mark or calibration,
a switch of graph not made ahead) and at the end of every call. What must stay true: a step
without the wrapper is counted and its mark confirmed at its forward's return, before anything
else there reads the call's counters; a mark taken between its stop check and its forward (none
is, by construction) leaves the step without a start, which its record says
(``CallState.unmarked_steps``) rather than placing one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from ..labels import Kind, label
from .call import CallSlot, CallState
from .errors import TracingError
from .guard_warm import GuardWarmer
from .patch import Shadows

__all__ = ["CompiledDecodeMarks", "WARM_GUARDS"]

_DECODE = label(Kind.DECODE_FORWARD)
_PREPARE = "prepare_inputs_for_generation"

# With sampled layer stamps, the switch to the next step's graph made at the stop check before it,
# and that graph's guard check run there (guard_warm.py). On since session 14, from its measurement
# on an H200 (benchmarks/README.md): the stamped step's cache lookup 281 µs against 399 without
# (layer_every=4), a decode step 21–29 µs shorter (median) and a layer_every=8 call 0.89 ms shorter
# [0.16, 1.50] over 100 repetitions. Off only to measure without it.
WARM_GUARDS = True


class CompiledDecodeMarks:
    """The two wrappers of one tracer. ``refusal(generation_config)`` says why a compiled
    decode cannot be timed (None: it can); ``before_step(stamped)`` runs before the first
    compiled step of a call and before each step that needs the other graph than the step
    before it (it takes the module hooks off, and puts the layer stamps in place exactly for
    the steps that carry layers: with ``layer_every`` N, steps 0, N, 2N, … run the stamped
    graph and the others the bare one — dynamo keeps both after its first use of each; with
    ``WARM_GUARDS`` a switch is made at the stop check before the step instead, and the next
    graph's guards checked there, guard_warm.py);
    ``calibrate(label)`` stamps the GPU-side ring right after the event of each step that
    runs the stamped graph (``CallState.calibrated_steps`` lists them for the merge). A
    step that keeps the graph of the step before it and carries no layers — every
    stage-level step after the first, the bare steps between sampled ones — calls nothing
    but its mark."""

    def __init__(self, model: nn.Module, slot: CallSlot, mark: Callable[[int], None],
                 refusal: Callable[[Any], str | None], stamps_layers: bool, before_step: Callable[[bool], None],
                 calibrate: Callable[[int], None], marks_so_far: Callable[[], int], switches_graphs: bool = False):
        self.model, self.slot, self._mark, self._marks_so_far = model, slot, mark, marks_so_far
        self._refusal, self._stamps_layers = refusal, stamps_layers
        # sampled stamps (layer detail with layer_every > 1): steps switch between the bare and the
        # stamped graph, so there is a next graph to warm; with stamps on every step there is none,
        # and the capture of each compiled call's inputs would be a frame per step for nothing
        self._switches_graphs = switches_graphs
        self._before_step, self._calibrate = before_step, calibrate
        self._shadows = Shadows()
        self.warmer = GuardWarmer(model)
        self._warms = False  # read from WARM_GUARDS at install()
        # the input preparation's wrapper, and what the model's own __dict__ held under its name
        # before it (None: nothing, the class's method shows through)
        self._prepare_wrapper: Callable[..., Any] | None = None
        self._under_prepare: Any = None

    def install(self) -> None:
        decide = getattr(self.model, "_valid_auto_compile_criteria", None)
        if decide is not None:
            self._shadows.set(self.model, "_valid_auto_compile_criteria", self._guard(decide))
        prepare = getattr(self.model, _PREPARE, None)
        if callable(prepare):
            self._under_prepare = self.model.__dict__.get(_PREPARE)
            self._prepare_wrapper = self._step_marks(prepare)
            self._shadows.set(self.model, _PREPARE, self._prepare_wrapper)
        stops = getattr(self.model, "_get_stopping_criteria", None)
        if callable(stops):
            self._shadows.set(self.model, "_get_stopping_criteria", self._marking_stops(stops))
        get_compiled_call = getattr(self.model, "get_compiled_call", None)
        self._warms = WARM_GUARDS and self._switches_graphs and callable(stops) and callable(get_compiled_call)
        if self._warms:
            self._shadows.set(self.model, "get_compiled_call", self.warmer.capturing(get_compiled_call))

    def remove(self) -> None:
        self._shadows.restore()
        self.warmer.forget()

    def end_call(self, call: CallState) -> None:
        self._prepare_wrapped(call, True)  # the next call's steps start from it in place
        self.warmer.forget()  # the call's inputs are not kept past it

    def _prepare_wrapped(self, c: CallState, wrapped: bool) -> None:
        """The input preparation's wrapper on the model (True) or off it for the next step
        (False). Only this wrapper itself comes off, and only where it is the model's own
        attribute: another wrapper placed over it (an encoder–decoder's decoder ids, a user's)
        keeps it on. A plain dict write: nn.Module.__setattr__ costs 25 times as much."""
        if wrapped == (not c.prepare_off):
            return
        d = self.model.__dict__
        if wrapped:
            d[_PREPARE] = self._prepare_wrapper
            c.prepare_off = False
        elif self._prepare_wrapper is not None and d.get(_PREPARE) is self._prepare_wrapper:
            if self._under_prepare is None:
                del d[_PREPARE]
            else:
                d[_PREPARE] = self._under_prepare
            c.prepare_off = True

    def _guard(self, decide: Callable[..., Any]) -> Callable[..., bool]:
        slot = self.slot

        def guarded(*args: Any, **kwargs: Any) -> bool:
            compiles = bool(decide(*args, **kwargs))
            call = slot.call
            if compiles and call is not None and not call.compiled_decode:
                gen_config = args[1] if len(args) > 1 else kwargs.get("generation_config")
                why = self._refusal(gen_config)
                if why:
                    raise TracingError(f"generate() compiles the decode step (a static cache) and {why}. "
                                       "Trace it eagerly with generate(..., disable_compile=True)")
                call.compiled_decode = True  # decided once per call
                call.stamping = self._stamps_layers
                call.lead_every = call.compiled_lead_every
                # greedy or sampled: nothing but the stop flag is issued between a step's stopping
                # criteria and the next step's inputs (beam search reorders its beams after them)
                call.stop_check_marks = getattr(gen_config, "num_beams", 1) in (1, None)
            return compiles

        return guarded

    def _step_marks(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        slot = self.slot

        @functools.wraps(inner)  # generate() inspects this signature (e.g. for inputs_embeds)
        def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> Any:
            c = slot.call
            if c is not None and c.compiled_decode and c.forwards > 0 and c.fed >= c.prompt_len:
                self._begin_step(c, prepared=True)
            return inner(*args, **kwargs)

        return prepare_inputs_for_generation

    def step_returned(self, c: CallState) -> None:
        """A compiled step that ran without the input preparation's wrapper returned to
        generate(): its bookkeeping, now (the forward-return hook calls this first)."""
        self._begin_step(c, prepared=False)

    def _begin_step(self, c: CallState, prepared: bool) -> None:
        """A compiled decode step began: at its input preparation (``prepared``), or, without
        the wrapper there, counted where its forward returned (its mark was taken before it)."""
        stamped = c.stamping and c.decode_forwards % c.layer_every == 0
        # the layers' forwards change only where the graph does: the first step (the module
        # hooks come off) and, sampled, the steps into and out of the stamped graph; a step
        # without the wrapper had both done at the stop check before it
        if prepared and (not c.module_hooks_off or stamped != c.stamped_graph):
            self._before_step(stamped)
            c.module_hooks_off = True  # the graph sees the bare model, or its stamps
            c.stamped_graph = stamped
        c.in_prefill = False
        c.layers_now = False  # the graph's own stamps mark its layers, if any
        c.decoding = True
        c.forwards += 1
        c.decode_forwards += 1
        early = c.early_step_mark
        if early >= 0 and c.early_marks == 1 and early == self._marks_so_far() - 1:
            c.steps_from_stop_check += 1  # this step began where the last one's stopping criteria returned
        else:
            if early >= 0:
                c.stale_marks.append(early)
            if prepared:
                self._mark(_DECODE)
            else:  # its start was not marked (a mark came between its stop check and its forward)
                c.unmarked_steps += 1
        c.early_step_mark, c.early_marks = -1, 0
        if stamped and prepared:  # calibration: the step's event and the stamps' clock, side by side
            self._calibrate(_DECODE)
            c.calibrated_steps.append(c.decode_forwards - 1)

    def _marking_stops(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(inner)
        def _get_stopping_criteria(*args: Any, **kwargs: Any) -> Any:
            criteria = inner(*args, **kwargs)
            return _with_mark_after(criteria, self._after_stop_check)

        return _get_stopping_criteria

    def _after_stop_check(self, length: int, max_length: int | None) -> None:
        """The stopping criteria of a step (or of the prefill) were issued on sequences of
        ``length`` tokens: the next step's mark, provisionally, while the GPU still runs this one
        (see the module's docstring). None where the sequences reached ``max_length``: the loop
        stops there whatever the GPU says, so no step follows."""
        c = self.slot.call
        if c is None or not c.compiled_decode or not c.stop_check_marks or c.forwards == 0 or c.fed < c.prompt_len:
            return
        if max_length is not None and length >= max_length:
            return
        stamped_next = c.stamping and c.decode_forwards % c.layer_every == 0
        if not c.module_hooks_off:
            # the first decode step follows: the module hooks come off now, while the GPU runs the
            # prefill, rather than at the step's input preparation, after the wait
            self._before_step(stamped_next)
            c.module_hooks_off = True
            c.stamped_graph = stamped_next
        elif self._warms and stamped_next != c.stamped_graph:
            # the next step runs the other graph: its layers' forwards now, and its guards checked
            # ahead, while the host waits for the GPU (guard_warm.py); prepare_inputs then finds it done
            self._before_step(stamped_next)
            c.stamped_graph = stamped_next
            self.warmer.warm()
        if stamped_next:
            # the next step runs the stamped graph: its mark stays beside its calibration stamp
            self._prepare_wrapped(c, True)
            return
        if c.early_step_mark >= 0:
            c.stale_marks.append(c.early_step_mark)
        c.early_step_mark = self._marks_so_far()
        c.early_marks += 1
        self._mark(_DECODE)
        # the next step needs its input preparation's wrapper only to switch graphs (not made
        # ahead) or to mark it (a loop that checked twice: the mark is taken there)
        self._prepare_wrapped(c, stamped_next != c.stamped_graph or c.early_marks != 1)


_MARKING_TYPES: dict[type, type] = {}


def _with_mark_after(criteria: Any, after: Callable[[int, int | None], None]) -> Any:
    """``criteria`` (a StoppingCriteriaList, a list subclass generate() calls once per step) as an
    instance of a subclass of its own type that calls ``after(length, max_length)`` once they have
    been issued on sequences of ``length`` tokens (``max_length``: where its maximum-length
    criterion stops the loop, None: none). Anything else comes back as it is: its steps are
    marked at their input preparation."""
    cls = type(criteria)
    if not isinstance(criteria, list) or not callable(getattr(cls, "__call__", None)):
        return criteria
    marking = _MARKING_TYPES.get(cls)
    if marking is None:
        def __call__(self: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
            done = cls.__call__(self, input_ids, *args, **kwargs)
            self._stagetrace_after(int(input_ids.shape[-1]), self._stagetrace_max_length)
            return done

        marking = _MARKING_TYPES[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    wrapped = marking(criteria)
    wrapped.__dict__.update(getattr(criteria, "__dict__", {}))
    wrapped._stagetrace_after = after
    max_length = getattr(criteria, "max_length", None)  # read once: the property walks the list
    wrapped._stagetrace_max_length = max_length if isinstance(max_length, int) else None
    return wrapped
