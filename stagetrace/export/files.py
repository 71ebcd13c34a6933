"""Writing an output file whole or not at all, and never through a link.

Every file stagetrace writes goes through :func:`replacing`: a temporary file beside the
target, renamed over it when complete. A reader (or a crash) sees the old file or the new
one, never a truncated mix; a symbolic link at the target is replaced, its target never
written; an output that is also an input is read whole before it is replaced.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator

__all__ = ["replacing", "write_bytes_atomically"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file handle whose content replaces ``path`` when the block ends without error."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never opens an existing file or link; 0o666 less the umask, as a plain open() would
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    with replacing(path) as fh:
        fh.write(data)
    return Path(path)
