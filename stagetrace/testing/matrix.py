"""The coverage table of text-only causal LMs, written from the results of ``tests/test_coverage_lm.py``.

``python -m stagetrace.testing.matrix`` runs that test file on the CPU backend, in this process,
with a plugin that keeps each test's outcome and what it recorded (``record_property``: the layout
the tracer found, an honest refusal), and prints the ``<details>`` table of README's "Model
coverage"; ``--readme README.md`` replaces the table there, between its markers. Nothing in the
table is typed by hand: a type passes, is refused honestly, cannot be built here (the zoo's reason)
or fails (the failing check), as the tests said.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEST_FILE = Path(__file__).resolve().parents[2] / "tests" / "test_coverage_lm.py"
BEGIN = "<!-- lm-matrix: begin (python -m stagetrace.testing.matrix --readme README.md) -->"
END = "<!-- lm-matrix: end -->"
_NODE = re.compile(r"\[(?P<type>.+)-cpu\]$")


@dataclass
class Row:
    model_type: str
    status: str           # "passes" | "refused" | "unbuildable" | "fails"
    layout: str = ""      # what the tracer marks: layout, language model -> lm_head, layers
    reason: str = ""      # why (refused, unbuildable, the failing check)


class _Collector:
    """A pytest plugin: one Row per parametrized CPU test of the matrix."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        found = _NODE.search(report.nodeid)
        if not found or not (report.when == "call" or report.skipped or report.failed):
            return
        props = dict(report.user_properties)
        row = Row(found["type"], "passes", props.get("layout", ""))
        if report.skipped:
            reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
            row.status, row.reason = "unbuildable", _after_type(reason.removeprefix("Skipped: "), row.model_type)
        elif report.failed:
            message = getattr(getattr(report.longrepr, "reprcrash", None), "message", str(report.longrepr))
            row.status, row.reason = "fails", message.splitlines()[0]
        elif "refused" in props:
            row.status, row.reason = "refused", props["refused"]
        self.rows.setdefault(row.model_type, row)


def _after_type(reason: str, model_type: str) -> str:
    """``"<type>: cannot be built here (why)"`` -> ``"why"``."""
    reason = reason.removeprefix(f"{model_type}: ")
    inner = re.fullmatch(r"cannot be built here \((.*)\)", reason, re.S)
    return inner.group(1) if inner else reason


def collect(test_file: Path = TEST_FILE, extra: list[str] | None = None) -> list[Row]:
    import pytest

    collector = _Collector()
    with contextlib.redirect_stdout(sys.stderr):  # pytest's report goes to stderr, the table to stdout
        code = pytest.main([str(test_file), "-q", "-p", "no:cacheprovider", "-k", "cpu", *(extra or [])],
                           plugins=[collector])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise RuntimeError(f"pytest could not run {test_file} (exit {code})")
    return sorted(collector.rows.values(), key=lambda r: r.model_type)


_SHOWN = {"passes": "passes", "refused": "passes, output_tokens refused: {}",
          "unbuildable": "cannot be built here ({})", "fails": "fails: {}"}


def markdown(rows: list[Row]) -> str:
    import transformers

    count = {s: sum(r.status == s for r in rows) for s in _SHOWN}
    summary = ", ".join(f"{n} {what}" for n, what in (
        (count["passes"] + count["refused"], "types pass"),
        (count["refused"], "of them with output_tokens refused honestly"),
        (count["unbuildable"], "cannot be built here"), (count["fails"], "fail")) if n)
    lines = [BEGIN, f"<details><summary>The table (transformers {transformers.__version__}): {summary}</summary>", "",
             "| model type | what the tracer marks (layout: language model → lm_head, layer list) | status |",
             "|---|---|---|"]
    for r in rows:
        cells = [r.model_type, r.layout or "—", _SHOWN[r.status].format(r.reason)]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines + ["", "</details>", END]) + "\n"


def replace_in(readme: Path, table: str) -> None:
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{readme}: no single pair of markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN)
    readme.write_text(head + table.rstrip("\n") + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagetrace.testing.matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--readme", type=Path, help="replace the table between the markers in this file")
    args = parser.parse_args(argv)
    rows = collect()
    table = markdown(rows)
    if args.readme:
        replace_in(args.readme, table)
    else:
        sys.stdout.write(table)
    return 1 if any(r.status == "fails" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
