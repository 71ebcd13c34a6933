"""A :class:`~stagetrace.compare.Comparison` as an aligned table, CSV, JSON or Markdown."""
from __future__ import annotations

import csv
import io
import json
import math

from ..compare import Comparison, ComparisonRow

__all__ = ["format_comparison", "comparison_csv", "comparison_json", "comparison_markdown", "CSV_COLUMNS"]

CSV_COLUMNS = ("stage", "stat", "a_ms", "b_ms", "delta_ms", "delta_pct", "low_pct", "high_pct", "noise_pct",
               "verdict", "n_a", "n_b", "paired")
_HEADER = ("stage", "stat", "A (ms)", "B (ms)", "Δ (ms)", "Δ%", "interval (Δ%)", "noise (Δ%)", "verdict")


def _num(v: float, fmt: str) -> str:
    return "-" if not math.isfinite(v) else format(v, fmt)


def _cells(r: ComparisonRow) -> list[str]:
    interval = "-" if not (math.isfinite(r.low_pct) and math.isfinite(r.high_pct)) else \
        f"[{r.low_pct:+.1f}, {r.high_pct:+.1f}]"
    noise = "-" if not math.isfinite(r.noise_pct) else f"±{r.noise_pct:.1f}"
    return [r.stage, r.stat, _num(r.a_ms, ".3f"), _num(r.b_ms, ".3f"), _num(r.delta_ms, "+.3f"),
            _num(r.delta_pct, "+.1f"), interval, noise, r.verdict]


def _notes(c: Comparison) -> list[str]:
    def run(name: str, n: int, errors: int) -> str:
        return f"{name}: {n} records" + (f" ({errors} with an error, left out)" if errors else "")

    level = f"{100 * c.confidence:g}%"
    notes = [f"{run('A', c.records_a, c.errors_a)}; {run('B', c.records_b, c.errors_b)}; {c.pairing}",
             f"interval: {level} bootstrap of Δ% ({c.reps} resamples, seed {c.seed}); noise: the |Δ%| {level} of "
             f"A-against-itself comparisons stay within; A against itself: {c.noise}",
             "verdict: a change needs the interval to exclude 0 and |Δ%| above the noise"]
    if c.paired:
        notes.append("paired: p50's Δ is the median of the per-sample differences")
    notes += [f"{stage}: left out, {why}" for stage, why in c.skipped.items()]
    return notes


def format_comparison(c: Comparison) -> str:
    """An aligned plain-text table, with what it rests on above it."""
    rows = [list(_HEADER)] + [_cells(r) for r in c.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    left = {0, 1, 8}
    lines = ["  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             .rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(_notes(c) + [""] + lines)


def comparison_csv(c: Comparison) -> str:
    """One row per stage and statistic; a value that cannot be said is empty."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in c.rows:
        d = {**r.__dict__, "paired": c.paired}
        w.writerow(["" if isinstance(d[k], float) and not math.isfinite(d[k]) else d[k] for k in CSV_COLUMNS])
    return buf.getvalue()


def comparison_json(c: Comparison) -> str:
    return json.dumps(c.to_dict(), indent=1, allow_nan=False) + "\n"


def comparison_markdown(c: Comparison) -> str:
    """A GitHub-flavoured Markdown table, with what it rests on as a list above it."""
    lines = [f"- {n}" for n in _notes(c)] + ["", "| " + " | ".join(_HEADER) + " |",
                                            "|" + "|".join("---" if i in (0, 1, 8) else "---:"
                                                           for i in range(len(_HEADER))) + "|"]
    for r in c.rows:
        cells = _cells(r)
        cells[8] = f"**{cells[8]}**" if r.verdict in ("slower", "faster") else cells[8]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
