"""Two runs compared, stage by stage: is B faster, slower, or within the noise of A?

For each stage and each of p50/p90/p99: A, B, Δ = B - A, Δ% = 100 Δ / A, a bootstrap
interval of Δ% (seeded; resampling records), a noise floor from A against itself, and a
verdict. When both runs hold the same samples (sample ids) the comparison is *paired*: the
bootstrap resamples samples, keeping A's and B's measurement of each together, and the
p50 row's Δ is the median of the per-sample differences (so Δ is not B - A there).

The noise floor is the |Δ%| within which ``confidence`` of A-against-itself comparisons
fall. Unpaired: random splits of A into two halves, half against half. Paired: two records of
the same samples in A, drawn at random among each sample's repeats (a paired comparison's
null); when A measured each sample once there is no floor and the verdict rests on the
interval (split halves would measure the spread between samples, which pairing removes).
A row is "slower" or "faster" only when its interval excludes 0 *and* |Δ%| is above the
floor; otherwise "no change"; "n/a" when it cannot be said (A's statistic is 0).

Pure numpy; no CLI code (formats: :mod:`stagetrace.export.comparison`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from .records import StageRecord

__all__ = ["compare", "Comparison", "ComparisonRow", "STAGES", "STATS", "MIN_VALUES"]

STAGES = ("vision", "prefill", "decode", "tpot", "ttft", "other", "total")
STATS = ("p50", "p90", "p99")
_PERCENTS = np.array([50.0, 90.0, 99.0])
MIN_VALUES = 5  # per run and stage; fewer and the stage is left out (with the reason)
_CHUNK_VALUES = 1 << 22  # resampled values held at once (32 MiB of float64)


@dataclass(frozen=True)
class ComparisonRow:
    stage: str
    stat: str
    a_ms: float
    b_ms: float
    delta_ms: float
    delta_pct: float
    low_pct: float     # the bootstrap interval of delta_pct
    high_pct: float
    noise_pct: float   # the noise floor: |Δ%| of A against itself (NaN: none measured)
    verdict: str       # "faster", "slower", "no change" or "n/a"
    n_a: int
    n_b: int


@dataclass
class Comparison:
    rows: list[ComparisonRow]
    paired: bool
    pairing: str          # how the records were matched, in words
    noise: str            # how the noise floor was measured, in words
    records_a: int        # records read (with an error or not)
    records_b: int
    errors_a: int         # records with an error: left out
    errors_b: int
    reps: int
    seed: int
    confidence: float
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> why it has no rows

    def slower_than(self, pct: float, stages: Sequence[str] | None = None) -> list[ComparisonRow]:
        """The p50 rows slower by more than ``pct`` % with their whole interval above 0."""
        return [r for r in self.rows if r.stat == "p50" and (stages is None or r.stage in stages)
                and r.delta_pct > pct and r.low_pct > 0]

    def to_dict(self) -> dict:
        """Plain JSON data: NaN (a value that cannot be said) is None."""
        d = asdict(self)
        d["rows"] = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                     for r in d["rows"]]
        return {"kind": "stagetrace-comparison", "version": 1, **d}


def compare(a_records: Iterable[StageRecord], b_records: Iterable[StageRecord], stages: Sequence[str] = STAGES,
            reps: int = 2000, seed: int = 0, confidence: float = 0.95, paired: bool | None = None) -> Comparison:
    """Compares run B against run A (see the module doc).

    ``paired``: None pairs by sample id when at least half of each run's timed records have
    an id the other run holds too; True requires that (ValueError otherwise); False never
    pairs. A sample recorded several times in a run counts with the median of its values.
    """
    a_all, b_all = list(a_records), list(b_records)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}: choose from {', '.join(STAGES)}")
    if reps < 10 or not 0 < confidence < 1:
        raise ValueError(f"reps must be >= 10 and confidence in (0, 1), got {reps} and {confidence}")
    a = [r for r in a_all if r.error is None]
    b = [r for r in b_all if r.error is None]
    is_paired, pairing = _pairing(a, b, paired)
    noise = _noise_words(a, b, is_paired)
    rows: list[ComparisonRow] = []
    skipped: dict[str, str] = {}
    for stage in stages:
        va, vb, repeats = _paired_values(a, b, stage) if is_paired else (_values(a, stage), _values(b, stage), None)
        if min(va.size, vb.size) < MIN_VALUES:
            skipped[stage] = f"too few values (A {va.size}, B {vb.size}; at least {MIN_VALUES} each)"
            continue
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, STAGES.index(stage)]).spawn(2)]
        rows += _stage_rows(stage, va, vb, repeats, rngs, reps, confidence)
    return Comparison(rows, is_paired, pairing, noise, len(a_all), len(b_all), len(a_all) - len(a), len(b_all) - len(b),
                      reps, seed, confidence, skipped)


# ---------------------------------------------------------------- values and pairing
def _value(r: StageRecord, stage: str) -> float | None:
    return getattr(r, f"{stage}_ms")


def _values(records: list[StageRecord], stage: str) -> np.ndarray:
    return np.array([v for v in (_value(r, stage) for r in records) if v is not None], dtype=np.float64)


def _by_sample(records: list[StageRecord], stage: str) -> dict[str, list[float]]:
    """Each sample id's values, one per record that measured the stage."""
    seen: dict[str, list[float]] = {}
    for r in records:
        v = _value(r, stage)
        if r.sample_id and v is not None:
            seen.setdefault(r.sample_id, []).append(v)
    return seen


