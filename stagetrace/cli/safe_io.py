"""Where the CLI writes: only into the folder it was given, never through a link, never
over one of its own inputs, and each file whole or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Iterable, Iterator

from ..export.files import replacing, write_bytes_atomically
from .common import CliError, show

__all__ = ["file_in_the_way", "writable_dir", "check_output", "output_file", "same_file", "move_aside", "replacing",
           "replacing_path", "write_bytes_atomically"]


@contextlib.contextmanager
def replacing_path(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` for a writer that takes a path; renamed over
    ``path`` when the block ends without error, removed otherwise."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (or ``path``) that is not a directory: it blocks making ``path``."""
    for p in reversed([path, *path.parents]):
        if p.exists() and not p.is_dir():
            return p
    return None


def writable_dir(name: str | Path, flag: str = "--out") -> Path:
    """``name`` as a directory the command can write to (made if missing), or a one-line error."""
    if not str(name).strip():  # (Path("") would be the current directory)
        raise CliError(f"{flag} is empty: give a directory")
    path = Path(name)
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise CliError(f"output directory {show(path)} cannot be written: {show(blocker)} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a fresh name made with O_EXCL: never opens (and empties) a file or link already there
        probe = path / f".stagetrace-write-test-{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
        probe.unlink()
    except OSError as exc:
        raise CliError(f"output directory {show(path)} cannot be written: {exc.strerror or exc}") from None
    return path


def check_output(path: Path) -> Path:
    """Refuses a file the command would write that is a link or a directory, before any work."""
    if path.is_symlink():
        raise CliError(f"{show(path)} is a symbolic link: stagetrace does not write through links; "
                       "remove the link or choose another output")
    if path.is_dir():
        raise CliError(f"{show(path)} is a directory where stagetrace writes a file: move it or choose another output")
    return path


def _written_by_us(path: Path, kind: str | None) -> bool:
    """``path`` holds a JSON object of ``kind`` (a file stagetrace wrote: a model, a comparison)."""
    if kind is None:
        return False
    try:
        if path.stat().st_size > 64 << 20:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("kind") == kind


def output_file(name: str, inputs: Iterable[str | Path], flag: str, kind: str | None = None) -> Path:
    """An output file named on the command line: not empty, not a link or folder, not an input,
    not under a file. An existing file named like records or a trace is not replaced, unless it
    is a JSON file of ``kind`` (what this command wrote before)."""
    if not name.strip():
        raise CliError(f"{flag} is empty: give a file name")
    out = check_output(Path(name))
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise CliError(f"{flag} {show(name)} cannot be written: {show(blocker)} is a file, not a directory")
    for p in inputs:
        if same_file(Path(p), out):
            raise CliError(f"{flag} {show(name)} is also an input: it would be overwritten; choose another name")
    if (out.exists() and out.name.lower().endswith((".jsonl", ".json", ".json.gz"))
            and not _written_by_us(out, kind)):
        raise CliError(f"{flag} {show(name)} exists and is named like records or a trace: stagetrace does not "
                       "replace it; choose another name")
    return out


def same_file(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def move_aside(out: Path, files: Iterable[Path]) -> Path | None:
    """Moves ``files`` (those that exist) into ``out/replaced-<UTC time>/``; nothing is deleted.

    Returns that folder, or None when there was nothing to move.
    """
    files = [f for f in files if f.is_file() or f.is_symlink()]
    if not files:
        return None
    aside = out / time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        aside.mkdir(exist_ok=True)
        for f in files:
            target = aside / f.name
            if target.exists():  # a second --fresh within the same second
                target = aside / f"{f.name}.{secrets.token_hex(2)}"
            os.rename(f, target)
    except OSError as exc:
        raise CliError(f"cannot move earlier results aside into {show(aside)}: {exc.strerror or exc}") from None
    return aside
