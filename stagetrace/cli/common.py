"""What every command shares: the one-line error, printable names, the torchrun rank."""
from __future__ import annotations

import os
from typing import Any

__all__ = ["CliError", "show", "rank_world", "rank_suffix"]


class CliError(Exception):
    """A bad input: printed as one line on stderr, exit status 2."""


def show(value: Any) -> str:
    """``value`` as printable one-line text: a file name that is not UTF-8, or holds a
    newline, is shown escaped instead of failing to print or breaking the line."""
    text = os.fsdecode(value) if isinstance(value, (bytes, os.PathLike)) else str(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; a value that is not a number is a bad input."""
    try:
        rank, world = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise CliError("RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise CliError(f"RANK {rank} and WORLD_SIZE {world} do not fit: 0 <= RANK < WORLD_SIZE")
    return rank, world


def rank_suffix(rank: int, world: int) -> str:
    return f".rank{rank}" if world > 1 else ""