def _paired_values(a: list[StageRecord], b: list[StageRecord],
                   stage: str) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """A's and B's value of each shared sample (the median of its records), and A's values of
    the shared samples it measured more than once."""
    ma, mb = _by_sample(a, stage), _by_sample(b, stage)
    shared = sorted(ma.keys() & mb.keys())
    return (np.array([np.median(ma[s]) for s in shared]), np.array([np.median(mb[s]) for s in shared]),
            [ma[s] for s in shared if len(ma[s]) >= 2])


def _noise_words(a: list[StageRecord], b: list[StageRecord], paired: bool) -> str:
    if not paired:
        return "random splits of A into halves, half against half"
    ids_b = {r.sample_id for r in b}
    counts: dict[str, int] = {}
    for r in a:
        if r.sample_id in ids_b:
            counts[r.sample_id] = counts.get(r.sample_id, 0) + 1
    repeated = sum(n >= 2 for n in counts.values())
    if repeated >= MIN_VALUES:
        return f"two records of the same sample in A, drawn at random ({repeated} samples measured more than once)"
    return "none: A measured (almost) every sample once, so verdicts rest on the interval"


def _pairing(a: list[StageRecord], b: list[StageRecord], paired: bool | None) -> tuple[bool, str]:
    shared = {r.sample_id for r in a if r.sample_id} & {r.sample_id for r in b if r.sample_id}
    in_a = sum(r.sample_id in shared for r in a)
    in_b = sum(r.sample_id in shared for r in b)
    can = len(shared) >= 2 and 2 * in_a >= len(a) and 2 * in_b >= len(b)
    if paired is False:
        return False, "unpaired (as asked)"
    if can:
        left = (len(a) - in_a) + (len(b) - in_b)
        return True, (f"paired by sample id: {len(shared)} samples in both runs"
                      + (f" ({left} records of samples in one run only left out)" if left else ""))
    why = ("the records carry no sample ids" if not any(r.sample_id for r in a + b) else
           f"only {len(shared)} sample ids are in both runs ({in_a} of A's {len(a)} timed records, "
           f"{in_b} of B's {len(b)})")
    if paired:
        raise ValueError(f"cannot pair the runs by sample id: {why}; at least half of each run's must be")
    return False, f"unpaired: {why}"


