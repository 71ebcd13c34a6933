"""Per-stage latency models fitted to records by (weighted) least squares: numpy only.

Each stage is ``intercept + Σ coef × feature`` over what records carry today (prompt tokens,
batch size, decode steps); the feature set is a parameter, so image tokens or pixels join
once records carry them (``features={"vision_ms": ("image_tokens",)}`` reads the record
field ``image_tokens``). Rows are weighted by 1 / measured, so errors count relative, as
MAPE scores them. Features constant in the data, or a combination of earlier ones, are
dropped (and named). Quality is measured held out, by k-fold over records (seeded): each
record predicted by a fit on the others, its steps and the other records of its sample id
kept with it; the saved model is the fit on every record.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .latency_model import (LatencyModel, LinearFit, Quality, feature_values, predict_columns, raw_names,
                            record_quantities, step_quantities)
from .records import StageRecord

__all__ = ["fit", "DEFAULT_FEATURES", "MIN_RECORDS", "LatencyModel"]

_PROMPT = ("prompt_tokens", "prompt_tokens_sq", "batch_size", "batch_prompt_tokens", "batch_prompt_tokens_sq")
DEFAULT_FEATURES: dict[str, tuple[str, ...]] = {
    # where records do not all carry image tokens, prompt tokens (which hold the image's) stand in
    "vision_ms": ("prompt_tokens", "batch_size", "batch_prompt_tokens"),
    "prefill_ms": _PROMPT,
    "decode_step_ms": ("context_tokens", "batch_size", "batch_context_tokens"),
    "other_ms": ("prompt_tokens", "batch_size", "decode_steps"),
    "ttft_ms": _PROMPT,
    "total_ms": _PROMPT + ("decode_steps", "batch_decode_steps", "decode_context_sum", "batch_decode_context_sum"),
}
VISION_FROM_IMAGE_TOKENS = ("image_tokens", "batch_size")  # the default where every record carries image tokens
MIN_RECORDS = 10  # a stage measured in fewer records is not modelled
_WORST = 5


def _kept_columns(x: np.ndarray) -> list[int]:
    """Columns that are not constant and not a combination of the intercept and earlier kept ones."""
    scaled = x / np.maximum(np.abs(x).max(axis=0), 1e-300) if x.size else x
    kept: list[int] = []
    for j in range(x.shape[1]):
        trial = np.column_stack([np.ones(len(x))] + [scaled[:, k] for k in (*kept, j)])
        s = np.linalg.svd(trial, compute_uv=False)
        if s[-1] > 1e-9 * s[0]:
            kept.append(j)
    return kept


def _solve(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(intercept, coefficients) minimising Σ ((y - fit) / y)²."""
    scale = np.maximum(np.abs(x).max(axis=0), 1e-300) if x.shape[1] else np.ones(0)
    weight = 1.0 / np.maximum(np.abs(y), 1e-3 * max(float(np.abs(y).max()), 1e-9))
    a = np.column_stack([np.ones(len(y)), x / scale]) * weight[:, None]
    beta = np.linalg.lstsq(a, y * weight, rcond=None)[0]
    return float(beta[0]), beta[1:] / scale


def _held_out_ms(x: np.ndarray, y: np.ndarray, row_fold: np.ndarray, folds: int) -> np.ndarray:
    pred = np.full(len(y), np.nan)
    for f in range(folds):
        test = row_fold == f
        if test.any() and not test.all():
            intercept, coef = _solve(x[~test], y[~test])
            pred[test] = intercept + x[test] @ coef
    return pred


def _quality(y: np.ndarray, fitted: np.ndarray, held_out: np.ndarray, coverage: float) -> Quality:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - fitted) ** 2))
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("nan"))
    ok = (y > 0) & (held_out > 0)
    rel_pct = 100 * (y[ok] - held_out[ok]) / held_out[ok]
    tail = 100 * (1 - coverage) / 2
    low, high = np.percentile(rel_pct, [tail, 100 - tail]) if rel_pct.size else (np.nan, np.nan)
    mape = float(100 * np.mean(np.abs(y[ok] - held_out[ok]) / y[ok])) if ok.any() else float("nan")
    return Quality(int(y.size), float(r2), mape, (float(low), float(high)))


def _worst(ids: Sequence[str | None], y: np.ndarray, held_out: np.ndarray) -> list[dict]:
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.where(y > 0, 100 * (held_out - y) / y, np.nan)
    order = [i for i in np.argsort(-np.nan_to_num(np.abs(err), nan=-1.0)) if np.isfinite(err[i])][:_WORST]
    return [{"sample_id": ids[i], "measured_ms": float(y[i]), "predicted_ms": float(held_out[i]),
             "error_pct": float(err[i])} for i in order]


def _fit_one(x: np.ndarray, names: Sequence[str], y: np.ndarray, row_fold: np.ndarray,
             folds: int) -> tuple[LinearFit, np.ndarray]:
    """The fit on every row, and each row's held-out prediction."""
    kept = _kept_columns(x)
    xk = x[:, kept]
    intercept, coef = _solve(xk, y)
    fitted = LinearFit(tuple(names[k] for k in kept), intercept, tuple(float(c) for c in coef),
                       tuple(n for k, n in enumerate(names) if k not in kept))
    return fitted, _held_out_ms(xk, y, row_fold, folds)


