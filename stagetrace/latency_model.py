"""A fitted latency model: per-stage linear models, how well they predict held-out records,
and predictions with an interval. Made by :func:`stagetrace.fit.fit`; saved as versioned JSON.

A stage's model is ``intercept + Σ coef × feature``; a feature is a function of what a call
did (:data:`FEATURES`: prompt tokens, their square, batch size, decode context, ...) or, for
any other name, a record field of that name (``image_tokens``, once records carry it).
``decode_step_ms`` is modelled per step; ``decode_ms`` is the sum of its steps' predictions
and ``tpot_ms`` that sum over the steps.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .records import StageRecord

__all__ = ["LatencyModel", "LinearFit", "Quality", "FEATURES", "MODEL_KIND", "MODEL_VERSION", "record_quantities",
           "step_quantities"]

MODEL_KIND = "stagetrace-latency-model"
MODEL_VERSION = 1
Quantities = Mapping[str, np.ndarray]


def _context_sum(q: Quantities) -> np.ndarray:
    """Σ over the decode steps of the context each step attends to (prompt + tokens so far)."""
    s = q["decode_steps"]
    return s * (q["prompt_tokens"] + 1) + s * (s - 1) / 2


FEATURES: dict[str, Callable[[Quantities], np.ndarray]] = {
    "prompt_tokens": lambda q: q["prompt_tokens"],
    "prompt_tokens_sq": lambda q: q["prompt_tokens"] ** 2,  # attention over the prompt
    "batch_size": lambda q: q["batch_size"],
    "batch_prompt_tokens": lambda q: q["batch_size"] * q["prompt_tokens"],
    "batch_prompt_tokens_sq": lambda q: q["batch_size"] * q["prompt_tokens"] ** 2,
    "decode_steps": lambda q: q["decode_steps"],
    "batch_decode_steps": lambda q: q["batch_size"] * q["decode_steps"],
    "decode_context_sum": _context_sum,
    "batch_decode_context_sum": lambda q: q["batch_size"] * _context_sum(q),
    "context_tokens": lambda q: q["context_tokens"],  # per decode step: prompt + 1 + step index
    "batch_context_tokens": lambda q: q["batch_size"] * q["context_tokens"],
}
_BASE = ("prompt_tokens", "output_tokens", "batch_size", "decode_steps")
# what predict() returns, in this order; the stages of STAGES
OUTPUTS = ("total_ms", "vision_ms", "prefill_ms", "decode_ms", "other_ms", "ttft_ms", "tpot_ms")


def feature_values(name: str, q: Quantities) -> np.ndarray:
    if name in FEATURES:
        values = np.asarray(FEATURES[name](q), dtype=np.float64)
    elif name not in q:
        raise ValueError(f"feature {name!r} needs {name}= (a quantity records do not carry)")
    else:
        values = np.asarray(q[name], dtype=np.float64)
    if not np.all(np.isfinite(values)):  # a fit on NaN columns would fail far from here, or quietly
        raise ValueError(f"feature {name!r} is not a number for every call (output_tokens is None where "
                         "generate() returned no (batch, tokens) sequences to count)")
    return values


def raw_names(names: Iterable[str]) -> list[str]:
    """Feature names that are not functions of the base quantities: record fields."""
    return [n for n in names if n not in FEATURES and n not in _BASE]


def record_quantities(records: list[StageRecord], extra: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """What each record's call did, as columns; ``extra`` fields (say ``image_tokens``) must be numbers."""
    q = {"prompt_tokens": [r.prompt_tokens for r in records], "output_tokens": [r.output_tokens for r in records],
         "batch_size": [r.batch_size for r in records], "decode_steps": [len(r.decode_step_ms) for r in records]}
    for name in extra:
        values = [getattr(r, name, None) for r in records]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"feature {name!r}: records do not carry it as a number (StageRecord has no such field, "
                             "or some records lack it)")
        q[name] = values
    return {k: np.asarray(v, dtype=np.float64) for k, v in q.items()}


