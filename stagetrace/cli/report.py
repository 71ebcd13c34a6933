"""``stagetrace report`` and ``stagetrace plot``: records in, a table, a CSV or a picture out."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

from .common import CliError, show
from .safe_io import check_output, file_in_the_way, same_file

__all__ = ["cmd_report", "cmd_plot", "print_summary", "load_many"]


def print_summary(records: list[Any], title: str) -> None:
    from stagetrace.export.table import format_summary, summarize

    print(format_summary(summarize(records), title=title))


def load_many(paths: Sequence[str]) -> list[Any]:
    """The records of every file; what a file holds that is not a record is one warning line
    per file, and no readable record at all is one error line."""
    from stagetrace.records import load_records

    recs: list[Any] = []
    said: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise CliError(f"records file {show(p)} does not exist")
        if not path.is_file():
            raise CliError(f"records file {show(p)} is not a file")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                recs += load_records(path)
            except OSError as exc:
                raise CliError(f"records file {show(p)} cannot be read: {exc.strerror or exc}") from None
        said += [show(w.message) for w in caught]
    if not recs:
        raise CliError(f"no readable records in {show(', '.join(paths))}" + (f" ({said[0]})" if said else ""))
    for line in said:
        warnings.warn(line, stacklevel=2)
    return recs


def _output(path: str, inputs: Sequence[str], flag: str) -> Path:
    """An output file named on the command line: not empty, not a link or folder, not an input."""
    if not path.strip():
        raise CliError(f"{flag} is empty: give a file name")
    out = check_output(Path(path))
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise CliError(f"{flag} {show(path)} cannot be written: {show(blocker)} is a file, not a directory")
    for p in inputs:
        if same_file(Path(p), out):
            raise CliError(f"{flag} {show(path)} is also an input: it would be overwritten; choose another name")
    if out.exists() and out.name.lower().endswith((".jsonl", ".json", ".json.gz")):
        raise CliError(f"{flag} {show(path)} exists and is named like records or a trace: stagetrace does not "
                       "replace it; choose another name")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from stagetrace.export.table import format_summary, summarize, write_csv

    csv_path = _output(args.csv, args.records, "--csv") if args.csv is not None else None
    recs = load_many(args.records)
    summary = summarize(recs)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        failed = sum(r.error is not None for r in recs)
        print(format_summary(summary, title=f"{len(recs)} records" + (f" ({failed} not timed)" if failed else "")))
    if csv_path is not None:
        try:
            write_csv(summary, csv_path)
        except OSError as exc:
            raise CliError(f"--csv {show(csv_path)} cannot be written: {exc.strerror or exc}") from None
        print(f"wrote {show(csv_path)}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    out = _output(args.output, args.records, "-o")
    try:
        from stagetrace.export.plot import plot_records

        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("plotting needs matplotlib: pip install 'stagetrace[plot]'") from None
    recs = load_many(args.records)
    try:
        path = plot_records(recs, out)
    except ValueError as exc:
        raise CliError(f"-o {show(out)}: {exc}" if "picture named" in str(exc) else str(exc)) from None
    except OSError as exc:
        raise CliError(f"-o {show(out)} cannot be written: {exc.strerror or exc}") from None
    print(f"wrote {show(path)}")
    return 0
