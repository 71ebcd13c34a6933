"""Stage math: a pure function from one call's ordered, labelled marks to its stages.

No torch, no model. This is where exactness lives, so what must stay true is:

* every stage is one interval on the one timeline of the call, and the named stages
  never overlap: ``vision + prefill + decode + other == total`` exactly (in ns), and no
  stage is negative — a mark sequence that would break this raises
  :class:`StageOrderError` instead of producing a wrong record;
* ``decode_step_ns`` partitions ``decode_ns`` exactly;
* only marks issued before the first decode forward shape vision and prefill (vision
  that re-runs inside decode steps, e.g. without a cache, belongs to those steps);
* prefill never starts before vision ends: a language model that runs the vision part
  inside its own forward has that part counted as vision, once;
* which marks bound each span is decided once; the device times, and the host's issue
  times where given, are read at those marks (``host_spans``), so the host track never
  disagrees with the device track about which span is which;
* a label's flags (``labels.LABEL_FLAGS``) never change its kind or index; a layer span
  bounded by a stamp taken after a matmul says so (``starts_/ends_after_matmul``);
* the walk over the marks runs in C++ (``csrc/stage_rows.cpp``) with the numpy path below
  as its reference twin (tests hold them equal): it runs after every ``generate()``, inside
  the traced call, on a few dozen to hundreds of thousands of marks, and its cost per mark
  is budgeted (``benchmarks/mark_cost.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .labels import Kind, after_matmul, index_of, kind_of
from .low_level import _C
from .spans import KIND_CODE, Span, SpanTable

__all__ = ["Span", "SpanTable", "StageTimes", "StageOrderError", "stages_from_marks"]

_LAYER, _STEP = KIND_CODE["layer"], KIND_CODE["step"]
# the mark kinds as plain ints: an IntEnum member lookup costs about 1 µs (Python 3.11), and
# this runs after every generate() inside the traced call
(_CALL_BEGIN, _CALL_END, _VISION_BEGIN, _VISION_END, _PREFILL_FORWARD, _DECODE_FORWARD, _LM_BEGIN, _LM_HEAD_END,
 _LAYER_BEGIN, _LAYER_END) = (int(k) for k in (
    Kind.CALL_BEGIN, Kind.CALL_END, Kind.VISION_BEGIN, Kind.VISION_END, Kind.PREFILL_FORWARD, Kind.DECODE_FORWARD,
    Kind.LM_BEGIN, Kind.LM_HEAD_END, Kind.LAYER_BEGIN, Kind.LAYER_END))


# the native walk over the marks (None where the extension did not build: the numpy path runs)
_native_rows = getattr(_C, "stage_rows", None)


class StageOrderError(ValueError):
    """The marks of a call do not form ordered, non-overlapping stages."""


@dataclass(frozen=True)
class StageTimes:
    total_ns: int
    vision_ns: int | None           # None: no vision ran in this call
    prefill_ns: int
    decode_ns: int                  # 0 when the call made a single token
    other_ns: int
    ttft_ns: int
    decode_step_ns: list[int]
    call_start_ns: int              # time of the call's first mark on the device timeline
    spans: SpanTable
    host_spans: SpanTable = field(default_factory=SpanTable.empty)  # the same spans on the host clock


def _layer_spans(kinds: np.ndarray, idx: np.ndarray, decode_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(begin mark positions, end mark positions) of the layer spans, in begin order.

    Layers run one after another, so at most one is open: a layer is closed by the next
    layer mark of its region (the prefill, or one decode step) that is either any layer's
    begin (``layer_marks="shared"``: one mark per boundary) or its own end. A layer left
    open at the end of its region gets no span.
    """
    pos = ((kinds == _LAYER_BEGIN) | (kinds == _LAYER_END)).nonzero()[0]
    j = (kinds[pos] == _LAYER_BEGIN).nonzero()[0]
    if not len(j):
        return j, j
    # per layer mark, its region: 0 is everything before the first decode step, k >= 1 is step k - 1
    region = decode_pos.searchsorted(pos, side="right")
    nxt = np.minimum(j + 1, len(pos) - 1)
    closes = ((j + 1 < len(pos)) & (region[nxt] == region[j])
              & ((kinds[pos[nxt]] == _LAYER_BEGIN) | (idx[pos[nxt]] == idx[pos[j]])))
    end = np.where(closes, pos[nxt], -1)
    for k in (~closes).nonzero()[0]:  # rare: another layer's end mark in between (nested layers)
        b = pos[j[k]]
        for m in range(j[k] + 1, len(pos)):
            if region[m] != region[j[k]]:
                break
            if kinds[pos[m]] == _LAYER_BEGIN or idx[pos[m]] == idx[b]:
                end[k] = pos[m]
                break
    keep = end >= 0
    return pos[j][keep], end[keep]


