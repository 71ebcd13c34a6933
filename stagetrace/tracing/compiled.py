"""Compiled code: is a function compiled, and can a call through it be timed truthfully?

Decisions only: each function returns a reason to refuse (a sentence that finishes the
tracer's error message) or ``None``; nothing here installs anything or changes a tracer.

Two ways a model's forward ends up compiled:

* generate() compiles its own decode step (a static cache): transformers decides that in
  ``_valid_auto_compile_criteria``; the steps are then marked from outside the graph
  (``compiled_decode.py``);
* the user compiled ``model.forward`` by hand: hooks on the top-level module still run
  (outside the compiled forward); everything inside it gets no event marks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..layouts import ResolvedLayout
from ..low_level import graph_stamps

__all__ = ["COMPILED_DECODE_VALIDATED_ON", "is_compiled", "hand_compiled_forwards", "hand_compiled_refusal",
           "compiled_decode_refusal"]

# Device types on which tracing compiled code has been validated: the CPU (dynamo) and CUDA
# (inductor, CUDA-graph replay; tests/test_compiled_gpu.py on an H200).
COMPILED_DECODE_VALIDATED_ON = ("cpu", "cuda")


def is_compiled(fn: Any) -> bool:
    """A torch.compile'd function, a bound method of a torch.compile'd module, or a
    ``functools.wraps`` wrapper around either (e.g. one that calls
    ``torch.compiler.cudagraph_mark_step_begin()`` first)."""
    for _ in range(8):  # a bounded walk down __wrapped__: wrappers may wrap wrappers
        if hasattr(fn, "_torchdynamo_orig_callable") or hasattr(getattr(fn, "__self__", None), "_orig_mod"):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def hand_compiled_forwards(model: torch.nn.Module, layout: ResolvedLayout) -> list[str]:
    """Which of the model's forwards the user compiled by hand (empty: none)."""
    forwards = (("model.forward", model.forward), ("language model forward", layout.language_model[1].forward))
    return [what for what, fn in forwards if is_compiled(fn)]


def _unvalidated(devices: Sequence[torch.device]) -> str | None:
    if len(devices) > 1:
        return f"the model is split over {len(devices)} GPUs, which compiled tracing does not support"
    if devices[0].type in COMPILED_DECODE_VALIDATED_ON:
        return None
    return f"tracing compiled code is not yet validated on {devices[0].type}"


_EVERY_STEP = ("the stamps are part of the compiled forward, so every forward carries them (prefill and decode "
               "alike); use layer_every=1")


def hand_compiled_refusal(layout: ResolvedLayout, devices: Sequence[torch.device], layer_detail: str,
                          layer_every: int = 1) -> str | None:
    """Why a hand-compiled forward cannot be traced as asked (None: it can).

    Layer detail there comes from GPU-side stamps around every layer of every forward,
    each forward's stamps placed from a calibration stamp issued after its top-level
    event. Text-only models only: a vision part may run inside the compiled forward.
    """
    why = (_unvalidated(devices)
           or ("a vision stage may run inside the compiled forward; only text-only models are supported"
               if layout.has_vision else None)
           or ("layer stamps inside a compiled forward run in every forward, prefill and decode alike; "
               "use layer_detail='all' (or 'off')" if layer_detail == "prefill" else None)
           or (_EVERY_STEP if layer_detail == "all" and layer_every > 1 else None))
    if not why and layer_detail == "all":
        no_stamps = graph_stamps.stamps_unavailable_reason(devices[0].type)
        if no_stamps:
            why = f"layer marks inside the compiled graph need GPU-side stamps: {no_stamps}; use layer_detail='off'"
    return why


def compiled_decode_refusal(devices: Sequence[torch.device], layer_detail: str,
                            generation_config: Any) -> str | None:
    """Why a decode step that generate() compiles cannot be traced as asked (None: it can).
    Any ``layer_every`` can: the stamps are put in place per step (``CompiledDecodeMarks``)."""
    why = (_unvalidated(devices)
           or ("chunked prefill is compiled too, so its stage boundaries would sit inside the graph"
               if getattr(generation_config, "prefill_chunk_size", None) else None))
    if not why and layer_detail == "all":
        no_stamps = graph_stamps.stamps_unavailable_reason(devices[0].type)
        if no_stamps:
            why = (f"per-step layer marks inside the compiled graph need GPU-side stamps: {no_stamps}; "
                   "use layer_detail='prefill'")
    return why
