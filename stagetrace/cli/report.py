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

__all__ = ["cmd_report", "cmd_plot", "print_summary", "print_summaries", "load_many", "record_paths", "one_point"]

_RECORDS = re.compile(r"records(\.rank\d+)?\.jsonl")


def layer_sampling(records: list[Any]) -> str | None:
    """One line where layer detail covered only some decode steps (``layer_every``), else None."""
    timed = [r for r in records if r.error is None and r.layer_detail == "all"]
    steps = sum(len(r.decode_step_ms) for r in timed)
    with_layers = sum(len(r.layer_steps) for r in timed)
    if not timed or with_layers >= steps:
        return None
    every = sorted({r.layer_every for r in timed})
    return (f"layer spans: the prefill and {with_layers} of {steps} decode steps "
            f"(layer_every={'/'.join(map(str, every))}); layer statistics cover those steps only")


def lead_sampling(records: list[Any]) -> str | None:
    """One line where the GPU lead was read on only some decode steps (``lead_every``), else None."""
    timed = [r for r in records if r.error is None and r.lead_every > 1]
    if not timed:
        return None
    steps = sum(len(r.decode_step_ms) for r in timed)
    read = sum(r.lead.get("decode", {}).get("steps_read", 0) for r in timed)
    every = sorted({r.lead_every for r in timed})
    return (f"GPU lead: in {len(timed)} of {len(records)} records read on {read} of their {steps} decode steps "
            f"(lead_every={'/'.join(map(str, every))}: the forward's return marked on those only); the other steps' "
            "verdicts are unknown, and the decode stage's GPU-bound share is over the steps read")


def layer_boundaries(records: list[Any]) -> str | None:
    """One line where layer marks sat after a layer's last matmul (``layer_marks="matmul"``
    in compiled decode), not at its boundary, else None."""
    moved = [r for r in records if r.error is None and r.layer_marks_after_matmul]
    if not moved:
        return None
    return (f"layer spans: in the compiled forwards of {len(moved)} of {len(records)} records "
            f"({sum(r.layer_marks_after_matmul for r in moved)} marks), a layer ends right after its last matmul "
            "(layer_marks='matmul'): its residual add counts to the next layer; layers of eager forwards (such "
            "as generate()'s own prefill) end at their module boundary")


def print_summary(records: list[Any], title: str) -> None:
    from stagetrace.export.lead_table import format_lead, summarize_lead
    from stagetrace.export.table import format_summary, summarize

    print(format_summary(summarize(records), title=title))
    for line in (layer_sampling(records), lead_sampling(records), layer_boundaries(records)):
        if line:
            print(line)
    lead = format_lead(summarize_lead(records))
    if lead:
        print("\n" + lead)


def print_summaries(records: list[Any], title: str) -> None:
    """One summary, or one per sweep point when the records hold several: times of two settings are
    never pooled into one row."""
    from .sweep import point_label, points_of

    points = points_of(records)
    if len(points) <= 1:
        print_summary(records, title + (f" at {point_label(points[0])}" if points and points[0] else ""))
        return
    from .runs import point_key

    print(f"{title}: {len(points)} sweep points, summarized one by one")
    for p in points:
        these = [r for r in records if point_key(r.sweep_point) == point_key(p)]
        print()
        print_summary(these, f"{len(these)} records at {point_label(p)}")


def one_point(records: list[Any], what: str, want: dict[str, Any], told: str) -> list[Any]:
    """The records of ``what`` at the point ``--point`` picks; one line when they still hold several
    (``told``: what the command would mix)."""
    from .sweep import point_label, points_of, select_point

    records = select_point(records, want, what)
    points = points_of(records)
    if len(points) > 1:
        shown = "; ".join(point_label(p) for p in points[:6]) + ("; ..." if len(points) > 6 else "")
        raise CliError(f"{what} holds records of {len(points)} sweep points ({shown}): {told}; pick one with "
                       "--point KEY=VALUE (repeatable)")
    return records


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


def _csv_by_point(recs: list[Any], points: list[Any]) -> bytes:
    """The summary CSV with a first column naming each row's sweep point."""
    import csv
    import io

    from stagetrace.export.table import STAT_NAMES, summarize

    from .runs import point_key
    from .sweep import point_label

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["sweep_point", "stage", *STAT_NAMES])
    for p in points:
        for stage, st in summarize([r for r in recs if point_key(r.sweep_point) == point_key(p)]).items():
            w.writerow([point_label(p), stage, *(st[k] for k in STAT_NAMES)])
    return buf.getvalue().encode("utf-8")


def cmd_report(args: argparse.Namespace) -> int:
    from stagetrace.export.table import summarize, write_csv

    from .runs import point_key
    from .safe_io import write_bytes_atomically
    from .sweep import parse_point_filter, points_of, select_point

    want = parse_point_filter(args.point)
    csv_path = output_file(args.csv, args.records, "--csv") if args.csv is not None else None
    recs = select_point(load_many(args.records), want, "the records")
    points = points_of(recs)
    if args.json:  # several points: one summary each, with its point
        print(json.dumps(summarize(recs) if len(points) <= 1 else
                         [{"sweep_point": p, "summary": summarize([r for r in recs if point_key(r.sweep_point)
                                                                   == point_key(p)])} for p in points], indent=2))
    else:
        failed = sum(r.error is not None for r in recs)
        print_summaries(recs, f"{len(recs)} records" + (f" ({failed} not timed)" if failed else ""))
    if csv_path is not None:
        try:
            if len(points) <= 1:
                write_csv(summarize(recs), csv_path)
            else:
                write_bytes_atomically(csv_path, _csv_by_point(recs, points))
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
    records = record_paths(args.records)  # files, or run folders standing for their records
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
