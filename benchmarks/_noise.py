"""The repeat-noise floor of records: how far one measurement of a call is from the other
measurements of the same call (same sample id, prompt, output tokens and batch).

Two figures per stage, over the records of samples measured at least twice:

* repeat noise (``mape_pct``, ``median_ape_pct``): each measurement against each other
  measurement of its call, scored as a fit is (absolute % error of the measured value; every
  ordered pair of repeats). That is how well a call is predicted by having measured it once
  before. A model sees only a call's features, which repeats share: it cannot know which
  repeat ran in a slow state of the host. Not a strict bound: a model that predicts the
  typical call beats a random repeat (by up to about 1.4x in the median where the noise is
  Gaussian, more in the mean where one repeat of a few ran slow).
* strict floor (``best_constant_mape_pct``): the least MAPE any model of the call's features
  can have on these records: per call, the one prediction that minimises its records' mean APE
  (chosen in sample, so optimistic; with 3 repeats it hits one of them exactly);
  ``best_constant_median_ape_pct`` is the median APE at those predictions.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

STAGES = ("vision_ms", "prefill_ms", "decode_ms", "decode_step_ms", "tpot_ms", "ttft_ms", "other_ms", "total_ms")


def _value(r: Any, stage: str) -> float:
    v = getattr(r, stage, None)
    return float("nan") if v is None else float(v)


def _groups(records: Iterable[Any]) -> list[list[Any]]:
    by: dict[tuple, list[Any]] = {}
    for r in records:
        if r.error is None and r.sample_id:
            by.setdefault((r.sample_id, r.prompt_tokens, r.output_tokens, r.batch_size), []).append(r)
    return [g for g in by.values() if len(g) >= 2]


def _floor(series: Sequence[np.ndarray]) -> dict[str, float]:
    """``series``: per repeated call, its measurements (> 0, finite)."""
    pair, best = [], []
    for y in series:
        y = y[np.isfinite(y) & (y > 0)]
        if y.size < 2:
            continue
        ape = 100 * np.abs(y[:, None] - y[None, :]) / y[:, None]  # row i: measurement i, predicted by j
        pair.append(ape[~np.eye(y.size, dtype=bool)])
        p = y[int(np.argmin(ape.sum(axis=0)))]  # MAPE's optimum is piecewise linear: it sits on a measurement
        best.append(100 * np.abs(y - p) / y)
    if not pair:
        return {"rows": 0, "calls": 0, "mape_pct": float("nan"), "median_ape_pct": float("nan"),
                "best_constant_mape_pct": float("nan"), "best_constant_median_ape_pct": float("nan")}
    ape, strict = np.concatenate(pair), np.concatenate(best)
    return {"rows": int(strict.size), "calls": len(pair), "mape_pct": float(ape.mean()),
            "median_ape_pct": float(np.median(ape)), "best_constant_mape_pct": float(strict.mean()),
            "best_constant_median_ape_pct": float(np.median(strict))}


def repeat_noise(records: Iterable[Any], stages: Sequence[str] = STAGES) -> dict[str, dict[str, float]]:
    """Per stage, the repeat-noise floor (see the module's docstring); decode steps are matched by
    their index within the call."""
    groups = _groups(records)
    out = {}
    for stage in stages:
        if stage == "decode_step_ms":
            series = [np.array([r.decode_step_ms[i] for r in g]) for g in groups
                      if len({len(r.decode_step_ms) for r in g}) == 1 for i in range(len(g[0].decode_step_ms))]
        else:
            series = [np.array([_value(r, stage) for r in g]) for g in groups]
        f = _floor(series)
        if f["rows"]:
            out[stage] = f
    return out


def within(held_out: dict[str, float], floor: dict[str, float] | None, slack_pct: float = 0.0) -> dict[str, Any]:
    """Whether a fit's held-out error is within the repeat noise: MAPE and median APE each no
    more than the repeat noise's (plus ``slack_pct`` points)."""
    if not floor:
        return {"mape": None, "median": None}
    return {"mape": bool(held_out["mape_pct"] <= floor["mape_pct"] + slack_pct),
            "median": bool(held_out["median_ape_pct"] <= floor["median_ape_pct"] + slack_pct)}
