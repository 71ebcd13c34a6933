"""Summary across records: count, mean, p50, p90, p99, min, max per stage; table and CSV."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Iterable

import numpy as np

from ..records import STAGES, StageRecord
from .files import write_bytes_atomically

__all__ = ["summarize", "format_summary", "write_csv", "STAT_NAMES"]

STAT_NAMES = ("count", "mean", "p50", "p90", "p99", "min", "max")


def _values(records: list[StageRecord], stage: str) -> np.ndarray:
    vals = [getattr(r, stage) for r in records if r.error is None]
    return np.asarray([v for v in vals if v is not None], dtype=np.float64)


def summarize(records: Iterable[StageRecord]) -> dict[str, dict[str, float]]:
    """Statistics per stage (ms), over the records that were timed.

    Percentiles use numpy's default (linear) interpolation. A stage absent from every
    record (e.g. vision for text-only runs) has count 0 and NaN statistics.
    """
    recs = list(records)
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        v = _values(recs, stage)
        if v.size == 0:
            out[stage] = {"count": 0, **{k: math.nan for k in STAT_NAMES[1:]}}
            continue
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        out[stage] = {"count": int(v.size), "mean": float(v.mean()), "p50": float(p50), "p90": float(p90),
                      "p99": float(p99), "min": float(v.min()), "max": float(v.max())}
    return out


def format_summary(summary: dict[str, dict[str, float]], title: str | None = None) -> str:
    """An aligned plain-text table (ms), one row per stage."""
    header = ["stage (ms)", *STAT_NAMES]
    rows = [header]
    for stage, s in summary.items():
        rows.append([stage.removesuffix("_ms")] +
                    [str(int(s["count"]))] + ["-" if math.isnan(s[k]) else f"{s[k]:.3f}" for k in STAT_NAMES[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(([title] if title else []) + lines)


def write_csv(summary: dict[str, dict[str, float]], path: str | os.PathLike[str]) -> None:
    """Writes the summary as CSV, whole or not at all (a temporary file, then a rename)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["stage", *STAT_NAMES])
    for stage, s in summary.items():
        w.writerow([stage, *(s[k] for k in STAT_NAMES)])
    write_bytes_atomically(path, buf.getvalue().encode("utf-8"))
