"""Pure-Python twin of the native host timeline (``_C.HostTimeline``).

Same API and the same errors; tested against the native one. It is the fallback
when the extension is not built, and the executable description of what the
native recorder must do.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

__all__ = ["PyHostTimeline", "TimelineError"]


class TimelineError(RuntimeError):
    """Misuse of a timeline (resolve before any mark, mark after resolve, ...)."""


class PyHostTimeline:
    backend = "cpu"
    device_streams: list[int] = []  # one host clock: no streams to bind, nothing to calibrate

    def __init__(self, capacity: int = 4096, chunk: int = 4096, max_marks: int = -1):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if 0 <= max_marks < capacity:
            raise ValueError(f"max_marks ({max_marks}) is below capacity ({capacity})")
        self._capacity = capacity
        self._chunk = chunk
        self._max_marks = max_marks
        self._labels: list[int] = []
        self._host_ns: list[int] = []
        self._dropped = 0
        self._resolved = False

    def mark(self, label: int) -> None:
        self.mark_on(label, 0)

    def mark_on(self, label: int, stream: int) -> None:
        if stream != 0:
            raise ValueError(f"the host backend has no streams: stream handle must be 0, got {stream}")
        now = time.monotonic_ns()
        if self._resolved:
            raise TimelineError("mark() after resolve(): call reset() before recording the next run")
        if len(self._labels) >= self._capacity:
            new = self._capacity + self._chunk
            if self._max_marks >= 0:
                new = min(new, self._max_marks)
            if new <= self._capacity:
                self._dropped += 1
                return
            self._capacity = new
        self._labels.append(int(label))
        self._host_ns.append(now)

    def resolve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._resolved:
            raise TimelineError("resolve() called twice: call reset() before recording the next run")
        if not self._labels:
            raise TimelineError("resolve() before any mark: nothing was recorded")
        self._resolved = True
        host = np.asarray(self._host_ns, dtype=np.int64)
        return (np.asarray(self._labels, dtype=np.int32), host - host[0], host,
                np.zeros(len(host), dtype=np.int64))

    def bind_streams(self, streams: Sequence[int]) -> None:
        pass

    def calibrate(self) -> None:
        pass

    def reset(self) -> None:
        self._labels.clear()
        self._host_ns.clear()
        self._dropped = 0
        self._resolved = False

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def resolved(self) -> bool:
        return self._resolved

    @property
    def max_marks(self) -> int:
        return self._max_marks
