"""Marks for a model split over several GPUs (``device_map``), placed on one clock.

Each GPU's events tell time only relative to each other. Once per call *before* it runs,
a :class:`MultiDeviceTimeline` calibrates: it waits until each device is idle, so the
call's first mark — recorded on every device — executes on each within a launch latency
of the moment the host issued it. That host moment (one process-wide clock) is then each
device's origin, and every later record of device ``d`` sits at
``origin_d + (its event - the first event of d)``. No sync happens inside the call.

A mark is an event on the device whose work it waits for: it fires once the work issued
to its stream before it has finished. Two ways to record one:

* :meth:`MultiDeviceTimeline.device_mark` — one event, on one device: for a boundary
  whose preceding work is known to run there (a decoder layer's end: that layer's GPU;
  the next layer's begin: the same GPU, since the hidden states move to the next layer's
  GPU inside that layer's forward). One event per mark, as on a single GPU;
* :meth:`MultiDeviceTimeline.mark` — one event on every device, the boundary at the
  latest of them (when the work before it has finished everywhere): for stage boundaries
  and the first layer's begin, whose preceding work may run anywhere. A handful per step.

``clocks.place_on_one_clock`` merges the records in issue order; what the calibration
cannot see (the difference between two cards' launch latencies) is the cross-device
error, measured on two GPUs by ``tests/test_multi_device.py`` and ``benchmarks/multi_gpu.py``.
``mark_every_device=True`` records every mark on every device (the way before one event
per mark), to check the placement against and to measure what it saves.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .clocks import COMPANION, Resolved, place_on_one_clock
from .pytimeline import TimelineError

__all__ = ["MultiDeviceTimeline"]


class MultiDeviceTimeline:
    """Several per-device timelines (``_C.CudaTimeline``) driven as one."""

    backend = "cuda"

    def __init__(self, timelines: Sequence[Any], mark_every_device: bool = False):
        if len(timelines) < 2:
            raise ValueError("a MultiDeviceTimeline needs two or more device timelines")
        self.timelines = list(timelines)
        self.mark_every_device = mark_every_device
        self._first_mark = self.timelines[0].mark
        self._other_marks = tuple(tl.mark for tl in self.timelines[1:])
        self._shared = 0  # marks recorded on every device since the last reset
        self.mark_devices = np.zeros(0, dtype=np.int64)  # of the last resolve

    @property
    def devices(self) -> list[int]:
        return [tl.device for tl in self.timelines]

    def mark(self, label: int) -> None:
        """One event on every device: the first one's, then a companion on each other one."""
        self._first_mark(label)
        companion = label | COMPANION
        for mark in self._other_marks:
            mark(companion)
        self._shared += 1

    def device_mark(self, position: int) -> Callable[[int], None]:
        """The mark callable for boundaries that wait only for work on device ``position``
        (its place in ``devices``): that device's native mark itself, one event."""
        if self.mark_every_device:
            return self.mark
        return self.timelines[position].mark

    def mark_on(self, label: int, stream: int) -> None:
        raise TimelineError("mark_on names one stream; a multi-device timeline marks each device's bound stream")

    def bind_streams(self, streams: Sequence[int]) -> None:
        if len(streams) != len(self.timelines):
            raise ValueError(f"{len(streams)} streams for {len(self.timelines)} devices")
        for tl, s in zip(self.timelines, streams):
            tl.bind_stream(s)

    @property
    def device_streams(self) -> list[int]:
        return [int(tl.bound_stream) for tl in self.timelines]

    def calibrate(self) -> None:
        """Before a call: every device idle, so the call's first mark runs as it is issued."""
        for tl in self.timelines:
            tl.synchronize_device()

    def reset(self) -> None:
        for tl in self.timelines:
            tl.reset()
        self._shared = 0

    def resolve(self) -> Resolved:
        per_device = [tl.resolve() for tl in self.timelines]
        if self.dropped:  # the call is reported as not timed; its columns need not line up
            self.mark_devices = np.zeros(len(per_device[0][0]), dtype=np.int64)
            return per_device[0]
        merged, self.mark_devices = place_on_one_clock(per_device)
        return merged

    @property
    def dropped(self) -> int:
        return max(int(tl.dropped) for tl in self.timelines)

    @property
    def events(self) -> int:
        """Events recorded since the last reset, over all devices."""
        return sum(len(tl) for tl in self.timelines)

    def __len__(self) -> int:
        """Marks since the last reset (a mark on every device counts once)."""
        return self.events - (len(self.timelines) - 1) * self._shared
