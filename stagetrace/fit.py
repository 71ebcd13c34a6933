"""Per-stage latency models fitted to records: robust, non-negative least squares, numpy only.

Each stage is ``intercept + Σ coef × feature`` over what records carry today (prompt tokens,
batch size, decode steps); the feature set is a parameter, so image tokens or pixels join
once records carry them (``features={"vision_ms": ("image_tokens",)}`` reads the record
field ``image_tokens``). Features constant in the data, or a combination of earlier ones, are
dropped (and named). Quality is measured held out, by k-fold over records (seeded): each
record predicted by a fit on the others, its steps and the other records of its sample id
kept with it; the saved model is the fit on every record.

What the solver guarantees (and tests/test_fit.py checks):

* Relative errors. Rows are weighted by 1 / measured, so a row's residual is relative,
  ``(measured - fit) / measured``, as MAPE scores it.
* Physically sane. Every coefficient of a feature that is a count (tokens, tokens², steps,
  context sums, batch size; any feature whose values in the data are all >= 0) is >= 0:
  predicted latency never falls as work grows. The intercept is >= 0 too: it is the cost of a
  call that does no work (launch, Python, synchronisation), which cannot be negative, and with
  it every prediction for a call of non-negative features is >= 0. (A free intercept only
  helps a model that is wrong in shape, say a concave curve over the data's range; there it
  would buy a little in-range fit with nonsense below it.) A feature that takes negative values
  is not a count: its coefficient is free. Solved as non-negative least squares
  (:func:`nnls`, Lawson–Hanson's active set).
* Robust to outlier calls. A host in a slow state makes a whole call slow (every stage × 1.3-2):
  no feature predicts that, and plain least squares lets a few such calls drag the fit.
  Iteratively reweighted least squares with Huber's weight (``c`` = :data:`HUBER_C`) on the
  relative residual, the scale from the residuals' MAD (× 1.4826, recomputed each round, never
  below :data:`MIN_SCALE`), at most :data:`IRLS_ITERATIONS` rounds from the plain weighted
  fit: no randomness, the same records give the same model. Huber's loss is convex, so the fit
  does not depend on where it starts; an outlier keeps a bounded pull (its weight falls as
  1/|residual|) rather than being dropped. Rows whose relative residual is above
  :data:`OUTLIER_Z` robust scales (the modified z-score of Iglewicz and Hoaglin) are the
  stage's outliers: named by sample id in :attr:`Quality.outliers`, never silently removed;
  they stay in the held-out errors.
* Scored honestly. Held-out MAPE is the headline; the median absolute percentage error stands
  beside it (:attr:`Quality.median_ape_pct`), because MAPE is dominated by the outlier calls no
  model can predict and the median says how well the typical call is predicted.

``fit(..., robust=False, nonnegative=False)`` is the plain weighted least squares of before
(kept for comparison: benchmarks/fit_refit.py).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .latency_model import (LatencyModel, LinearFit, Quality, feature_values, predict_columns, raw_names,
                            record_quantities, step_quantities)
from .records import StageRecord

__all__ = ["fit", "nnls", "DEFAULT_FEATURES", "MIN_RECORDS", "LatencyModel", "HUBER_C", "IRLS_ITERATIONS",
           "OUTLIER_Z"]

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
HUBER_C = 1.345        # Huber's tuning constant: 95% efficiency where the noise is Gaussian
IRLS_ITERATIONS = 30   # at most; it stops earlier once the weights settle
MIN_SCALE = 1e-6       # relative: the robust scale of residuals of (nearly) exact data
OUTLIER_Z = 3.5        # |relative residual| / robust scale above this: an outlier, named
_MAD_TO_SIGMA = 1.4826


# ---------------------------------------------------------------- the solver
def nnls(a: np.ndarray, b: np.ndarray, free: Sequence[bool] | np.ndarray | None = None,
         max_iter: int | None = None) -> np.ndarray:
    """``x`` minimising ||a x - b||₂ subject to ``x >= 0`` where ``free`` is False (every
    variable by default): Lawson and Hanson's active-set method (Solving Least Squares Problems,
    1974, ch. 23), free variables kept in the passive set from the start. Meant for a few
    columns, scaled alike (fit scales each to max |value| 1)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m, n = a.shape
    free = np.zeros(n, bool) if free is None else np.asarray(free, dtype=bool)
    if free.shape != (n,):
        raise ValueError(f"free must have one entry per column ({n}), got shape {free.shape}")
    x = np.zeros(n)
    if n == 0:
        return x
    tol = 10 * np.finfo(np.float64).eps * max(m, n) * max(float(np.abs(a).sum(axis=0).max()), 1e-300) \
        * max(float(np.abs(b).max()), 1e-300)

    def solve(passive: np.ndarray) -> np.ndarray:
        z = np.zeros(n)
        if passive.any():
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
        return z

    passive = free.copy()
    skip = np.zeros(n, bool)  # gradient said grow, the solve said no (rounding): not tried again until x moves
    x = solve(passive)
    for _ in range(max_iter if max_iter is not None else 3 * n + 10):
        w = a.T @ (b - a @ x)  # minus the gradient of ½||ax - b||²: where it is > 0, growing x helps
        cand = ~passive & ~skip & (w > tol)
        if not cand.any():
            break
        j = int(np.argmax(np.where(cand, w, -np.inf)))
        passive[j] = True
        z = solve(passive)
        if z[j] <= 0:
            passive[j], skip[j] = False, True
            continue
        for _inner in range(n + 1):
            bad = passive & ~free & (z <= 0)
            if not bad.any():
                break
            # step from x toward z as far as feasibility allows; the variable that hits 0 first leaves
            idx = np.flatnonzero(bad)
            gap = x[idx] - z[idx]
            ratio = np.where(gap > 0, x[idx] / np.where(gap > 0, gap, 1.0), 0.0)
            k = int(np.argmin(ratio))
            x = x + ratio[k] * (z - x)
            x[idx[k]] = 0.0
            gone = passive & ~free & (x <= 0)
            passive &= ~gone
            x[gone] = 0.0
            z = solve(passive)
        x = z
        x[~free] = np.maximum(x[~free], 0.0)  # a no-op but where the inner rounds ran out
        skip[:] = False
    return x


