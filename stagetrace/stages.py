"""Stage math: a pure function from one call's ordered, labelled marks to its stages.

No torch, no model. This is where exactness lives, so what must stay true is:

* every stage is one interval on the one timeline of the call, and the named stages
  never overlap: ``vision + prefill + decode + other == total`` exactly (in ns), and no
  stage is negative — a mark sequence that would break this raises
  :class:`StageOrderError` instead of producing a wrong record;
* ``decode_step_ns`` partitions ``decode_ns`` exactly;
* only marks issued before the first decode forward shape vision and prefill (vision
  that re-runs inside decode steps, e.g. without a cache, belongs to those steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .labels import Kind, index_of, kind_of

__all__ = ["Span", "StageTimes", "StageOrderError", "stages_from_marks"]


class StageOrderError(ValueError):
    """The marks of a call do not form ordered, non-overlapping stages."""


@dataclass(frozen=True)
class Span:
    """A named interval on the call's timeline, ns relative to the call's first mark."""

    name: str
    start_ns: int
    end_ns: int
    depth: int  # 0 call, 1 stage, 2 step or prefill layer, 3 layer inside a step
    device: str | None = None  # the GPU whose work it is, when the model is split over several

    @property
    def dur_ns(self) -> int:
        return self.end_ns - self.start_ns


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
    spans: list[Span] = field(default_factory=list)


def _pair_layers(kinds: np.ndarray, idx: np.ndarray, t: np.ndarray, lo: int, hi: int,
                 depth: int) -> list[Span]:
    # Layers run one after another: a layer that begins closes the one still open. That is
    # how layer_marks="shared" works (one mark per boundary, the last layer's end marked).
    spans: list[Span] = []
    open_at: dict[int, int] = {}
    for p in range(lo, hi):
        if kinds[p] == Kind.LAYER_BEGIN:
            for i, b in list(open_at.items()):
                spans.append(Span(f"layer {i}", int(t[b]), int(t[p]), depth))
                del open_at[i]
            open_at[int(idx[p])] = p
        elif kinds[p] == Kind.LAYER_END and int(idx[p]) in open_at:
            b = open_at.pop(int(idx[p]))
            spans.append(Span(f"layer {int(idx[p])}", int(t[b]), int(t[p]), depth))
    return spans


def stages_from_marks(labels: np.ndarray, device_ns: np.ndarray) -> StageTimes:
    """Stages of one ``generate()`` call from its marks (in issue order)."""
    labels = np.asarray(labels)
    t = np.asarray(device_ns, dtype=np.int64)
    if labels.shape != t.shape:
        raise ValueError(f"labels and times differ in shape: {labels.shape} vs {t.shape}")
    kinds = kind_of(labels)
    idx = index_of(labels)
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

    begin, end = int(t[0]), int(t[-1])
    pos = lambda k: np.flatnonzero(kinds == k)  # noqa: E731
    decode_pos = pos(Kind.DECODE_FORWARD)
    first_decode = int(decode_pos[0]) if len(decode_pos) else n - 1
    before = lambda p: p[p < first_decode]  # noqa: E731

    spans: list[Span] = [Span("generate", begin, end, 0)]

    vb, ve = before(pos(Kind.VISION_BEGIN)), before(pos(Kind.VISION_END))
    vision: tuple[int, int] | None = None
    if len(vb) and len(ve):
        vision = (int(t[vb].min()), int(t[ve].max()))
    elif len(vb) or len(ve):
        raise StageOrderError("vision marks are unpaired: a vision module started without ending or vice versa")

    prefill_fwd = before(pos(Kind.PREFILL_FORWARD))
    if len(prefill_fwd) == 0:
        raise StageOrderError("no prefill forward was marked: generate() ran no forward of the traced model")
    lm_begin, head_end = before(pos(Kind.LM_BEGIN)), before(pos(Kind.LM_HEAD_END))
    p_start = int(t[lm_begin[0]]) if len(lm_begin) else int(t[prefill_fwd[0]])
    if not len(lm_begin) and vision is not None:
        p_start = max(p_start, vision[1])  # without an LM mark, prefill starts after vision
    p_end = int(t[head_end[-1]]) if len(head_end) else int(t[first_decode])
    prefill = (p_start, p_end)

    decode = (int(t[first_decode]), end)
    steps = [int(t[decode_pos[i + 1]] - t[decode_pos[i]]) for i in range(len(decode_pos) - 1)]
    if len(decode_pos):
        steps.append(end - int(t[decode_pos[-1]]))

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

    if vision:
        spans.append(Span("vision", vision[0], vision[1], 1))
    spans.append(Span("prefill", prefill[0], prefill[1], 1))
    spans += _pair_layers(kinds, idx, t, 0, first_decode, 2)
    if len(decode_pos):
        spans.append(Span("decode", decode[0], decode[1], 1))
        bounds = list(decode_pos) + [n - 1]
        for i in range(len(decode_pos)):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            spans.append(Span(f"step {i}", int(t[lo]), int(t[hi]), 2))
            spans += _pair_layers(kinds, idx, t, lo, hi, 3)

    return StageTimes(total_ns=total, vision_ns=vision_ns, prefill_ns=prefill_ns, decode_ns=decode_ns,
                      other_ns=other, ttft_ns=int(t[first_decode]) - begin, decode_step_ns=steps,
                      call_start_ns=begin, spans=spans)