def step_quantities(q: Quantities) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One row per decode step (record by record, step by step) and the record each row belongs to."""
    steps = q["decode_steps"].astype(np.int64)
    owner = np.repeat(np.arange(steps.size), steps)
    index = np.arange(owner.size) - np.repeat(np.cumsum(steps) - steps, steps)
    rows = {k: v[owner] for k, v in q.items()}
    rows["context_tokens"] = rows["prompt_tokens"] + 1 + index
    return rows, owner


@dataclass(frozen=True)
class LinearFit:
    features: tuple[str, ...]     # those kept
    intercept_ms: float
    coef_ms: tuple[float, ...]    # per unit of each feature
    dropped: tuple[str, ...] = ()  # asked for, but constant or redundant in the data

    def predict_ms(self, q: Quantities) -> np.ndarray:
        n = len(next(iter(q.values())))
        out = np.full(n, self.intercept_ms)
        for name, c in zip(self.features, self.coef_ms):
            out += c * feature_values(name, q)
        return out


@dataclass(frozen=True)
class Quality:
    rows: int                     # records (steps for decode_step_ms) it was measured on
    r2: float                     # of the fit on every row
    mape_pct: float               # held out: each row predicted by a fit that did not see its record
    interval_pct: tuple[float, float]  # held-out truth lies within prediction × (1 + these / 100)
    # held out too: the typical row's error, where MAPE is dominated by the few calls no model predicts
    # (NaN in a model saved before it was kept)
    median_ape_pct: float = math.nan
    outliers: tuple[str, ...] = ()  # sample ids (or "record N") of the records the robust fit down-weighted most


def predict_columns(fits: Mapping[str, LinearFit], q: Quantities) -> dict[str, np.ndarray]:
    """Every output the fits give, for each call of ``q`` (decode from its steps)."""
    out = {t: f.predict_ms(q) for t, f in fits.items() if t != "decode_step_ms"}
    if "decode_step_ms" in fits:
        rows, owner = step_quantities(q)
        n = q["decode_steps"].size
        out["decode_ms"] = np.bincount(owner, fits["decode_step_ms"].predict_ms(rows), minlength=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["tpot_ms"] = np.where(q["decode_steps"] > 0, out["decode_ms"] / q["decode_steps"], np.nan)
    return out


def _finite(v: Any, what: str) -> float:
    if v is None:
        return math.nan
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"{what} is {v!r}, not a number")
    return float(v)


@dataclass
class LatencyModel:
    fits: dict[str, LinearFit]
    quality: dict[str, Quality]
    worst: dict[str, list[dict[str, Any]]]  # per output: the records it predicted worst, held out
    trained: dict[str, Any]                  # records, folds, seed, coverage, what was left out and why

    def predict(self, prompt_tokens: int, output_tokens: int, batch_size: int = 1,
                **quantities: float) -> dict[str, dict[str, float] | None]:
        """Each stage and the total for one call: ``{"ms", "low_ms", "high_ms"}``, or None for
        a stage the records never had (vision in a text-only run). ``quantities``: values of
        the features that are record fields (``image_tokens=...``)."""
        for name, v, low in (("prompt_tokens", prompt_tokens, 0), ("output_tokens", output_tokens, 0),
                             ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        q = {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "batch_size": batch_size,
             "decode_steps": max(output_tokens - 1, 0), **quantities}
        cols = predict_columns(self.fits, {k: np.array([v], dtype=np.float64) for k, v in q.items()})
        return {t: self._with_interval(t, float(cols[t][0])) if t in cols else None for t in OUTPUTS}

    def _with_interval(self, target: str, ms: float) -> dict[str, float] | None:
        if not math.isfinite(ms):
            return None
        ms = max(ms, 0.0)
        low, high = self.quality[target].interval_pct if target in self.quality else (math.nan, math.nan)
        return {"ms": ms, "low_ms": max(ms * (1 + low / 100), 0.0), "high_ms": ms * (1 + high / 100)}

    def predict_records(self, records: Iterable[StageRecord]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per output: (measured, predicted) over the timed records that measured it."""
        recs = [r for r in records if r.error is None]
        if not recs:
            return {}
        names = raw_names(n for f in self.fits.values() for n in f.features)
        pred = predict_columns(self.fits, record_quantities(recs, names))
        out = {}
        for t, p in pred.items():
            measured = np.array([np.nan if getattr(r, t) is None else getattr(r, t) for r in recs], dtype=np.float64)
            ok = np.isfinite(measured) & np.isfinite(p)
            if ok.any():
                out[t] = (measured[ok], p[ok])
        return out

    def evaluate(self, records: Iterable[StageRecord]) -> dict[str, dict[str, float]]:
        """How well it predicts ``records`` (say, ones held out of its fit): MAPE, the median
        APE and the share inside the interval, per output, over the records that measured it above 0."""
        out = {}
        for t, (y, p) in self.predict_records(records).items():
            y, p = y[y > 0], p[y > 0]
            if not y.size or t not in self.quality:
                continue
            low, high = self.quality[t].interval_pct
            inside = (y >= p * (1 + low / 100)) & (y <= p * (1 + high / 100))
            ape = 100 * np.abs(y - p) / y
            out[t] = {"rows": int(y.size), "mape_pct": float(np.mean(ape)), "median_ape_pct": float(np.median(ape)),
                      "inside_interval": float(np.mean(inside))}
        return out

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        nan_free = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        quality = {t: {k: ([nan_free(x) for x in v] if isinstance(v, tuple) else nan_free(v))
                       for k, v in asdict(q).items()} for t, q in self.quality.items()}
        return {"kind": MODEL_KIND, "version": MODEL_VERSION, "fits": {t: asdict(f) for t, f in self.fits.items()},
                "quality": quality, "worst": self.worst, "trained": self.trained}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the model as JSON, whole or not at all."""
        from .export.files import write_bytes_atomically

        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        return write_bytes_atomically(path, text.encode("utf-8"))

    @classmethod
    def from_dict(cls, d: Any) -> "LatencyModel":
        if not isinstance(d, dict) or d.get("kind") != MODEL_KIND:
            raise ValueError("not a stagetrace latency model (no \"kind\": \"stagetrace-latency-model\")")
        if d.get("version") != MODEL_VERSION:
            raise ValueError(f"latency model version {d.get('version')!r}: this stagetrace reads version "
                             f"{MODEL_VERSION}")
        try:
            fits = {str(t): LinearFit(tuple(str(n) for n in f["features"]), _finite(f["intercept_ms"], "intercept"),
                                      tuple(_finite(c, "a coefficient") for c in f["coef_ms"]),
                                      tuple(str(n) for n in f.get("dropped", ())))
                    for t, f in d["fits"].items()}
            quality = {str(t): Quality(int(q["rows"]), _finite(q["r2"], "r2"), _finite(q["mape_pct"], "mape_pct"),
                                       tuple(_finite(x, "interval_pct") for x in q["interval_pct"]),
                                       _finite(q.get("median_ape_pct"), "median_ape_pct"),
                                       tuple(str(s) for s in q.get("outliers") or ()))
                       for t, q in d["quality"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"a latency model with a missing or malformed field ({type(exc).__name__}: {exc})") \
                from None
        bad = [t for t, f in fits.items() if len(f.coef_ms) != len(f.features) or not all(
            math.isfinite(c) for c in (f.intercept_ms, *f.coef_ms))]
        bad += [t for t, q in quality.items() if len(q.interval_pct) != 2]
        if bad:
            raise ValueError(f"a latency model whose {bad[0]} is malformed (coefficients, features or interval)")
        worst, trained = d.get("worst", {}), d.get("trained", {})
        return cls(fits, quality, worst if isinstance(worst, dict) else {},
                   trained if isinstance(trained, dict) else {})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LatencyModel":
        """Reads a model :meth:`save` wrote; ValueError (one line) for a file that is not one."""
        try:
            data = json.loads(Path(path).read_bytes())
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{path}: not JSON ({str(exc).splitlines()[0][:80]})") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