# ---------------------------------------------------------------- statistics
def _index_chunks(rng: np.random.Generator, n: int, reps: int) -> Iterator[np.ndarray]:
    """``reps`` bootstrap resamples of ``range(n)`` as index rows, a few at a time."""
    per_chunk = max(1, _CHUNK_VALUES // n)
    for start in range(0, reps, per_chunk):
        yield rng.integers(0, n, size=(min(per_chunk, reps - start), n))


def _pct(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 100.0 * (new - old) / old
    return np.where(np.isfinite(out), out, np.nan)


def _delta_pct_rows(ra: np.ndarray, rb: np.ndarray, paired: bool) -> np.ndarray:
    """Δ% of p50/p90/p99 of each row of ``rb`` against the same row of ``ra``: shape (3, rows);
    paired, p50's Δ is the median of the differences."""
    sa = np.percentile(ra, _PERCENTS, axis=1)
    d = _pct(np.percentile(rb, _PERCENTS, axis=1), sa)
    if paired:
        d[0] = _pct(sa[0] + np.median(rb - ra, axis=1), sa[0])
    return d


def _resampled_delta_pct(a: np.ndarray, b: np.ndarray, paired: bool, rng: np.random.Generator,
                         reps: int) -> np.ndarray:
    """Δ% of p50/p90/p99 in each bootstrap resample: shape (3, reps)."""
    if paired:
        parts = [_delta_pct_rows(a[idx], b[idx], True) for idx in _index_chunks(rng, a.size, reps)]
    else:
        parts = [_delta_pct_rows(a[ia], b[ib], False)
                 for ia, ib in zip(_index_chunks(rng, a.size, reps), _index_chunks(rng, b.size, reps))]
    return np.concatenate(parts, axis=1)


def _repeat_noise_floor_pct(repeats: list[list[float]], rng: np.random.Generator, reps: int,
                            confidence: float) -> np.ndarray:
    """Paired: |Δ%| of one record of each sample against another of the same sample, in A, that
    ``confidence`` of random draws stay within; NaN when too few samples were measured twice."""
    if len(repeats) < MIN_VALUES:
        return np.full(_PERCENTS.size, np.nan)
    counts = np.array([len(r) for r in repeats])
    table = np.full((len(repeats), counts.max()), np.nan)
    for row, values in enumerate(repeats):
        table[row, :len(values)] = values
    samples, per_chunk = np.arange(len(repeats)), max(1, _CHUNK_VALUES // len(repeats))
    parts = []
    for start in range(0, reps, per_chunk):
        k = min(per_chunk, reps - start)
        first = (rng.random((k, samples.size)) * counts).astype(np.int64)
        second = (first + 1 + (rng.random((k, samples.size)) * (counts - 1)).astype(np.int64)) % counts
        parts.append(_delta_pct_rows(table[samples, first], table[samples, second], True))
    return _nan_percentile(np.abs(np.concatenate(parts, axis=1)), 100 * confidence)


def _noise_floor_pct(a: np.ndarray, rng: np.random.Generator, reps: int, confidence: float) -> np.ndarray:
    """|Δ%| of half against half of A that ``confidence`` of random splits stay within, per statistic."""
    half, per_chunk = a.size // 2, max(1, _CHUNK_VALUES // a.size)
    parts = []
    for start in range(0, reps, per_chunk):
        k = min(per_chunk, reps - start)
        order = np.argsort(rng.random((k, a.size)), axis=1)
        parts.append(_delta_pct_rows(a[order[:, :half]], a[order[:, half:2 * half]], False))
    return _nan_percentile(np.abs(np.concatenate(parts, axis=1)), 100 * confidence)


def _nan_percentile(x: np.ndarray, q: float | list[float]) -> np.ndarray:
    """Percentiles along the last axis, NaN left out; NaN where nothing is left."""
    out = np.full((*np.shape(q), x.shape[0]), np.nan)
    ok = ~np.all(np.isnan(x), axis=-1)
    if ok.any():
        out[..., ok] = np.nanpercentile(x[ok], q, axis=-1)
    return out


def _verdict(delta_pct: float, low: float, high: float, noise: float) -> str:
    """The verdict of a row; without a noise floor (NaN), the interval alone decides."""
    if not all(math.isfinite(v) for v in (delta_pct, low, high)):
        return "n/a"
    noise = noise if math.isfinite(noise) else 0.0
    if low > 0 and delta_pct > noise:
        return "slower"
    if high < 0 and -delta_pct > noise:
        return "faster"
    return "no change"


def _stage_rows(stage: str, a: np.ndarray, b: np.ndarray, repeats: list[list[float]] | None,
                rngs: list[np.random.Generator], reps: int, confidence: float) -> list[ComparisonRow]:
    """``repeats``: None unpaired; paired, A's values of the samples it measured more than once."""
    paired = repeats is not None
    sa, sb = np.percentile(a, _PERCENTS), np.percentile(b, _PERCENTS)
    delta = sb - sa
    if paired:
        delta[0] = float(np.median(b - a))
    delta_pct = _pct(sa + delta, sa)
    tail = 100 * (1 - confidence) / 2
    low, high = _nan_percentile(_resampled_delta_pct(a, b, paired, rngs[0], reps), [tail, 100 - tail])
    noise = (_repeat_noise_floor_pct(repeats, rngs[1], reps, confidence) if paired
             else _noise_floor_pct(a, rngs[1], reps, confidence))
    return [ComparisonRow(stage, stat, float(sa[i]), float(sb[i]), float(delta[i]), float(delta_pct[i]),
                          float(low[i]), float(high[i]), float(noise[i]),
                          _verdict(delta_pct[i], low[i], high[i], noise[i]), int(a.size), int(b.size))
            for i, stat in enumerate(STATS)]
