"""A mark where each top-level forward returns to generate(): the one mark inside a decode
step that is not issued right after a sync, whatever the mode.

``generate()`` reads a GPU value every step (the stopping check), so the queue is empty at
every step's start mark, and a step's lead can only come from marks issued after its work
was: layer marks (layer detail), or this one. It is placed in
``_update_model_kwargs_for_generation``, which generate() calls right after every forward
returns, in the loop on the host — outside any graph, so it serves eager steps and
generate()'s compiled decode (CUDA graphs) alike, at one mark per step. Its lead is how long
the GPU still had to run when the host had issued the whole forward: near zero when the
host was the bottleneck (the GPU waited for each launch), the forward's GPU time when the
host issued it all at once (one graph launch). The stage math ignores it (``stages.py``
reads only boundary kinds); ``lead.py`` reads it.

Sampled (``lead_every`` N): every prefill forward's return is marked, and a decode step's
only on steps 0, N, 2N, … — the steps without it have no lead (``decode_step_lead_us`` is
None there) and the decode stage's GPU-bound share is read over the steps that have one
(``lead.py``). Why sample: under a compiled decode a step is ~3 ms of mostly host work and
this mark, the step's only one besides its start, costs ~12 µs there (``benchmarks/README.md``).

What must stay true: it marks only while a call is in flight, after the call's first
forward and outside a top-level forward (a delegating generate() runs an inner model's
loop; its own method is shadowed the same way); a decode step's return is marked exactly
when its index is a multiple of ``lead_every``; :meth:`remove` undoes exactly what
:meth:`install` did.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from ..labels import Kind, label
from ..layouts import ResolvedLayout
from .call import CallSlot, CallState
from .patch import Shadows

__all__ = ["ForwardReturnMarks", "FORWARD_RETURN_HOOK"]

_RETURN = label(Kind.FORWARD_RETURN)
FORWARD_RETURN_HOOK = "_update_model_kwargs_for_generation"  # generate() calls it after every forward


class ForwardReturnMarks:
    def __init__(self, model: nn.Module, layout: ResolvedLayout, slot: CallSlot, mark: Callable[[int], None],
                 step_returned: Callable[[CallState], None]):
        self.model, self.layout, self.slot, self._mark = model, layout, slot, mark
        self._step_returned = step_returned  # a compiled step run without its input preparation's wrapper
        self._shadows = Shadows()

    def install(self) -> None:
        for owner in [self.model, *(inner for _, inner in self.layout.inner_generators)]:
            method = getattr(owner, FORWARD_RETURN_HOOK, None)
            if callable(method):
                self._shadows.set(owner, FORWARD_RETURN_HOOK, _marking_return(method, self.slot, self._mark,
                                                                                  self._step_returned))

    def remove(self) -> None:
        self._shadows.restore()


def _marking_return(inner: Callable[..., Any], slot: CallSlot, mark: Callable[[int], None],
                    step_returned: Callable[[CallState], None]) -> Callable[..., Any]:
    @functools.wraps(inner)
    def update_model_kwargs(*args: Any, **kwargs: Any) -> Any:
        c = slot.call
        if c is not None:
            if c.prepare_off:  # a compiled step that ran without its input preparation's wrapper: counted now
                step_returned(c)
            # the forward that returned was decode step decode_forwards - 1 (counted at its start)
            if c.forwards > 0 and c.outer_depth == 0 and (not c.decoding or (c.decode_forwards - 1) % c.lead_every == 0):
                mark(_RETURN)
        return inner(*args, **kwargs)

    return update_model_kwargs
