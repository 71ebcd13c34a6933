"""Mark labels: one int32 per mark, ``kind | index << 8``.

The index carries a layer number for layer marks; kinds fit in the low byte.
Changing a kind's value changes saved traces' meaning: append, never renumber.
"""
from __future__ import annotations

import enum

import numpy as np

__all__ = ["Kind", "label", "kind_of", "index_of"]

INDEX_SHIFT = 8


class Kind(enum.IntEnum):
    CALL_BEGIN = 1        # generate() entry
    CALL_END = 2          # generate() return
    VISION_BEGIN = 3      # a vision module starts
    VISION_END = 4        # a vision module ends
    PREFILL_FORWARD = 5   # a top-level forward that fills the cache starts
    DECODE_FORWARD = 6    # a top-level forward that makes one decode step starts
    LM_BEGIN = 7          # the language model starts (in a prefill forward)
    LM_HEAD_END = 8       # lm_head ends (in a prefill forward)
    LAYER_BEGIN = 9       # decoder layer <index> starts (layer detail)
    LAYER_END = 10        # decoder layer <index> ends (layer detail)


def label(kind: Kind, index: int = 0) -> int:
    return int(kind) | (index << INDEX_SHIFT)


def kind_of(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels) & 0xFF


def index_of(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels) >> INDEX_SHIFT
