"""Refit saved records: plain weighted least squares (the fit before) against the robust,
non-negative fit (stagetrace.fit's default), beside the records' repeat-noise floor.

  python benchmarks/fit_refit.py RECORDS... --out DIR [--card "NVIDIA H200" --driver 580.159.04]

RECORDS: records files (JSONL) or folders of them. Each fit is scored as stagetrace.fit
scores it: k-fold held out by sample id (--folds, --seed), per stage MAPE and median APE.
Three fits: "before" (fit(..., robust=False, nonnegative=False): the old solver), "nnls"
(non-negative only) and "after" (the default: non-negative and Huber-robust). The noise floor
(benchmarks/_noise.py), per sample measured more than once: the repeat noise (each
measurement against each other one of its sample, scored as a fit is) and the strict floor
(the least MAPE any model of the call's features can have on these records). Writes
DIR/fit_refit-<card>.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import save, table  # noqa: E402
from _noise import STAGES, repeat_noise, within  # noqa: E402

FITS = {"before": {"robust": False, "nonnegative": False}, "nnls": {"robust": False}, "after": {}}


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        out += sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    return out


def refit(records: list, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    from stagetrace.fit import fit

    results: dict[str, Any] = {}
    for name, how in FITS.items():
        m = fit(records, folds=folds, seed=seed, **how)
        results[name] = {
            "quality": {t: {"rows": q.rows, "r2": q.r2, "mape_pct": q.mape_pct, "median_ape_pct": q.median_ape_pct,
                            "interval_pct": list(q.interval_pct), "outliers": list(q.outliers)}
                        for t, q in m.quality.items()},
            "fits": {t: {"features": list(f.features), "intercept_ms": f.intercept_ms, "coef_ms": list(f.coef_ms)}
                     for t, f in m.fits.items()},
            "solver": m.trained.get("solver")}
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path, metavar="RECORDS")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--card", default=None, help="the card the records were measured on (records do not say)")
    ap.add_argument("--driver", default=None)
    args = ap.parse_args(argv)

    from stagetrace import load_records

    files = _files(args.records)
    records = [r for f in files for r in load_records(f)]
    versions = next((r.versions for r in records if getattr(r, "versions", None)), {}) or {}
    env = {"refit_date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "card": args.card or "unknown", "driver": args.driver, "torch": versions.get("torch"), "transformers": versions.get("transformers"),
           "stagetrace_of_records": versions.get("stagetrace"), "note": "the records' measuring environment; "
           "the refit itself runs on the CPU"}
    fits = refit(records, args.folds, args.seed)
    floor = repeat_noise(records)
    after = fits["after"]["quality"]
    verdict = {t: within(after[t], floor.get(t)) for t in after}
    payload = {"benchmark": "fit_refit", "env": env, "device": "cpu (refit of saved records)",
               "files": [str(f) for f in files], "records": len(records),
               "samples": len({r.sample_id for r in records if r.sample_id}),
               "params": {"folds": args.folds, "seed": args.seed},
               "results": {"fits": fits, "noise_floor": floor, "after_within_noise_floor": verdict}}
    path = save("fit_refit", payload, args.out)

    rows = []
    for t in STAGES:
        if t not in after:
            continue
        b, n, a, f = fits["before"]["quality"][t], fits["nnls"]["quality"][t], after[t], floor.get(t)
        rows.append([t, b["mape_pct"], b["median_ape_pct"], n["mape_pct"], n["median_ape_pct"], a["mape_pct"],
                     a["median_ape_pct"], len(a["outliers"]), f["mape_pct"] if f else "", f["median_ape_pct"] if f
                     else "", f["best_constant_mape_pct"] if f else "", f["best_constant_median_ape_pct"] if f else "",
                     "/".join("yes" if verdict[t][k] else "no" for k in ("mape", "median")) if f else ""])
    print(f"{len(records)} records, {payload['samples']} samples, {args.folds}-fold by sample id "
          f"(card {env['card']}, torch {env['torch']}, transformers {env['transformers']})")
    print(table(rows, ["stage", "before MAPE", "before med", "nnls MAPE", "nnls med", "after MAPE", "after med",
                       "outliers", "repeat MAPE", "repeat med", "strict MAPE", "strict med",
                       "after within repeat noise (MAPE/med)"]))
    for t in ("prefill_ms", "total_ms"):
        for name in ("before", "after"):
            if t in fits[name]["fits"]:
                fi = fits[name]["fits"][t]
                print(f"{t} {name}: {fi['intercept_ms']:.4g} ms + "
                      + " + ".join(f"{c:.4g}·{n}" for n, c in zip(fi["features"], fi["coef_ms"])))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
