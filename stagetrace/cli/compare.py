"""``stagetrace compare A B``: run B against run A, stage by stage, with a verdict per row.

Exit status 1 is kept for ``--fail-if-slower``: a p50 slower than the threshold, its whole
interval above 0 (the outputs are written first). Bad inputs stay exit status 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .common import CliError, show
from .report import load_many, one_point, record_paths
from .sweep import parse_point_filter
from .safe_io import output_file, same_file, write_bytes_atomically

__all__ = ["cmd_compare", "add_compare_parser"]

MAX_REPS = 20_000


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    from stagetrace.compare import STAGES

    c = sub.add_parser("compare", help="run B against run A: Δ per stage with intervals and verdicts",
                       description="exit status: 0 done, 1 --fail-if-slower tripped, 2 bad input")
    c.add_argument("a", metavar="A", help="records file or run folder (the baseline)")
    c.add_argument("b", metavar="B", help="records file or run folder (the candidate)")
    c.add_argument("--csv", default=None, metavar="FILE")
    c.add_argument("--json", default=None, metavar="FILE|-", help="'-' writes it to stdout instead of the table")
    c.add_argument("--markdown", default=None, metavar="FILE|-", help="'-' writes it to stdout instead of the table")
    c.add_argument("--stage", nargs="+", choices=STAGES, default=None, help="only these stages (default: all)")
    c.add_argument("--fail-if-slower", type=float, default=None, metavar="PCT",
                   help="exit 1 when a selected stage's p50 is slower by more than PCT%% with its interval above 0")
    c.add_argument("--seed", type=int, default=0, help="of the bootstrap and the noise floor's splits")
    c.add_argument("--reps", type=int, default=2000, help=f"bootstrap resamples (100 to {MAX_REPS})")
    c.add_argument("--unpaired", action="store_true", help="do not pair records by sample id")
    c.add_argument("--point", action="append", default=None, metavar="KEY=VALUE",
                   help="compare the records of this sweep point (repeatable); needed when A or B holds several")
    c.set_defaults(fn=cmd_compare)


def _check_numbers(args: argparse.Namespace) -> None:
    if not 100 <= args.reps <= MAX_REPS:
        raise CliError(f"--reps must be between 100 and {MAX_REPS}, got {args.reps}")
    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    pct = args.fail_if_slower
    if pct is not None and not (math.isfinite(pct) and pct >= 0):
        raise CliError(f"--fail-if-slower must be a finite percentage >= 0, got {pct}")


def _outputs(args: argparse.Namespace, inputs: list[str]) -> dict[str, Path | None]:
    """Each output flag's file (None: stdout), all checked before anything is read."""
    given = {flag: v for flag, v in (("--csv", args.csv), ("--json", args.json), ("--markdown", args.markdown))
             if v is not None}
    if args.csv == "-":
        raise CliError("--csv - is not supported: give a file name")
    if sum(v == "-" for v in given.values()) > 1:
        raise CliError("only one of --json and --markdown can be '-' (stdout)")
    outs = {flag: None if v == "-" else output_file(v, inputs, flag, kind="stagetrace-comparison")
            for flag, v in given.items()}
    files = [(flag, p) for flag, p in outs.items() if p is not None]
    for i, (flag, p) in enumerate(files):
        for other, q in files[:i]:
            if same_file(p, q):
                raise CliError(f"{flag} and {other} name the same file {show(p)}: give each its own")
    return outs


def _write(outs: dict[str, Path | None], texts: dict[str, str]) -> None:
    for flag, path in outs.items():
        if path is None:
            sys.stdout.write(texts[flag])
            continue
        try:
            write_bytes_atomically(path, texts[flag].encode("utf-8"))
        except OSError as exc:
            raise CliError(f"{flag} {show(path)} cannot be written: {exc.strerror or exc}") from None
        print(f"wrote {show(path)}", file=sys.stderr if None in outs.values() else sys.stdout)


def cmd_compare(args: argparse.Namespace) -> int:
    from stagetrace.compare import STAGES, compare
    from stagetrace.export import comparison as fmt

    _check_numbers(args)
    want = parse_point_filter(args.point)
    a_files, b_files = record_paths([args.a]), record_paths([args.b])
    outs = _outputs(args, a_files + b_files)
    stages = args.stage or STAGES
    told = "comparing them pooled would mix settings"
    a_recs = one_point(load_many(a_files), f"A ({show(args.a)})", want, told)
    b_recs = one_point(load_many(b_files), f"B ({show(args.b)})", want, told)
    result = compare(a_recs, b_recs, stages=stages, reps=args.reps, seed=args.seed,
                     paired=False if args.unpaired else None)
    if not result.rows:
        raise CliError("nothing to compare: " + "; ".join(f"{s} {why}" for s, why in result.skipped.items()))
    if None not in outs.values():
        print(fmt.format_comparison(result))
    _write(outs, {"--csv": fmt.comparison_csv(result) if "--csv" in outs else "",
                  "--json": fmt.comparison_json(result) if "--json" in outs else "",
                  "--markdown": fmt.comparison_markdown(result) if "--markdown" in outs else ""})
    if args.fail_if_slower is None:
        return 0
    slower = result.slower_than(args.fail_if_slower, stages)
    for r in slower:
        print(f"stagetrace: slower: {r.stage} p50 {r.delta_pct:+.1f}% (interval {r.low_pct:+.1f} to "
              f"{r.high_pct:+.1f}) is beyond --fail-if-slower {args.fail_if_slower:g}%", file=sys.stderr)
    return 1 if slower else 0
