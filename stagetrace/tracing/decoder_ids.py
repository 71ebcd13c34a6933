"""An encoder–decoder's decoding loop as generate() runs it: which top-level forwards are its, and
the decoder sequence its output is counted against.

The loop prepares every forward's inputs in ``prepare_inputs_for_generation`` (on the host loop,
outside any graph); a top-level forward it did not prepare is none of its prefill or decode steps —
Whisper's own generate() runs one to detect the language (encoder included) before the loop starts —
and is marked as such by the eager hooks (``CallState.prepared``). Each loop's prefill prepares
with ``is_first_iteration`` (GenerationMixin's ``_prefill``), so loops are counted
(``CallState.loops``): Whisper's own generate() runs one per temperature it falls back to and per
30 s segment of long-form audio.

GenerationMixin's generate() returns the decoder prompt it began with (a start token, or
``decoder_input_ids``) and then the new tokens; a model's own generate() may return the new tokens
alone — Whisper's drops its start-of-transcript, language, task and no-timestamps tokens (and a
final EOS). Which one a call returned cannot be told from its length, nor from the prompt alone (a
random-weight Whisper's first new token was its start token). It is told by the running decoder
sequence itself: ``prepare_inputs_for_generation`` receives it at every step, on the host loop
outside any graph; its first value is the prompt and its last the prompt and every new token but
the last. References only (generate() builds a new tensor each step, it never writes one in place);
the output is compared with them after the call (``call.DecoderPromptCheck``).

What must stay true: placed on encoder–decoders only (the top model's own loop: an inner model's
generate() prepares with its own method), it records only while a call is in flight, and costs a
step one Python frame and a few attribute reads and writes; :meth:`remove` undoes exactly what
:meth:`install` did.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from .call import CallSlot
from .patch import Shadows

__all__ = ["DecoderIds"]


class DecoderIds:
    def __init__(self, model: nn.Module, slot: CallSlot):
        self.model, self.slot = model, slot
        self._shadows = Shadows()

    def install(self) -> None:
        prepare = getattr(self.model, "prepare_inputs_for_generation", None)
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False) and callable(prepare):
            self._shadows.set(self.model, "prepare_inputs_for_generation", _recording(prepare, self.slot))

    def remove(self) -> None:
        self._shadows.restore()


def _recording(inner: Callable[..., Any], slot: CallSlot) -> Callable[..., Any]:
    @functools.wraps(inner)  # generate() inspects this signature
    def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> Any:
        c = slot.call
        if c is not None:
            c.prepared = True  # the next top-level forward is the loop's
            ids = args[0] if args else kwargs.get("input_ids")
            # generate()'s prefill prepares with is_first_iteration (each chunk of one prefill: one start)
            if kwargs.get("is_first_iteration"):
                if not c.loop_prefill:
                    c.loops += 1
                    c.decoder_prompt = ids
                c.loop_prefill = True
            else:
                c.loop_prefill = False
            if c.decoder_prompt is None:  # a loop that does not say where it starts
                c.decoder_prompt = ids
            c.decoder_ids = ids
        return inner(*args, **kwargs)

    return prepare_inputs_for_generation
