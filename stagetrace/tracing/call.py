"""One generate() call: what it was given, its state while it runs, and the prefill/decode rule.

The hooks of every mode read and update the one :class:`CallState` of the call in
flight (through a :class:`CallSlot`, a single attribute read on the hot path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CallSlot", "CallState", "CallInputs", "next_forward_is_prefill", "forward_input_len", "read_call_inputs",
           "new_token_count"]


@dataclass
class CallState:
    """State of the generate() call in flight. ``compiled_decode`` and ``stamping`` are
    decided once per call: at its start, or when generate() decides to compile its decode."""

    prompt_len: int
    fed: int                      # tokens the cache holds or has been fed so far
    forward_compiled: bool        # the user compiled the model's forward by hand
    stamping: bool                # layer marks inside compiled code are GPU-side stamps
    compiled_decode: bool = False  # generate() compiles the decode step: steps marked outside the graph
    forwards: int = 0
    in_prefill: bool = False
    decoding: bool = False

    @property
    def compiled(self) -> bool:
        return self.forward_compiled or self.compiled_decode


class CallSlot:
    """Where the hooks find the call in flight (``None`` between calls: hooks do nothing)."""

    __slots__ = ("call",)

    def __init__(self) -> None:
        self.call: CallState | None = None


def next_forward_is_prefill(call: CallState, n_input: int | None) -> bool:
    """Counts one top-level forward of the call; True when it is a prefill forward.

    The rule (verified on transformers 5.x: batch 1/2 with left padding, beam search,
    static and sliding-window caches, M-RoPE, assisted decoding, prompt lookup, chunked
    prefill, ``use_cache=False``, a call continuing from a returned cache): a forward is
    prefill while the tokens fed so far (the cache length at ``generate()`` entry plus
    every prefill forward's input length) are fewer than the prompt, and the first
    forward of a call always is. Once a decode step ran, no later forward is prefill.
    Rules that fail: reading ``cache_position`` (no longer passed), "sequence length > 1"
    (assisted decoding verifies several tokens at once), positions (PaliGemma starts at 1).
    """
    first = call.forwards == 0
    call.forwards += 1
    if first or (not call.decoding and call.fed < call.prompt_len):
        call.fed += call.prompt_len if n_input is None else n_input
        call.in_prefill = True
        return True
    call.in_prefill = False
    call.decoding = True
    return False


def forward_input_len(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Tokens one top-level forward is fed (None where it cannot tell)."""
    x = kwargs.get("input_ids")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
        return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
    return int(x.shape[-1]) if isinstance(x, torch.Tensor) else None


@dataclass(frozen=True)
class CallInputs:
    """What generate() was given, read once at its entry (off the hot path)."""

    prompt_len: int
    batch: int
    cache_len: int        # tokens already in a cache passed in
    has_input_ids: bool   # False: inputs_embeds only (generate then returns new tokens only)


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])  # legacy list of (key, value): (B, H, T, D)
    return 0


def read_call_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInputs:
    input_ids = kwargs.get("input_ids", kwargs.get("inputs"))  # `inputs` is generate()'s own name
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    is_2d = isinstance(prompt, torch.Tensor) and prompt.dim() >= 2
    return CallInputs(prompt_len=int(prompt.shape[1]) if is_2d else 0,
                      batch=int(prompt.shape[0]) if isinstance(prompt, torch.Tensor) and prompt.dim() >= 1 else 1,
                      cache_len=_cache_len(kwargs.get("past_key_values", kwargs.get("cache"))),
                      has_input_ids=input_ids is not None)


def new_token_count(out: Any, inputs: CallInputs) -> int:
    """Tokens generate() produced per sequence, from what it returned."""
    seq = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if not isinstance(seq, torch.Tensor):
        return 0
    if inputs.has_input_ids:
        return int(seq.shape[-1]) - inputs.prompt_len
    return int(seq.shape[-1])  # inputs_embeds only: generate returns the new tokens only