def _frame_error(kinds: np.ndarray) -> StageOrderError:
    n = len(kinds)
    return StageOrderError("a call's marks must start with CALL_BEGIN and end with CALL_END "
                           f"(got {n} marks, first kind {int(kinds[0]) if n else None}, "
                           f"last {int(kinds[-1]) if n else None})")


def _order_error(kinds: np.ndarray, bad: int) -> StageOrderError:
    return StageOrderError(f"mark {bad + 1} ({Kind(int(kinds[bad + 1])).name}) is earlier on the device "
                           f"timeline than mark {bad} ({Kind(int(kinds[bad])).name}): marks of one call must "
                           "be recorded in the order the device runs them (one stream)")


_VISION_UNPAIRED = "vision marks are unpaired: a vision module started without ending or vice versa"
_NO_PREFILL = "no prefill forward was marked: generate() ran no forward of the traced model"


def _first_back(t: np.ndarray) -> int | None:
    """The mark before the first one that is earlier than it on ``t`` (None: ordered)."""
    back = t[1:] < t[:-1]
    return int(back.nonzero()[0][0]) if back.any() else None


@dataclass(frozen=True)
class _Bounds:
    """Which marks bound the call's stages and spans (positions into its marks)."""

    vision: tuple[int, int] | None
    prefill: tuple[int, int]
    first_decode: int               # the first decode step's mark (the return where there is none)
    step_bounds: np.ndarray         # each decode step's start mark, then the call's last mark
    rows: "_SpanRows"


def _bounds_numpy(labels: np.ndarray, t: np.ndarray) -> _Bounds:
    """The reference: numpy over all marks at once (the native ``_C.stage_rows`` is its twin)."""
    kinds = kind_of(labels)
    idx = index_of(labels)
    n = len(kinds)
    if n < 2 or kinds[0] != _CALL_BEGIN or kinds[-1] != _CALL_END:
        raise _frame_error(kinds)
    bad = _first_back(t)
    if bad is not None:
        raise _order_error(kinds, bad)

    decode_pos = (kinds == _DECODE_FORWARD).nonzero()[0]
    first_decode = int(decode_pos[0]) if len(decode_pos) else n - 1
    head = kinds[:first_decode]  # what shapes vision and prefill
    pos = lambda k: (head == k).nonzero()[0]  # noqa: E731

    vb, ve = pos(_VISION_BEGIN), pos(_VISION_END)
    vision: tuple[int, int] | None = None  # (begin, end) mark positions
    if len(vb) and len(ve):
        vision = (int(vb[0]), int(ve[-1]))
    elif len(vb) or len(ve):
        raise StageOrderError(_VISION_UNPAIRED)

    prefill_fwd = pos(_PREFILL_FORWARD)
    if len(prefill_fwd) == 0:
        raise StageOrderError(_NO_PREFILL)
    lm_begin, head_end = pos(_LM_BEGIN), pos(_LM_HEAD_END)
    p_start = int(lm_begin[0]) if len(lm_begin) else int(prefill_fwd[0])
    if vision is not None:
        # Prefill starts after vision: without an LM mark, and where the module whose start
        # marks prefill runs the vision part inside itself (IDEFICS, GIT, a text encoder fed
        # image features): its run before vision ended is vision's, not prefill's. (The
        # later mark is the later time on every clock the marks are ordered on.)
        p_start = max(p_start, vision[1])
    prefill = (p_start, int(head_end[-1]) if len(head_end) else first_decode)
    step_bounds = np.concatenate([decode_pos, [n - 1]])  # step i runs from its DECODE mark to the next (or the return)
    return _Bounds(vision, prefill, first_decode, step_bounds,
                   _span_rows(kinds, idx, vision, prefill, decode_pos, step_bounds))


