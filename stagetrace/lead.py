"""How far the GPU runs behind the host, stage by stage: a pure function of one call's marks.

Every mark has two times: when the host issued it and when the GPU reached it. On the
call's aligned clock (the first mark's GPU time is its issue time — the stream is idle when
a call starts, so the error is that first event's launch latency, a few µs) the **lead** of
a mark is GPU time minus issue time: how long the queue in front of it was. A lead near
zero means the GPU had caught up with the host and was waiting for work (host-bound); a lead
that never comes back down means the queue never drained (GPU-bound).

What must stay true:

* a verdict is drawn only from the marks inside a span and the mark that closes it where
  that mark is issued right after the span's work (``VISION_END``, ``LM_HEAD_END``),
  never from forward boundaries: ``generate()`` reads a GPU value every step, so the queue
  is empty at every step start whatever the step's own work was. Inside a decode step
  that leaves the layer marks (layer detail: one lead per layer boundary) and the
  forward's return to generate() (``forward_return.py``: one per step in every mode, so
  stage-level tracing and generate()'s compiled decode get a verdict too); a span with no
  such mark is ``"unknown"``;
* on the CPU backend there is one clock, so every lead is 0 by construction: ``"n/a"``;
* GPU-side stamps placed after the call (layer detail in compiled code) carry their
  forward's issue time, not their own (``Marks.from_stamp``): they never enter a lead.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .labels import Kind, kind_of
from .spans import KIND_CODE, SpanTable

__all__ = ["CAUGHT_UP_US", "MIN_MARKS", "lead_ns", "verdict", "call_leads"]

CAUGHT_UP_US = 20.0  # the GPU reached a mark within this of its issue: its queue had drained
MIN_MARKS = 1        # marks a verdict needs (one: the forward's return, at stage level)
_BOUNDARY_KINDS = (Kind.CALL_BEGIN, Kind.CALL_END, Kind.PREFILL_FORWARD, Kind.DECODE_FORWARD)


def lead_ns(device_ns: np.ndarray, host_ns: np.ndarray) -> np.ndarray:
    """Per mark: when the GPU reached it minus when the host issued it, on the aligned clock."""
    host = np.asarray(host_ns, dtype=np.int64)
    return np.asarray(device_ns, dtype=np.int64) - (host - host[0])


def verdict(leads_us: np.ndarray) -> str:
    """host-bound: the GPU caught up with the host at most marks; gpu-bound: never; else mixed."""
    if len(leads_us) < MIN_MARKS:
        return "unknown"
    caught = float(np.mean(leads_us <= CAUGHT_UP_US))
    return "host-bound" if caught >= 0.5 else ("gpu-bound" if caught == 0 else "mixed")


def _stats(leads_us: np.ndarray, why_not: str | None) -> dict[str, Any]:
    if not len(leads_us):
        return {"min_us": None, "median_us": None, "max_us": None, "marks": 0, "verdict": why_not or "unknown"}
    return {"min_us": float(leads_us.min()), "median_us": float(np.median(leads_us)), "max_us": float(leads_us.max()),
            "marks": int(len(leads_us)), "verdict": why_not or verdict(leads_us)}


def _per_span(t: np.ndarray, lead_us: np.ndarray, start: np.ndarray, end: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorized over spans that do not overlap (the decode steps): the leads of the marks
    after each span's start up to and including its end — count, min, median, max and the
    share that caught up."""
    lo, hi = np.searchsorted(t, start, "right"), np.searchsorted(t, end, "right")
    n = np.maximum(hi - lo, 0)
    idx = np.arange(len(t))
    seg = np.searchsorted(lo, idx, "right") - 1
    seg = np.where((seg >= 0) & (idx < hi[np.maximum(seg, 0)]), seg, -1)
    ordered = lead_us[np.lexsort((lead_us, seg))]  # marks outside every span first, then span by span
    first = int(np.sum(seg < 0)) + np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    caught = np.concatenate([[0], np.cumsum(ordered <= CAUGHT_UP_US)])
    at = lambda i: ordered[np.clip(i, 0, max(len(ordered) - 1, 0))] if len(ordered) else np.zeros(len(n))  # noqa: E731
    empty = n == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"n": n, "min": np.where(empty, np.nan, at(first)), "max": np.where(empty, np.nan, at(first + n - 1)),
                "median": np.where(empty, np.nan, (at(first + (n - 1) // 2) + at(first + n // 2)) / 2),
                "caught": np.where(empty, np.nan, (caught[first + n] - caught[first]) / np.maximum(n, 1))}


def _verdicts(n: np.ndarray, caught: np.ndarray) -> list[str]:
    out = np.where(n < MIN_MARKS, "unknown",
                   np.where(caught >= 0.5, "host-bound", np.where(caught == 0, "gpu-bound", "mixed")))
    return out.tolist()


def call_leads(labels: np.ndarray, device_ns: np.ndarray, host_ns: np.ndarray, spans: SpanTable, backend: str,
               issued_by_host: np.ndarray | None = None
               ) -> tuple[dict[str, dict[str, Any]], list[float | None], list[str]]:
    """(per stage: min/median/max lead in µs, marks read, verdict; per decode step: median
    lead in µs and verdict), from one call's marks (device times relative to its first mark).
    ``issued_by_host``: False for stamps, whose host times are borrowed (``Marks.issued_by_host``)."""
    usable = ~np.isin(kind_of(labels), _BOUNDARY_KINDS)
    if issued_by_host is not None:
        usable &= np.asarray(issued_by_host, dtype=bool)
    t = np.asarray(device_ns, dtype=np.int64)[usable]
    lead_us = lead_ns(device_ns, host_ns)[usable] / 1e3
    cpu = "n/a" if backend == "cpu" else None
    stages = {}
    for kind in ("vision", "prefill", "decode"):
        rows = np.flatnonzero(spans.kind == KIND_CODE[kind])
        if len(rows):
            lo, hi = np.searchsorted(t, spans.start_ns[rows[0]], "right"), np.searchsorted(t, spans.end_ns[rows[0]], "right")
            stages[kind] = _stats(lead_us[lo:hi], cpu)
    steps = np.flatnonzero(spans.kind == KIND_CODE["step"])
    if not len(steps):
        return stages, [], []
    per = _per_span(t, lead_us, spans.start_ns[steps], spans.end_ns[steps])
    medians = [None if k == 0 else float(m) for k, m in zip(per["n"], per["median"])]
    verdicts = [cpu] * len(steps) if cpu else _verdicts(per["n"], per["caught"])
    return stages, medians, verdicts
