"""Mark labels: one int32 per mark, ``kind | index << 8``.

The index carries a layer number for layer marks; kinds fit in the low byte.
Changing a kind's value changes saved traces' meaning: append, never renumber.
"""
from __future__ import annotations

import enum

import numpy as np

__all__ = ["Kind", "label", "kind_of", "index_of", "after_matmul", "layer_labels", "AFTER_MATMUL", "MAY_MOVE_TO_MATMUL",
           "LABEL_FLAGS"]

INDEX_SHIFT = 8
# A flag on a layer stamp's label, never part of its kind or index: the stamp was taken right
# after the last matrix multiply of the layer before the boundary, not at the boundary itself
# (layer_marks="matmul" inside compiled code: ``tracing.stamp_placement``). ``kind_of`` and
# ``index_of`` never see it; the stage math reads it (``after_matmul``) to flag the layer spans
# that start or end at such a stamp, and the record counts those stamps.
AFTER_MATMUL = 1 << 29
# A flag on a layer stamp's label as the tracer places it under layer_marks="matmul": the pass
# may move it (the pass swaps it for AFTER_MATMUL where it does). Being part of the label, it
# also keeps such a graph apart from one with the same stamps at the boundaries (dynamo guards
# on the labels, inductor's cache keys on them).
MAY_MOVE_TO_MATMUL = 1 << 28
LABEL_FLAGS = AFTER_MATMUL | MAY_MOVE_TO_MATMUL


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
    FORWARD_RETURN = 11   # a top-level forward returned to generate(): its work is issued, maybe not run
    AUDIO_BEGIN = 12      # a non-vision (audio) encoder starts: no stage of its own, the record says where it ran
    AUDIO_END = 13        # a non-vision (audio) encoder ends
    # a top-level forward that generate()'s decoding loop did not prepare (Whisper's language
    # detection): no prefill or decode step, no stage of its own; the record says where it ran
    AUX_FORWARD_BEGIN = 14
    AUX_FORWARD_END = 15


def label(kind: Kind, index: int = 0) -> int:
    return int(kind) | (index << INDEX_SHIFT)


def kind_of(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels) & 0xFF


def index_of(labels: np.ndarray) -> np.ndarray:
    return (np.asarray(labels) & ~LABEL_FLAGS) >> INDEX_SHIFT


def after_matmul(labels: np.ndarray) -> np.ndarray:
    """Per mark: a stamp taken right after a layer's last matmul, not at its boundary."""
    return (np.asarray(labels) & AFTER_MATMUL) != 0


def layer_labels(n_layers: int, layer_marks: str) -> list[tuple[int, int | None]]:
    """(begin label, end label or None) of each decoder layer.

    ``layer_marks="pair"`` marks both ends of every layer; ``"shared"`` marks one boundary
    between consecutive layers (the next layer's begin ends the previous one) and only the
    last layer's end. The stage math pairs them the same way (``stages._layer_spans``).
    ``"matmul"`` places the labels of ``"shared"`` (inside compiled code its stamps then move
    to each layer's last matmul: ``tracing.stamp_placement``).
    """
    return [(label(Kind.LAYER_BEGIN, i),
             label(Kind.LAYER_END, i) if layer_marks == "pair" or i == n_layers - 1 else None)
            for i in range(n_layers)]