def _bounds_native(labels: np.ndarray, t: np.ndarray) -> _Bounds:
    """The same as :func:`_bounds_numpy`, walked in C++ (``csrc/stage_rows.cpp``): one call
    instead of some forty numpy operations, after every generate()."""
    (status, at, vb, ve, pb, pe, first_decode, decode_pos, kind, index, depth, begin,
     end) = _native_rows(labels, t)  # type: ignore[misc]
    if status:
        kinds = kind_of(labels)
        if status == 1:
            raise _frame_error(kinds)
        if status == 2:
            raise _order_error(kinds, at)
        raise StageOrderError(_VISION_UNPAIRED if status == 3 else _NO_PREFILL)
    return _Bounds(None if vb < 0 else (vb, ve), (pb, pe), first_decode,
                   np.concatenate([decode_pos, [len(labels) - 1]]), _SpanRows(kind, index, depth, begin, end))


def stages_from_marks(labels: np.ndarray, device_ns: np.ndarray, host_ns: np.ndarray | None = None) -> StageTimes:
    """Stages of one ``generate()`` call from its marks (in issue order).

    ``host_ns`` (relative to the first mark, optional): the same spans on the host clock
    (``StageTimes.host_spans``; empty where the host times do not form ordered stages).
    Which marks bound each span is decided once, from the labels and the device times, and
    both clocks are read at those marks: on any non-decreasing clock that is what the stage
    math gives run on that clock alone (the earliest vision begin is the first one, the
    later of two boundaries the later mark).
    """
    labels = np.asarray(labels)
    t = np.asarray(device_ns, dtype=np.int64)
    if labels.shape != t.shape:
        raise ValueError(f"labels and times differ in shape: {labels.shape} vs {t.shape}")
    b = _bounds_native(labels, t) if _native_rows is not None and labels.ndim == 1 else _bounds_numpy(labels, t)
    vision, prefill, first_decode, step_bounds = b.vision, b.prefill, b.first_decode, b.step_bounds
    n = len(labels)
    chain = [("generate entry", 0)]
    if vision:
        chain += [("vision start", vision[0]), ("vision end", vision[1])]
    chain += [("prefill start", prefill[0]), ("prefill end", prefill[1]),
              ("decode start", first_decode), ("generate return", n - 1)]
    _check_chain(chain, t)

    at = lambda p: int(t[p])  # noqa: E731
    total = at(n - 1) - at(0)
    vision_ns = at(vision[1]) - at(vision[0]) if vision else None
    prefill_ns = at(prefill[1]) - at(prefill[0])
    decode_ns = at(n - 1) - at(first_decode)
    other = total - (vision_ns or 0) - prefill_ns - decode_ns
    moved = after_matmul(labels)
    rows = b.rows if not moved.any() else _SpanRows(b.rows.kind, b.rows.index, b.rows.depth, b.rows.begin,
                                                     b.rows.end, moved)
    host_spans = SpanTable.empty()
    if host_ns is not None:
        h = np.asarray(host_ns, dtype=np.int64)
        try:
            if h.shape != t.shape or _first_back(h) is not None:
                raise StageOrderError("host times out of issue order")
            _check_chain(chain, h)
            host_spans = rows.at(h)
        except StageOrderError:  # host issue order is the mark order; anything else leaves no host spans
            pass
    return StageTimes(total_ns=total, vision_ns=vision_ns, prefill_ns=prefill_ns, decode_ns=decode_ns,
                      other_ns=other, ttft_ns=at(first_decode) - at(0),
                      decode_step_ns=(t[step_bounds[1:]] - t[step_bounds[:-1]]).tolist(), call_start_ns=at(0),
                      spans=rows.at(t), host_spans=host_spans)


