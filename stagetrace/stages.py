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
* the work is vectorized (numpy over all marks at once): it runs after every
  ``generate()``, on up to hundreds of thousands of marks, and its cost per mark is
  budgeted (``benchmarks/mark_cost.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .labels import Kind, index_of, kind_of
from .spans import KIND_CODE, Span, SpanTable

__all__ = ["Span", "SpanTable", "StageTimes", "StageOrderError", "stages_from_marks"]

_LAYER, _STEP = KIND_CODE["layer"], KIND_CODE["step"]


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


def _layer_spans(kinds: np.ndarray, idx: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(begin mark positions, end mark positions) of the layer spans, in begin order.

    Layers run one after another, so at most one is open: a layer is closed by the next
    layer mark of its region (the prefill, or one decode step) that is either any layer's
    begin (``layer_marks="shared"``: one mark per boundary) or its own end. A layer left
    open at the end of its region gets no span.
    """
    pos = np.flatnonzero((kinds == Kind.LAYER_BEGIN) | (kinds == Kind.LAYER_END))
    j = np.flatnonzero(kinds[pos] == Kind.LAYER_BEGIN)
    if not len(j):
        return j, j
    nxt = np.minimum(j + 1, len(pos) - 1)
    closes = ((j + 1 < len(pos)) & (region[pos[nxt]] == region[pos[j]])
              & ((kinds[pos[nxt]] == Kind.LAYER_BEGIN) | (idx[pos[nxt]] == idx[pos[j]])))
    end = np.where(closes, pos[nxt], -1)
    for k in np.flatnonzero(~closes):  # rare: another layer's end mark in between (nested layers)
        b = pos[j[k]]
        for q in pos[j[k] + 1:]:
            if region[q] != region[b]:
                break
            if kinds[q] == Kind.LAYER_BEGIN or idx[q] == idx[b]:
                end[k] = q
                break
    keep = end >= 0
    return pos[j][keep], end[keep]


def _check_marks(labels: np.ndarray, t: np.ndarray, kinds: np.ndarray) -> None:
    """One call, framed by its entry and return marks, in device order — or StageOrderError."""
    if labels.shape != t.shape:
        raise ValueError(f"labels and times differ in shape: {labels.shape} vs {t.shape}")
    n = len(kinds)
    if n < 2 or kinds[0] != Kind.CALL_BEGIN or kinds[-1] != Kind.CALL_END:
        raise StageOrderError("a call's marks must start with CALL_BEGIN and end with CALL_END "
                              f"(got {n} marks, first kind {int(kinds[0]) if n else None}, "
                              f"last {int(kinds[-1]) if n else None})")
    if np.any(np.diff(t) < 0):
        bad = int(np.flatnonzero(np.diff(t) < 0)[0])
        raise StageOrderError(f"mark {bad + 1} ({Kind(int(kinds[bad + 1])).name}) is earlier on the device "
                              f"timeline than mark {bad} ({Kind(int(kinds[bad])).name}): marks of one call must "
                              "be recorded in the order the device runs them (one stream)")


def stages_from_marks(labels: np.ndarray, device_ns: np.ndarray) -> StageTimes:
    """Stages of one ``generate()`` call from its marks (in issue order)."""
    labels = np.asarray(labels)
    t = np.asarray(device_ns, dtype=np.int64)
    kinds = kind_of(labels)
    idx = index_of(labels)
    n = len(kinds)
    _check_marks(labels, t, kinds)

    begin, end = int(t[0]), int(t[-1])
    decode_pos = np.flatnonzero(kinds == Kind.DECODE_FORWARD)
    first_decode = int(decode_pos[0]) if len(decode_pos) else n - 1
    head = kinds[:first_decode]  # what shapes vision and prefill
    pos = lambda k: np.flatnonzero(head == k)  # noqa: E731

    vb, ve = pos(Kind.VISION_BEGIN), pos(Kind.VISION_END)
    vision: tuple[int, int] | None = None
    if len(vb) and len(ve):
        vision = (int(t[vb].min()), int(t[ve].max()))
    elif len(vb) or len(ve):
        raise StageOrderError("vision marks are unpaired: a vision module started without ending or vice versa")

    prefill_fwd = pos(Kind.PREFILL_FORWARD)
    if len(prefill_fwd) == 0:
        raise StageOrderError("no prefill forward was marked: generate() ran no forward of the traced model")
    lm_begin, head_end = pos(Kind.LM_BEGIN), pos(Kind.LM_HEAD_END)
    p_start = int(t[lm_begin[0]]) if len(lm_begin) else int(t[prefill_fwd[0]])
    if vision is not None:
        # Prefill starts after vision: without an LM mark, and where the module whose start
        # marks prefill runs the vision part inside itself (IDEFICS, GIT, a text encoder fed
        # image features): its run before vision ended is vision's, not prefill's.
        p_start = max(p_start, vision[1])
    p_end = int(t[head_end[-1]]) if len(head_end) else int(t[first_decode])
    prefill = (p_start, p_end)

    decode = (int(t[first_decode]), end)
    step_bounds = np.append(decode_pos, n - 1)  # step i runs from its DECODE mark to the next (or the return)
    steps_ns = np.diff(t[step_bounds])

    chain = [("generate entry", begin)]
    if vision:
        chain += [("vision start", vision[0]), ("vision end", vision[1])]
    chain += [("prefill start", prefill[0]), ("prefill end", prefill[1]),
              ("decode start", decode[0]), ("generate return", end)]
    for (a_name, a), (b_name, b) in zip(chain, chain[1:]):
        if b < a:
            raise StageOrderError(f"stages overlap: {b_name} ({b} ns) comes before {a_name} ({a} ns); "
                                  "the traced modules do not run in vision -> prefill -> decode order. "
                                  "Check the vision/language_model/lm_head paths passed to stagetrace.trace()")

    total = end - begin
    vision_ns = vision[1] - vision[0] if vision else None
    prefill_ns = prefill[1] - prefill[0]
    decode_ns = decode[1] - decode[0]
    other = total - (vision_ns or 0) - prefill_ns - decode_ns
    spans = _spans(kinds, idx, t, vision, prefill, decode_pos, step_bounds)
    return StageTimes(total_ns=total, vision_ns=vision_ns, prefill_ns=prefill_ns, decode_ns=decode_ns,
                      other_ns=other, ttft_ns=int(t[first_decode]) - begin,
                      decode_step_ns=steps_ns.tolist(), call_start_ns=begin, spans=spans)


def _spans(kinds: np.ndarray, idx: np.ndarray, t: np.ndarray, vision: tuple[int, int] | None,
           prefill: tuple[int, int], decode_pos: np.ndarray, step_bounds: np.ndarray) -> SpanTable:
    """The call, its stages, the steps and the layers, in nesting order: generate, vision,
    prefill, prefill layers, decode, then each step followed by its layers."""
    n = len(kinds)
    stage_rows = [("call", 0, int(t[0]), int(t[-1]))]
    if vision:
        stage_rows.append(("vision", 1, *vision))
    stage_rows.append(("prefill", 1, *prefill))
    # region 0 is everything before the first decode step, region k >= 1 is step k - 1
    region = np.searchsorted(decode_pos, np.arange(n), side="right")
    lb, le = _layer_spans(kinds, idx, region)
    in_prefill = region[lb] == 0
    n_steps = len(decode_pos)

    # rows after the prefill: decode, then steps and step layers ordered by their first mark
    tail_pos = np.concatenate([decode_pos, lb[~in_prefill]])
    order = np.argsort(tail_pos, kind="stable")
    cols = {
        "kind": np.concatenate([[KIND_CODE[k] for k, *_ in stage_rows], np.full(in_prefill.sum(), _LAYER),
                                [KIND_CODE["decode"]] if n_steps else [],
                                np.concatenate([np.full(n_steps, _STEP), np.full((~in_prefill).sum(), _LAYER)])[order]]),
        "index": np.concatenate([np.full(len(stage_rows), -1), idx[lb[in_prefill]], [-1] if n_steps else [],
                                 np.concatenate([np.arange(n_steps), idx[lb[~in_prefill]]])[order]]),
        "start_ns": np.concatenate([[r[2] for r in stage_rows], t[lb[in_prefill]], [t[decode_pos[0]]] if n_steps else [],
                                    np.concatenate([t[decode_pos], t[lb[~in_prefill]]])[order]]),
        "end_ns": np.concatenate([[r[3] for r in stage_rows], t[le[in_prefill]], [t[-1]] if n_steps else [],
                                  np.concatenate([t[step_bounds[1:]], t[le[~in_prefill]]])[order]]),
        "depth": np.concatenate([[r[1] for r in stage_rows], np.full(in_prefill.sum(), 2), [1] if n_steps else [],
                                 np.concatenate([np.full(n_steps, 2), np.full((~in_prefill).sum(), 3)])[order]]),
    }
    return SpanTable(**cols)
