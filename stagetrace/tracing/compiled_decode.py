"""Marks for generate()'s own compiled decode step (a static cache).

transformers compiles ``__call__`` for decode steps when the cache is static (and the
device qualifies); that decision is ``_valid_auto_compile_criteria``, shadowed here for
the traced model only, so the call learns it once. Module hooks inside a compiled region
would be traced by dynamo (marks that never fire, a recompile per call), so for such a
call the coordinator takes the module hooks off before the first decode step
(``before_step``), and each step is marked in ``prepare_inputs_for_generation``, which
runs in the generate loop outside the graph.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from ..labels import Kind, label
from .call import CallSlot
from .errors import TracingError
from .patch import Shadows

__all__ = ["CompiledDecodeMarks"]

_DECODE = label(Kind.DECODE_FORWARD)


class CompiledDecodeMarks:
    """The two wrappers of one tracer. ``refusal(generation_config)`` says why a compiled
    decode cannot be timed (None: it can); ``before_step(stamped)`` runs before the first
    compiled step of a call and before each step that needs the other graph than the step
    before it (it takes the module hooks off, and puts the layer stamps in place exactly for
    the steps that carry layers: with ``layer_every`` N, steps 0, N, 2N, … run the stamped
    graph and the others the bare one — dynamo keeps both after its first use of each);
    ``calibrate(label)`` stamps the GPU-side ring right after the event of each step that
    runs the stamped graph (``CallState.calibrated_steps`` lists them for the merge). A
    step that keeps the graph of the step before it and carries no layers — every
    stage-level step after the first, the bare steps between sampled ones — calls nothing
    but its mark."""

    def __init__(self, model: nn.Module, slot: CallSlot, mark: Callable[[int], None],
                 refusal: Callable[[Any], str | None], stamps_layers: bool, before_step: Callable[[bool], None],
                 calibrate: Callable[[int], None]):
        self.model, self.slot, self._mark = model, slot, mark
        self._refusal, self._stamps_layers = refusal, stamps_layers
        self._before_step, self._calibrate = before_step, calibrate
        self._shadows = Shadows()

    def install(self) -> None:
        decide = getattr(self.model, "_valid_auto_compile_criteria", None)
        if decide is not None:
            self._shadows.set(self.model, "_valid_auto_compile_criteria", self._guard(decide))
        prepare = getattr(self.model, "prepare_inputs_for_generation", None)
        if callable(prepare):
            self._shadows.set(self.model, "prepare_inputs_for_generation", self._step_marks(prepare))

    def remove(self) -> None:
        self._shadows.restore()

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
            return compiles

        return guarded

    def _step_marks(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        slot, mark = self.slot, self._mark

        @functools.wraps(inner)  # generate() inspects this signature (e.g. for inputs_embeds)
        def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> Any:
            c = slot.call
            if c is not None and c.compiled_decode and c.forwards > 0 and c.fed >= c.prompt_len:
                stamped = c.stamping and c.decode_forwards % c.layer_every == 0
                # the layers' forwards change only where the graph does: the first step (the
                # module hooks come off) and, sampled, the steps into and out of the stamped graph
                if not c.module_hooks_off or stamped != c.stamped_graph:
                    self._before_step(stamped)
                    c.module_hooks_off = True  # the graph sees the bare model, or its stamps
                    c.stamped_graph = stamped
                c.in_prefill = False
                c.layers_now = False  # the graph's own stamps mark its layers, if any
                c.decoding = True
                c.forwards += 1
                c.decode_forwards += 1
                mark(_DECODE)
                if stamped:  # calibration: the step's event and the stamps' clock, side by side
                    self._calibrate(_DECODE)
                    c.calibrated_steps.append(c.decode_forwards - 1)
            return inner(*args, **kwargs)

        return prepare_inputs_for_generation
