"""``stagetrace merge``: per-rank records and traces joined into one folder.

Every input is read and checked before anything is written; the outputs are replaced
whole (temporary file, then rename) and may not be inputs. In a folder holding per-rank
files only those are merged (a ``records.jsonl`` beside them is an earlier merge), so
merging a torchrun folder into itself again gives the same result. An output file that
an earlier merge did not write (say, a profile run's records) is never replaced.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from .common import CliError, show
from .safe_io import check_output, replacing, same_file, writable_dir, write_bytes_atomically

__all__ = ["cmd_merge"]

MERGE_FILE = "stagetrace-merge.json"  # what merge wrote into -o (name -> sha256), so it replaces only that
_RECORDS = re.compile(r"records(\.rank\d+)?\.jsonl")
_TRACE = re.compile(r"trace(\.rank\d+)?\.json(\.gz)?", re.IGNORECASE)


def _from_dir(d: Path) -> tuple[list[Path], list[Path]]:
    found: list[list[Path]] = []
    for pattern in (_RECORDS, _TRACE):
        files = sorted(p for p in d.iterdir() if pattern.fullmatch(p.name) and p.is_file())
        ranked = [p for p in files if ".rank" in p.name.lower()]
        if ranked and len(ranked) < len(files):
            left = ", ".join(p.name for p in files if p not in ranked)
            print(f"merge: {show(d)} holds per-rank files: merging those, not {show(left)}")
        found.append(ranked or files)
    return found[0], found[1]


def _inputs(items: list[str]) -> tuple[list[Path], list[Path]]:
    records: list[Path] = []
    traces: list[Path] = []
    for item in items:
        p = Path(item)
        name = p.name.lower()
        if p.is_dir():
            r, t = _from_dir(p)
            records += r
            traces += t
        elif not p.exists():
            raise CliError(f"{show(item)} does not exist")
        elif name.endswith(".jsonl"):
            records.append(p)
        elif name.endswith((".json", ".json.gz")):
            traces.append(p)
        else:
            raise CliError(f"{show(item)} is neither a directory, a records .jsonl nor a trace .json")
    dedup = lambda ps: [p for i, p in enumerate(ps) if not any(same_file(p, q) for q in ps[:i])]  # noqa: E731
    return dedup(records), dedup(traces)


def _record_lines(files: list[Path]) -> list[str]:
    """The record lines of every file, checked; what is not a record is one warning line per file."""
    from stagetrace.records import parse_record_line

    lines: list[str] = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8-sig", errors="replace")
        except OSError as exc:
            raise CliError(f"records file {show(f)} cannot be read: {exc.strerror or exc}") from None
        bad, first = 0, ""
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                parse_record_line(line)
            except ValueError as exc:
                bad, first = bad + 1, first or f"line {n}: {exc}"
                continue
            lines.append(line.strip() + "\n")
        if bad:
            print(f"stagetrace: warning: {show(f)}: left out {bad} unreadable record line(s) ({show(first)})",
                  file=sys.stderr)
    return lines


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _marks(out: Path) -> dict[str, str]:
    try:
        marks = json.loads((out / MERGE_FILE).read_bytes()).get("written", {})
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}
    return marks if isinstance(marks, dict) else {}


def _check_replaceable(out: Path, targets: list[Path]) -> None:
    """Merge replaces an output file only where it is missing or is an earlier merge's, unchanged since."""
    marks = _marks(out)
    for t in targets:
        if t.exists() and (marks.get(t.name) is None or marks.get(t.name) != _digest(t)):
            raise CliError(f"-o {show(out)} already holds a {t.name} that no earlier merge wrote: merge does not "
                           "replace it; choose another -o")


def _mark_written(out: Path, written: list[Path]) -> None:
    marks = _marks(out)
    marks.update({p.name: _digest(p) for p in written})
    write_bytes_atomically(out / MERGE_FILE, (json.dumps({"written": marks}, indent=1) + "\n").encode())


def cmd_merge(args: argparse.Namespace) -> int:
    from stagetrace.export.chrome import TraceFileError, merge_chrome_traces, read_chrome_trace

    record_files, trace_files = _inputs(args.inputs)
    if not record_files and not trace_files:
        raise CliError(f"nothing to merge in {show(', '.join(args.inputs))}")
    out = writable_dir(args.output, "-o")
    rec_out, trace_out = check_output(out / "records.jsonl"), check_output(out / "trace.json")
    for p in record_files + trace_files:
        for target in (rec_out, trace_out):
            if same_file(p, target):
                raise CliError(f"-o {show(out)}: its {target.name} is also an input ({show(p)}); "
                               "merge into another folder")
    _check_replaceable(out, ([rec_out] if record_files else []) + ([trace_out] if trace_files else []))
    lines = _record_lines(record_files)
    if record_files and not lines:
        raise CliError(f"no readable records in {show(', '.join(map(str, record_files)))}")
    for t in trace_files:  # all read before anything is written
        try:
            read_chrome_trace(t)
        except TraceFileError as exc:
            raise CliError(show(exc)) from None
        except OSError as exc:
            raise CliError(f"trace {show(t)} cannot be read: {exc.strerror or exc}") from None
    try:
        if trace_files:
            merge_chrome_traces(trace_files, trace_out)
        if lines:
            with replacing(rec_out) as fh:
                fh.write("".join(lines).encode("utf-8"))
        _mark_written(out, [p for p, wrote in ((rec_out, lines), (trace_out, trace_files)) if wrote])
    except OSError as exc:
        raise CliError(f"-o {show(out)} cannot be written: {exc.strerror or exc}") from None
    if lines:
        print(f"wrote {show(rec_out)} ({len(lines)} records from {len(record_files)} files)")
    if trace_files:
        print(f"wrote {show(trace_out)} ({len(trace_files)} traces, one process per rank)")
    return 0
