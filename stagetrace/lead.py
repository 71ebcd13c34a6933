"""How far the GPU runs behind the host, stage by stage: a pure function of one call's marks.

Every mark has two times: when the host issued it and when the GPU reached it. On the
call's aligned clock (the first mark's GPU time is its issue time — the stream is idle when
a call starts, so the error is that first event's launch latency, a few µs) the **lead** of
a mark is GPU time minus issue time: how long the queue in front of it was. A lead near
zero means the GPU had caught up with the host and was waiting for work (host-bound); a lead
that never comes back down means the queue never drained (GPU-bound).

**GPU-bound time.** From its issue until the GPU reached it, a mark sat behind queued work:
over that whole while the GPU had work waiting and the host was not what held it up. So
over the stretch of GPU time since the previous mark (``Δ``), the GPU was behind for at
least ``min(lead, Δ)``. The sum over a span is a lower bound of its GPU-bound time, with no
kernel trace; its share of the span gives the verdict: **host-bound** below 1/4,
**gpu-bound** from 3/4, **mixed** between. (A lead up to :data:`CAUGHT_UP_US` is launch
latency and counts as caught up.) Why a time share and not a count of caught-up marks: a
stage that starts from an empty queue always has a first mark or two caught up, however
long the queue then grows (a batch-32 prefill); and a long spin between two marks is one
mark but most of the time.

What must stay true:

* a verdict is drawn only from the marks inside a span and the mark that closes it where
  that mark is issued right after the span's work (``VISION_END``, ``LM_HEAD_END``),
  never from forward boundaries: ``generate()`` reads a GPU value every step, so the queue
  is empty at every step start whatever the step's own work was. Inside a decode step
  that leaves the layer marks (layer detail: one lead per layer boundary) and the
  forward's return to generate() (``forward_return.py``: one per step in every mode, so
  stage-level tracing and generate()'s compiled decode get a verdict too); a span with no
  such mark is ``"unknown"``;
* GPU-bound time never exceeds the span (each mark adds at most its own ``Δ``);
* the decode stage's share is read over the steps that have a lead mark (``steps_read``):
  where the lead's mark is sampled (``lead_every``), a step without one is unknown, not
  host-bound, so it enters neither the GPU-bound time nor the time it is a share of;
* on the CPU backend there is one clock, so every lead is 0 by construction: ``"n/a"``;
* GPU-side stamps placed after the call (layer detail in compiled code) carry their
  forward's issue time, not their own (``Marks.from_stamp``): they never enter a lead;
* the walk over the marks runs in C++ (``csrc/call_leads.cpp``, after every call, inside
  it); ``_lead_columns_numpy`` is its reference twin, and tests hold the two equal to the bit.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .labels import Kind, kind_of
from .low_level import _C
from .spans import KIND_CODE, SpanTable

__all__ = ["CAUGHT_UP_US", "HOST_BOUND_BELOW", "GPU_BOUND_FROM", "BOUNDARY_KINDS", "lead_ns", "verdict", "call_leads"]

CAUGHT_UP_US = 20.0  # the GPU reached a mark within this of its issue: its queue had drained
HOST_BOUND_BELOW, GPU_BOUND_FROM = 0.25, 0.75  # GPU-bound share of a span
# marks issued right after a sync (the queue is empty there whatever ran before): never a lead
BOUNDARY_KINDS = (Kind.CALL_BEGIN, Kind.CALL_END, Kind.PREFILL_FORWARD, Kind.DECODE_FORWARD)
# Per kind code (the low byte of a label): is it a boundary kind. A table read, not np.isin,
# and the decode kind as a plain int: this runs after every generate(), inside the traced call.
_IS_BOUNDARY = np.zeros(256, dtype=bool)
_IS_BOUNDARY[[int(k) for k in BOUNDARY_KINDS]] = True
_DECODE_FORWARD = int(Kind.DECODE_FORWARD)


def lead_ns(device_ns: np.ndarray, host_ns: np.ndarray) -> np.ndarray:
    """Per mark: when the GPU reached it minus when the host issued it, on the aligned clock."""
    host = np.asarray(host_ns, dtype=np.int64)
    return np.asarray(device_ns, dtype=np.int64) - (host - host[0])


def verdict(gpu_bound_share: float | None) -> str:
    """host-bound / mixed / gpu-bound from the share of time the GPU was behind (None: unknown)."""
    if gpu_bound_share is None or not math.isfinite(gpu_bound_share):
        return "unknown"
    if gpu_bound_share < HOST_BOUND_BELOW:
        return "host-bound"
    return "gpu-bound" if gpu_bound_share >= GPU_BOUND_FROM else "mixed"


def _behind_ns(t: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """Per mark (all kinds, in device order): the time the GPU was certainly behind since the
    previous mark, ``min(lead, Δ)`` — 0 where the lead is launch latency."""
    return np.where(lead > CAUGHT_UP_US * 1e3, np.minimum(lead, np.diff(t, prepend=t[:1])), 0)


def _stats(window: tuple[int, float, float, float, int], span_ns: int, why_not: str | None) -> dict[str, Any]:
    """A stage's entry from its window's (marks, min, median, max lead µs, GPU-bound ns)."""
    marks, min_us, median_us, max_us, behind_ns = window
    if not marks:
        return {"min_us": None, "median_us": None, "max_us": None, "marks": 0, "gpu_bound_ms": None,
                "gpu_bound_share": None, "verdict": why_not or "unknown"}
    behind = float(behind_ns)
    share = behind / span_ns if span_ns > 0 else None
    return {"min_us": float(min_us), "median_us": float(median_us), "max_us": float(max_us), "marks": int(marks),
            "gpu_bound_ms": behind / 1e6, "gpu_bound_share": share, "verdict": why_not or verdict(share)}


def _per_step(step: np.ndarray, lead_us: np.ndarray, n_steps: int) -> dict[str, np.ndarray]:
    """Vectorized over the decode steps: per step (``step``: each mark's, -1 for none) the
    count, min, median and max of its marks' leads."""
    n = np.bincount(step[step >= 0], minlength=n_steps)[:n_steps]
    ordered = lead_us[np.lexsort((lead_us, step))]  # marks of no step first, then step by step
    first = int((step < 0).sum()) + np.concatenate([[0], n.cumsum()[:-1]]).astype(np.int64)
    last = len(ordered) - 1  # an empty step's positions may fall outside (-1 or past the end): masked below
    at = lambda i: ordered[np.minimum(i, last)] if len(ordered) else np.zeros(len(n))  # noqa: E731
    empty = n == 0
    return {"n": n, "min": np.where(empty, np.nan, at(first)), "max": np.where(empty, np.nan, at(first + n - 1)),
            "median": np.where(empty, np.nan, (at(first + (n - 1) // 2) + at(first + n // 2)) / 2)}


def _lead_columns_numpy(labels: np.ndarray, device_ns: np.ndarray, host_ns: np.ndarray,
                        issued_by_host: np.ndarray | None, windows: np.ndarray, n_steps: int) -> tuple[
        list[tuple[int, float, float, float, int]], np.ndarray, np.ndarray, np.ndarray]:
    """The reference (the native ``_C.lead_columns`` is its twin): per (start, end] window on
    the device clock its marks' count, min / median / max lead (µs) and GPU-bound ns; per
    decode step the count, the median lead and the GPU-bound ns."""
    host_issued = np.ones(len(labels), dtype=bool) if issued_by_host is None else np.asarray(issued_by_host, bool)
    # stamps carry no issue time of their own: they neither give a lead nor split a Δ
    t_all = np.asarray(device_ns, dtype=np.int64)[host_issued]
    lead_all = lead_ns(t_all, np.asarray(host_ns, dtype=np.int64)[host_issued])
    behind_all = _behind_ns(t_all, lead_all)
    kinds = kind_of(np.asarray(labels)[host_issued])
    usable = ~_IS_BOUNDARY[kinds]
    t, lead_us, behind = t_all[usable], lead_all[usable] / 1e3, behind_all[usable]
    stats = []
    for a, b in np.asarray(windows, dtype=np.int64).reshape(-1, 2):
        lo, hi = t.searchsorted(a, "right"), t.searchsorted(b, "right")
        ordered = lead_us[lo:hi].copy()
        ordered.sort()
        k = len(ordered)
        stats.append((k, float(ordered[0]), float((ordered[(k - 1) // 2] + ordered[k // 2]) / 2),
                      float(ordered[-1]), int(behind[lo:hi].sum())) if k else (0, 0.0, 0.0, 0.0, 0))
    # a mark belongs to the step whose start mark it follows in issue order (times can tie)
    step = ((kinds == _DECODE_FORWARD).nonzero()[0].searchsorted(np.arange(len(kinds)), "right") - 1)[usable]
    per = _per_step(step, lead_us, n_steps)
    mine = step >= 0
    gpu_bound = np.bincount(step[mine], weights=behind[mine], minlength=n_steps)[:n_steps].astype(np.float64)
    return stats, per["n"], np.nan_to_num(per["median"]), gpu_bound


_native_leads = getattr(_C, "lead_columns", None)  # None where the extension did not build


def call_leads(labels: np.ndarray, device_ns: np.ndarray, host_ns: np.ndarray, spans: SpanTable, backend: str,
               issued_by_host: np.ndarray | None = None) -> dict[str, Any]:
    """One call's leads, from its marks (device times relative to its first mark):
    ``stages``: per stage min/median/max lead (µs), marks read, GPU-bound time (ms, a lower
    bound), its share of the span and the verdict; per decode step ``step_lead_us``
    (median lead, None: no mark inside), ``step_gpu_bound_ms`` and ``step_verdict``.
    ``issued_by_host``: False for stamps, whose host times are borrowed (``Marks.issued_by_host``)."""
    cpu = "n/a" if backend == "cpu" else None
    present, rows = [], []  # each stage's one row
    for kind in ("vision", "prefill", "decode"):
        hit = (spans.kind == KIND_CODE[kind]).nonzero()[0]
        if len(hit):
            present.append(kind)
            rows.append(int(hit[0]))
    windows = np.array([[spans.start_ns[r], spans.end_ns[r]] for r in rows], dtype=np.int64).reshape(-1, 2)
    step_rows = (spans.kind == KIND_CODE["step"]).nonzero()[0]
    n_steps = len(step_rows)
    columns = _native_leads if _native_leads is not None else _lead_columns_numpy
    stats, counts, medians, gpu_bound = columns(labels, device_ns, host_ns, issued_by_host, windows, n_steps)
    stages = {kind: _stats(window, int(b - a), cpu) for kind, window, (a, b) in zip(present, stats, windows.tolist())}
    out: dict[str, Any] = {"stages": stages, "step_lead_us": [], "step_gpu_bound_ms": [], "step_verdict": []}
    if not n_steps:
        return out
    length = spans.end_ns[step_rows] - spans.start_ns[step_rows]
    if "decode" in stages:
        read = np.asarray(counts) > 0
        stages["decode"]["steps_read"] = int(read.sum())
        if 0 < read.sum() < n_steps:  # sampled: the share over the steps read, not over all of decode
            d = stages["decode"]
            behind, over = float(np.asarray(gpu_bound)[read].sum()), int(length[read].sum())
            d["gpu_bound_ms"] = behind / 1e6
            d["gpu_bound_share"] = behind / over if over > 0 else None
            d["verdict"] = cpu or verdict(d["gpu_bound_share"])
    counts, gpu_bound = counts.tolist(), gpu_bound.tolist()  # plain Python numbers: a loop over numpy scalars is slow
    out["step_lead_us"] = [None if k == 0 else m for k, m in zip(counts, medians.tolist())]
    out["step_gpu_bound_ms"] = [None if k == 0 else b / 1e6 for k, b in zip(counts, gpu_bound)]
    out["step_verdict"] = [cpu] * n_steps if cpu else [
        verdict(None if k == 0 or n <= 0 else b / n) for k, b, n in zip(counts, gpu_bound, length.tolist())]
    return out
