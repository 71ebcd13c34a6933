"""The resolved marks of one call: plain columns, the only thing that leaves a timeline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Marks"]


@dataclass(frozen=True)
class Marks:
    """One resolved run: parallel columns, in issue order.

    ``device_ns`` is the time of each mark on the timeline that executed it (GPU
    events, or the host clock on the CPU backend), relative to the first mark;
    ``host_ns`` is when the host issued it (absolute ``time.monotonic_ns`` clock).
    ``from_stamp`` (None: no mark is) flags GPU-side stamps placed on the timeline after
    the call (``clocks.merge_stamps``): their ``host_ns`` is their forward's event's, not
    their own issue time, so nothing may read a host-side fact off them.
    """

    labels: np.ndarray
    device_ns: np.ndarray
    host_ns: np.ndarray
    streams: np.ndarray
    backend: str = "cpu"
    dropped: int = 0
    from_stamp: np.ndarray | None = None

    @classmethod
    def from_timeline(cls, timeline: Any) -> "Marks":
        dropped = int(timeline.dropped)
        labels, device_ns, host_ns, streams = timeline.resolve()
        return cls(labels, device_ns, host_ns, streams, timeline.backend, dropped)

    @property
    def issued_by_host(self) -> np.ndarray:
        """True where ``host_ns`` is the mark's own issue time (not a stamp's borrowed one)."""
        return np.ones(len(self), dtype=bool) if self.from_stamp is None else ~self.from_stamp

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def without(self, positions: list[int]) -> "Marks":
        """These marks less those at ``positions`` (marks that turned out to bound nothing). The
        first mark is the call's origin (``device_ns`` is relative to it) and is never dropped;
        positions past the end (marks the pool dropped) are ignored."""
        drop = np.asarray([p for p in positions if 0 < p < len(self)], dtype=np.int64)
        if not len(drop):
            return self
        keep = np.ones(len(self), dtype=bool)
        keep[drop] = False
        return Marks(self.labels[keep], self.device_ns[keep], self.host_ns[keep], self.streams[keep], self.backend,
                     self.dropped, None if self.from_stamp is None else self.from_stamp[keep])
