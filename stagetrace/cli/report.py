"""``stagetrace report`` and ``stagetrace plot``: records in, a table, a CSV or a picture out
(``plot --fit``: a latency model's predictions against the records)."""
from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

from .common import CliError, show
from .safe_io import output_file

__all__ = ["cmd_report", "cmd_plot", "print_summary", "load_many", "record_paths"]

_RECORDS = re.compile(r"records(\.rank\d+)?\.jsonl")


def print_summary(records: list[Any], title: str) -> None:
    from stagetrace.export.lead_table import format_lead, summarize_lead
    from stagetrace.export.table import format_summary, summarize

    print(format_summary(summarize(records), title=title))
    lead = format_lead(summarize_lead(records))
    if lead:
        print("\n" + lead)


def record_paths(items: Sequence[str]) -> list[str]:
    """Records files, a run folder standing for its own: its per-rank ``records.rankN.jsonl``
    where it has any (a ``records.jsonl`` beside them is their merge), else ``records.jsonl``."""
    paths: list[str] = []
    for item in items:
        folder = Path(item)
        if not folder.is_dir():
            paths.append(item)
            continue
        try:
            files = sorted(p for p in folder.iterdir() if _RECORDS.fullmatch(p.name) and p.is_file())
        except OSError as exc:
            raise CliError(f"run folder {show(item)} cannot be read: {exc.strerror or exc}") from None
        ranked = [p for p in files if ".rank" in p.name]
        if not files:
            raise CliError(f"run folder {show(item)} holds no records.jsonl")
        paths += [str(p) for p in (ranked or files)]
    return paths


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


def cmd_report(args: argparse.Namespace) -> int:
    from stagetrace.export.table import summarize, write_csv

    csv_path = output_file(args.csv, args.records, "--csv") if args.csv is not None else None
    recs = load_many(args.records)
    summary = summarize(recs)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        failed = sum(r.error is not None for r in recs)
        print_summary(recs, f"{len(recs)} records" + (f" ({failed} not timed)" if failed else ""))
    if csv_path is not None:
        try:
            write_csv(summary, csv_path)
        except OSError as exc:
            raise CliError(f"--csv {show(csv_path)} cannot be written: {exc.strerror or exc}") from None
        print(f"wrote {show(csv_path)}")
    return 0


def _load_model(path: str) -> Any:
    from stagetrace.latency_model import LatencyModel

    try:
        return LatencyModel.load(path)
    except OSError as exc:
        raise CliError(f"--fit {show(path)} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CliError(f"--fit {show(exc)}") from None


def cmd_plot(args: argparse.Namespace) -> int:
    records = record_paths(args.records) if args.fit is not None else args.records
    out = output_file(args.output, records + ([args.fit] if args.fit is not None else []), "-o")
    try:
        from stagetrace.export.plot import plot_fit, plot_records

        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("plotting needs matplotlib: pip install 'stagetrace[plot]'") from None
    model = _load_model(args.fit) if args.fit is not None else None
    recs = load_many(records)
    try:
        path = plot_records(recs, out) if model is None else plot_fit(recs, model, out)
    except ValueError as exc:
        raise CliError(f"-o {show(out)}: {exc}" if "picture named" in str(exc) else show(exc)) from None
    except OSError as exc:
        raise CliError(f"-o {show(out)} cannot be written: {exc.strerror or exc}") from None
    print(f"wrote {show(path)}")
    return 0