def _design(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scaled design with the intercept column, column scales, row weights 1 / measured)."""
    scale = np.maximum(np.abs(x).max(axis=0), 1e-300) if x.shape[1] else np.ones(0)
    weight = 1.0 / np.maximum(np.abs(y), 1e-3 * max(float(np.abs(y).max()), 1e-9))
    return np.column_stack([np.ones(len(y)), x / scale]), scale, weight


def _robust_scale(r: np.ndarray) -> float:
    return max(_MAD_TO_SIGMA * float(np.median(np.abs(r - np.median(r)))), MIN_SCALE)


class _Solution:
    __slots__ = ("intercept", "coef", "rel_residual", "scale", "huber_weight")

    def __init__(self, intercept: float, coef: np.ndarray, rel_residual: np.ndarray, scale: float,
                 huber_weight: np.ndarray) -> None:
        self.intercept, self.coef, self.rel_residual = intercept, coef, rel_residual
        self.scale, self.huber_weight = scale, huber_weight

    @property
    def outliers(self) -> np.ndarray:
        return np.abs(self.rel_residual) > OUTLIER_Z * self.scale


def _solve(x: np.ndarray, y: np.ndarray, robust: bool = True, nonnegative: bool = True) -> _Solution:
    """Intercept and coefficients minimising Σ ρ((y - fit) / y): ρ Huber's loss (``robust``) or
    the square; every coefficient of a column >= 0 everywhere, and the intercept, >= 0
    (``nonnegative``)."""
    a, scale, weight = _design(x, y)
    free = np.zeros(a.shape[1], bool)
    free[1:] = (x < 0).any(axis=0)  # a feature with negative values is no count
    aw, yw = a * weight[:, None], y * weight

    def solve(h: np.ndarray) -> np.ndarray:
        s = np.sqrt(h)
        if nonnegative:
            return nnls(aw * s[:, None], yw * s, free=free)
        return np.linalg.lstsq(aw * s[:, None], yw * s, rcond=None)[0]

    h = np.ones(len(y))
    beta = solve(h)
    r = yw - aw @ beta
    for _ in range(IRLS_ITERATIONS if robust else 0):
        u = np.abs(r) / (HUBER_C * _robust_scale(r))
        h_new = np.where(u > 1, 1 / np.maximum(u, 1e-300), 1.0)
        if np.max(np.abs(h_new - h)) < 1e-10:
            break
        h = h_new
        beta = solve(h)
        r = yw - aw @ beta
    return _Solution(float(beta[0]), beta[1:] / scale, r, _robust_scale(r), h)


# ---------------------------------------------------------------- the fit
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


def _held_out_ms(x: np.ndarray, y: np.ndarray, row_fold: np.ndarray, folds: int, **how: bool) -> np.ndarray:
    pred = np.full(len(y), np.nan)
    for f in range(folds):
        test = row_fold == f
        if test.any() and not test.all():
            sol = _solve(x[~test], y[~test], **how)
            pred[test] = sol.intercept + x[test] @ sol.coef
    return pred


def _quality(y: np.ndarray, fitted: np.ndarray, held_out: np.ndarray, coverage: float,
             outliers: tuple[str, ...] = ()) -> Quality:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - fitted) ** 2))
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("nan"))
    ok = (y > 0) & (held_out > 0)
    rel_pct = 100 * (y[ok] - held_out[ok]) / held_out[ok]
    tail = 100 * (1 - coverage) / 2
    low, high = np.percentile(rel_pct, [tail, 100 - tail]) if rel_pct.size else (np.nan, np.nan)
    ape = 100 * np.abs(y[ok] - held_out[ok]) / y[ok]
    mape, median = (float(np.mean(ape)), float(np.median(ape))) if ape.size else (float("nan"), float("nan"))
    return Quality(int(y.size), float(r2), mape, (float(low), float(high)), median, outliers)


def _worst(ids: Sequence[str | None], y: np.ndarray, held_out: np.ndarray) -> list[dict]:
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.where(y > 0, 100 * (held_out - y) / y, np.nan)
    order = [i for i in np.argsort(-np.nan_to_num(np.abs(err), nan=-1.0)) if np.isfinite(err[i])][:_WORST]
    return [{"sample_id": ids[i], "measured_ms": float(y[i]), "predicted_ms": float(held_out[i]),
             "error_pct": float(err[i])} for i in order]


def _fit_one(x: np.ndarray, names: Sequence[str], y: np.ndarray, row_fold: np.ndarray,
             folds: int, **how: bool) -> tuple[LinearFit, np.ndarray, np.ndarray]:
    """The fit on every row, each row's held-out prediction, and which rows are outliers."""
    kept = _kept_columns(x)
    xk = x[:, kept]
    sol = _solve(xk, y, **how)
    fitted = LinearFit(tuple(names[k] for k in kept), sol.intercept, tuple(float(c) for c in sol.coef),
                       tuple(n for k, n in enumerate(names) if k not in kept))
    return fitted, _held_out_ms(xk, y, row_fold, folds, **how), sol.outliers


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


