"""``stagetrace fit RECORDS... -o model.json``: per-stage latency models, their R² and held-out error."""
from __future__ import annotations

import argparse
import math
from typing import Any

from .common import CliError, show
from .report import load_many, record_paths
from .sweep import parse_point_filter, point_label, points_of, select_point

# Sweep settings whose effect no feature of a fit carries: records of several values are not fitted
# together. (max_new_tokens, batch_size and processor settings act through output, batch and token counts.)
UNMODELLED = ("dtype",)


def _fittable(records: list[Any], want: dict[str, Any]) -> list[Any]:
    records = select_point(records, want, "the records")
    for key in UNMODELLED:
        values = {str(p[key]) for p in points_of(records) if p and key in p}
        if len(values) > 1:
            raise CliError(f"the records hold sweep points of {len(values)} {key}s ({', '.join(sorted(values))}): "
                           f"no feature of a latency model tells them apart; fit one with --point {key}=VALUE")
    return records
from .safe_io import output_file

__all__ = ["cmd_fit", "add_fit_parser", "format_model"]


def add_fit_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fit", help="fit per-stage latency models to records; saved as JSON (stagetrace.LatencyModel)")
    f.add_argument("records", nargs="+", metavar="RECORDS", help="records files or run folders")
    f.add_argument("-o", "--output", required=True, metavar="MODEL.json")
    f.add_argument("--seed", type=int, default=0, help="of the held-out folds")
    f.add_argument("--folds", type=int, default=5, help="held-out folds over the records (2 to 10)")
    f.add_argument("--point", action="append", default=None, metavar="KEY=VALUE",
                   help="fit the records of these sweep points only (repeatable); needed when they hold several "
                        "dtypes, which no feature models")
    f.set_defaults(fn=cmd_fit)


def _pct(v: float, fmt: str = ".1f") -> str:
    return "-" if not math.isfinite(v) else format(v, fmt) + "%"


def format_model(model: Any) -> str:
    """R², held-out MAPE and median APE, interval and features per output, the outlier records
    the robust fit down-weighted, then the worst held-out records of the total."""
    t = model.trained
    lines = [f"fitted on {t['records']} records" + (f" ({t['errors_left_out']} with an error, left out)"
                                                    if t["errors_left_out"] else "")
             + f"; held out: {t['folds']}-fold over records, seed {t['seed']}"]
    header = ["output", "rows", "R²", "held-out MAPE", "median APE", f"{100 * t['coverage']:g}% interval",
              "features"]
    rows = [header]
    for target, q in model.quality.items():
        fit = model.fits.get(target)
        feats = ("sum of decode_step_ms" if fit is None else ", ".join(fit.features) or "(constant)") + (
            f" (dropped: {', '.join(fit.dropped)})" if fit is not None and fit.dropped else "")
        low, high = q.interval_pct
        rows.append([target, str(q.rows), "-" if not math.isfinite(q.r2) else f"{q.r2:.4f}", _pct(q.mape_pct),
                     _pct(q.median_ape_pct), f"[{_pct(low, '+.1f')}, {_pct(high, '+.1f')}]", feats])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines += ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]) for r in rows]
    lines += [f"left out: {target}, {why}" for target, why in t.get("skipped", {}).items()]
    for target, q in model.quality.items():
        if q.outliers:  # in the fit with a small weight, and in the held-out errors
            lines.append(f"outliers of {target} ({len(q.outliers)} records, down-weighted): "
                         + ", ".join(show(s) for s in q.outliers[:8]) + (", ..." if len(q.outliers) > 8 else ""))
    worst = model.worst.get("total_ms", [])
    if worst:
        lines.append("worst held-out predictions of total_ms: " + "; ".join(
            f"{show(w['sample_id'] or '(no id)')} {w['measured_ms']:.3f} ms, predicted {w['predicted_ms']:.3f} "
            f"({w['error_pct']:+.1f}%)" for w in worst))
    return "\n".join(lines)


def cmd_fit(args: argparse.Namespace) -> int:
    from stagetrace.fit import MIN_RECORDS, fit
    from stagetrace.latency_model import MODEL_KIND

    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    if not 2 <= args.folds <= MIN_RECORDS:
        raise CliError(f"--folds must be between 2 and {MIN_RECORDS}, got {args.folds}")
    want = parse_point_filter(args.point)
    files = record_paths(args.records)
    out = output_file(args.output, files, "-o", kind=MODEL_KIND)
    records = _fittable(load_many(files), want)
    points = points_of(records)
    if len(points) > 1 or points[0]:
        print(f"fitting {len(records)} records of {len(points)} sweep point(s): "
              + "; ".join(point_label(p) for p in points[:6]) + ("; ..." if len(points) > 6 else ""))
    try:
        model = fit(records, folds=args.folds, seed=args.seed)
    except ValueError as exc:
        raise CliError(show(exc)) from None
    print(format_model(model))
    try:
        model.save(out)
    except OSError as exc:
        raise CliError(f"-o {show(out)} cannot be written: {exc.strerror or exc}") from None
    print(f"wrote {show(out)}")
    return 0
