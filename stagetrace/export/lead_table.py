"""Across records: how far the GPU ran behind the host, stage by stage, and what it suggests.

Reads the records' ``lead`` and ``decode_step_verdict`` fields (``lead.py`` computes them).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import numpy as np

from ..records import StageRecord

__all__ = ["summarize_lead", "format_lead", "VERDICTS"]

VERDICTS = ("host-bound", "gpu-bound", "mixed", "unknown", "n/a")


def summarize_lead(records: Iterable[StageRecord]) -> dict[str, dict[str, Any]]:
    """Per stage (and per decode step, pooled): the median of the calls' median leads (µs) and
    how many calls (steps) got each verdict."""
    recs = [r for r in records if r.error is None and r.lead]
    out: dict[str, dict[str, Any]] = {}
    for stage in ("vision", "prefill", "decode"):
        rows = [r.lead[stage] for r in recs if stage in r.lead]
        if rows:
            medians = [x["median_us"] for x in rows if x.get("median_us") is not None]
            shares = [x["gpu_bound_share"] for x in rows if x.get("gpu_bound_share") is not None]
            out[stage] = {"median_us": float(np.median(medians)) if medians else None,
                          "gpu_bound_share": float(np.median(shares)) if shares else None,
                          "verdicts": Counter(str(x.get("verdict")) for x in rows)}
    steps = [v for r in recs for v in r.decode_step_verdict]
    if steps:
        leads = [x for r in recs for x in r.decode_step_lead_us if x is not None]
        bound = [(b, ms) for r in recs for b, ms in zip(r.decode_step_gpu_bound_ms, r.decode_step_ms) if b is not None]
        out["decode steps"] = {"median_us": float(np.median(leads)) if leads else None,
                               "gpu_bound_share": (float(np.median([b / ms for b, ms in bound if ms > 0]))
                                                   if any(ms > 0 for _, ms in bound) else None),
                               "verdicts": Counter(steps)}
    return out


def _hints(summary: dict[str, dict[str, Any]]) -> list[str]:
    hints = []
    every = Counter(v for row in summary.values() for v in row["verdicts"].elements())
    if every and set(every) <= {"n/a"}:
        return ["CPU backend: one clock, so the lead is 0 by construction and says nothing"]
    if every and set(every) <= {"unknown", "n/a"}:
        return ["no mark inside the stages for a verdict (a generate() of its own, without the forward's "
                "return to mark): trace with layer_detail='all' for a lead per layer boundary"]
    steps = summary.get("decode steps", {}).get("verdicts", Counter())
    known = sum(n for v, n in steps.items() if v not in ("unknown", "n/a"))
    if known and steps["host-bound"] >= 0.9 * known:
        hints.append(f"decode host-bound at {steps['host-bound']} of {known} steps: the GPU waits for kernel "
                     "launches; a compiled decode (static cache, CUDA graphs) would remove launch time")
    elif known and steps["mixed"] >= 0.5 * known:
        hints.append(f"decode mixed at {steps['mixed']} of {known} steps: the GPU is behind for only part of each "
                     "step and waits for the host the rest (under a compiled decode: host work outside the graph — "
                     "inputs, sampling, the stopping check)")
    if summary.get("prefill", {}).get("verdicts", Counter())["gpu-bound"]:
        hints.append("prefill GPU-bound: the GPU, not the host, sets its time (fewer tokens or faster kernels help)")
    return hints


def format_lead(summary: dict[str, dict[str, Any]]) -> str:
    """A short table: stage, median lead, verdict counts; then the hints."""
    if not summary:
        return ""
    lines = ["GPU lead (how far the GPU ran behind the host; GPU-bound: share of the time it was "
             "certainly behind; medians over calls):"]
    for stage, row in summary.items():
        lead = "-" if row["median_us"] is None else f"{row['median_us']:.1f} µs"
        share = row.get("gpu_bound_share")
        bound = "-" if share is None else f"{share:.0%}"
        counts = ", ".join(f"{v} {row['verdicts'][v]}" for v in VERDICTS if row["verdicts"][v])
        lines.append(f"  {stage:<13} {lead:>12}  GPU-bound {bound:>4}   {counts}")
    lines += [f"  hint: {h}" for h in _hints(summary)]
    return "\n".join(lines)