def _folds_by_sample(records: list[StageRecord], folds: int, seed: int) -> np.ndarray:
    """Each record's fold, seeded; records of one sample id share a fold, so none is held out
    from a fit that saw the same sample measured again."""
    keys = [r.sample_id if r.sample_id else f"record {i}" for i, r in enumerate(records)]
    group = {k: g for g, k in enumerate(dict.fromkeys(keys))}
    group_fold = np.random.default_rng(seed).permutation(len(group)) % folds
    return group_fold[[group[k] for k in keys]]


def _target(records: list[StageRecord], target: str) -> np.ndarray:
    if target == "decode_step_ms":
        return np.array([s for r in records for s in r.decode_step_ms], dtype=np.float64)
    return np.array([np.nan if getattr(r, target) is None else getattr(r, target) for r in records])


def fit(records: Iterable[StageRecord], features: Mapping[str, Sequence[str]] | None = None, folds: int = 5,
        seed: int = 0, coverage: float = 0.95) -> LatencyModel:
    """A :class:`LatencyModel` of ``records`` (those with an error are left out and counted).

    ``features``: per stage (``vision_ms``, ``prefill_ms``, ``decode_step_ms``, ``other_ms``,
    ``ttft_ms``, ``total_ms``), the features replacing :data:`DEFAULT_FEATURES`' (names of
    :data:`stagetrace.latency_model.FEATURES` or record fields). ValueError for too few
    records, an unknown stage, or a feature records do not carry.
    """
    all_records = list(records)
    recs = [r for r in all_records if r.error is None]
    wanted = dict(DEFAULT_FEATURES)
    for stage, names in (features or {}).items():
        if stage not in DEFAULT_FEATURES:
            raise ValueError(f"no model for {stage!r}: choose from {', '.join(DEFAULT_FEATURES)}")
        wanted[stage] = tuple(names)
    if "vision_ms" not in (features or {}) and recs and all(r.image_tokens is not None for r in recs):
        wanted["vision_ms"] = VISION_FROM_IMAGE_TOKENS  # what the vision encoder really sees
    if len(recs) < MIN_RECORDS:
        raise ValueError(f"fit needs at least {MIN_RECORDS} timed records, got {len(recs)}"
                         + (f" ({len(all_records) - len(recs)} more with an error)" if len(all_records) > len(recs)
                            else ""))
    if not 2 <= folds <= MIN_RECORDS or not 0 < coverage < 1:
        raise ValueError(f"folds must be in 2..{MIN_RECORDS} and coverage in (0, 1), got {folds} and {coverage}")
    q = record_quantities(recs, raw_names(n for names in wanted.values() for n in names))
    record_fold = _folds_by_sample(recs, folds, seed)
    fits, held, skipped = {}, {}, {}
    for target, names in wanted.items():
        rows, owner = step_quantities(q) if target == "decode_step_ms" else (q, np.arange(len(recs)))
        y = _target(recs, target)
        ok = np.isfinite(y)
        if len(np.unique(owner[ok])) < MIN_RECORDS:
            skipped[target] = f"measured in {len(np.unique(owner[ok]))} records (at least {MIN_RECORDS})"
            continue
        x = np.column_stack([feature_values(n, rows)[ok] for n in names]) if names else np.zeros((ok.sum(), 0))
        fits[target], held[target] = _fit_one(x, names, y[ok], record_fold[owner[ok]], folds)
        if target == "decode_step_ms":
            held["decode_ms"] = np.bincount(owner[ok], held[target], minlength=len(recs))
    return _model(recs, q, fits, held, folds, seed, coverage, len(all_records), skipped)


def _model(recs: list[StageRecord], q: dict[str, np.ndarray], fits: dict[str, LinearFit],
           held: dict[str, np.ndarray], folds: int, seed: int, coverage: float, n_all: int,
           skipped: dict[str, str]) -> LatencyModel:
    """Quality and worst records of every output, from the fits and their held-out predictions."""
    fitted = predict_columns(fits, q)
    if "decode_ms" in held:
        with np.errstate(divide="ignore", invalid="ignore"):
            held["tpot_ms"] = np.where(q["decode_steps"] > 0, held["decode_ms"] / q["decode_steps"], np.nan)
    quality, worst = {}, {}
    ids = [r.sample_id for r in recs]
    step_y = _target(recs, "decode_step_ms")
    if "decode_step_ms" in fits:
        rows, _ = step_quantities(q)
        quality["decode_step_ms"] = _quality(step_y, fits["decode_step_ms"].predict_ms(rows), held["decode_step_ms"],
                                             coverage)
    for target in (t for t in fitted if t in held):
        y = _target(recs, target)
        ok = np.isfinite(y) & np.isfinite(held[target]) & (q["decode_steps"] > 0 if target in ("decode_ms", "tpot_ms")
                                                          else True)
        quality[target] = _quality(y[ok], fitted[target][ok], held[target][ok], coverage)
        worst[target] = _worst([ids[i] for i in np.flatnonzero(ok)], y[ok], held[target][ok])
    trained = {"records": n_all, "errors_left_out": n_all - len(recs), "folds": folds, "seed": seed,
               "coverage": coverage, "skipped": skipped}
    return LatencyModel(fits, quality, worst, trained)