def _check_chain(chain: list[tuple[str, int]], t: np.ndarray) -> None:
    """The stage boundaries (mark positions, in stage order) come in time order on ``t``."""
    for (a_name, a), (b_name, b) in zip(chain, chain[1:]):
        if t[b] < t[a]:
            raise StageOrderError(f"stages overlap: {b_name} ({int(t[b])} ns) comes before {a_name} ({int(t[a])} ns); "
                                  "the traced modules do not run in vision -> prefill -> decode order. "
                                  "Check the vision/language_model/lm_head paths passed to stagetrace.trace()")


@dataclass(frozen=True)
class _SpanRows:
    """The spans of a call as the marks that bound them (positions into the call's marks):
    a clock read at those positions gives the span table on that clock. ``moved``: per mark,
    a stamp taken after a layer's last matmul (None: none is)."""

    kind: np.ndarray
    index: np.ndarray
    depth: np.ndarray
    begin: np.ndarray
    end: np.ndarray
    moved: np.ndarray | None = None

    def at(self, t: np.ndarray) -> SpanTable:
        if self.moved is None:
            return SpanTable(self.kind, self.index, t[self.begin], t[self.end], self.depth)
        return SpanTable(self.kind, self.index, t[self.begin], t[self.end], self.depth,
                         starts_after_matmul=self.moved[self.begin], ends_after_matmul=self.moved[self.end])


def _span_rows(kinds: np.ndarray, idx: np.ndarray, vision: tuple[int, int] | None, prefill: tuple[int, int],
               decode_pos: np.ndarray, step_bounds: np.ndarray) -> _SpanRows:
    """The call, its stages, the steps and the layers, in nesting order: generate, vision,
    prefill, prefill layers, decode, then each step followed by its layers."""
    n = len(kinds)
    n_steps = len(decode_pos)
    # (kind, depth, begin, end) of the call and the stages before the layers
    stage_rows = [(KIND_CODE["call"], 0, 0, n - 1)]
    if vision:
        stage_rows.append((KIND_CODE["vision"], 1, *vision))
    stage_rows.append((KIND_CODE["prefill"], 1, *prefill))
    lb, le = _layer_spans(kinds, idx, decode_pos)
    in_prefill = lb < (decode_pos[0] if n_steps else n)  # before the first decode step
    n_pre = int(in_prefill.sum())
    # rows after the prefill: decode, then steps and step layers ordered by their first mark
    order = np.concatenate([decode_pos, lb[~in_prefill]]).argsort(kind="stable")
    n_tail_layers = len(lb) - n_pre
    decode_row = [(KIND_CODE["decode"], 1, int(decode_pos[0]), n - 1)] if n_steps else []
    head = np.array(stage_rows + decode_row, dtype=np.int64).reshape(-1, 4)
    k = len(stage_rows)
    cat = np.concatenate
    return _SpanRows(
        kind=cat([head[:k, 0], np.full(n_pre, _LAYER), head[k:, 0],
                  cat([np.full(n_steps, _STEP), np.full(n_tail_layers, _LAYER)])[order]]),
        index=cat([np.full(k, -1), idx[lb[in_prefill]], np.full(len(head) - k, -1),
                   cat([np.arange(n_steps), idx[lb[~in_prefill]]])[order]]),
        depth=cat([head[:k, 1], np.full(n_pre, 2), head[k:, 1],
                   cat([np.full(n_steps, 2), np.full(n_tail_layers, 3)])[order]]),
        begin=cat([head[:k, 2], lb[in_prefill], head[k:, 2], cat([decode_pos, lb[~in_prefill]])[order]]),
        end=cat([head[:k, 3], le[in_prefill], head[k:, 3], cat([step_bounds[1:], le[~in_prefill]])[order]]))