def _name(records: list[StageRecord], i: int) -> str:
    return records[i].sample_id or f"record {i}"


def fit(records: Iterable[StageRecord], features: Mapping[str, Sequence[str]] | None = None, folds: int = 5,
        seed: int = 0, coverage: float = 0.95, robust: bool = True, nonnegative: bool = True) -> LatencyModel:
    """A :class:`LatencyModel` of ``records`` (those with an error are left out and counted).

    ``features``: per stage (``vision_ms``, ``prefill_ms``, ``decode_step_ms``, ``other_ms``,
    ``ttft_ms``, ``total_ms``), the features replacing :data:`DEFAULT_FEATURES`' (names of
    :data:`stagetrace.latency_model.FEATURES` or record fields). ``robust``: Huber IRLS (outlier
    calls lose their pull); ``nonnegative``: coefficients of count features and the intercept
    >= 0 (see the module's docstring); both False: plain weighted least squares. ValueError for
    too few records, an unknown stage, or a feature records do not carry.
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
    how = {"robust": bool(robust), "nonnegative": bool(nonnegative)}
    q = record_quantities(recs, raw_names(n for names in wanted.values() for n in names))
    record_fold = _folds_by_sample(recs, folds, seed)
    fits, held, skipped, outliers = {}, {}, {}, {}
    for target, names in wanted.items():
        rows, owner = step_quantities(q) if target == "decode_step_ms" else (q, np.arange(len(recs)))
        y = _target(recs, target)
        ok = np.isfinite(y)
        if len(np.unique(owner[ok])) < MIN_RECORDS:
            skipped[target] = f"measured in {len(np.unique(owner[ok]))} records (at least {MIN_RECORDS})"
            continue
        x = np.column_stack([feature_values(n, rows)[ok] for n in names]) if names else np.zeros((ok.sum(), 0))
        fits[target], held[target], out = _fit_one(x, names, y[ok], record_fold[owner[ok]], folds, **how)
        # a record is named once per stage, however many of its steps were outliers
        outliers[target] = tuple(_name(recs, int(i)) for i in dict.fromkeys(owner[ok][out].tolist()))
        if target == "decode_step_ms":
            held["decode_ms"] = np.bincount(owner[ok], held[target], minlength=len(recs))
    solver = {"nonnegative": how["nonnegative"], "robust": "huber" if robust else None, "relative_residuals": True}
    if robust:
        solver.update(huber_c=HUBER_C, max_iterations=IRLS_ITERATIONS, outlier_z=OUTLIER_Z)
    return _model(recs, q, fits, held, folds, seed, coverage, len(all_records), skipped, outliers, solver)


def _model(recs: list[StageRecord], q: dict[str, np.ndarray], fits: dict[str, LinearFit],
           held: dict[str, np.ndarray], folds: int, seed: int, coverage: float, n_all: int,
           skipped: dict[str, str], outliers: dict[str, tuple[str, ...]], solver: dict) -> LatencyModel:
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
                                             coverage, outliers.get("decode_step_ms", ()))
    for target in (t for t in fitted if t in held):
        y = _target(recs, target)
        ok = np.isfinite(y) & np.isfinite(held[target]) & (q["decode_steps"] > 0 if target in ("decode_ms", "tpot_ms")
                                                          else True)
        quality[target] = _quality(y[ok], fitted[target][ok], held[target][ok], coverage, outliers.get(target, ()))
        worst[target] = _worst([ids[i] for i in np.flatnonzero(ok)], y[ok], held[target][ok])
    trained = {"records": n_all, "errors_left_out": n_all - len(recs), "folds": folds, "seed": seed,
               "coverage": coverage, "skipped": skipped, "solver": solver}
    return LatencyModel(fits, quality, worst, trained)
