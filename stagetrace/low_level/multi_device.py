"""Marks for a model split over several GPUs (``device_map``), placed on one clock.

Each GPU's events tell time only relative to each other. A :class:`MultiDeviceTimeline`
records every mark on every device of the model and, once per call *before* it runs,
calibrates: it waits until each device is idle, so the call's first mark executes on
each device within a launch latency of the moment the host issued it. That host moment
(one process-wide clock) is then each device's origin, and every later mark of device
``d`` sits at ``origin_d + (its event - the first event of d)``. No sync happens inside
the call.

A boundary mark is placed at the *latest* of its devices' times: each device's event
fires once the work issued to that device before the mark has finished, so the latest
is when the work before the boundary has finished everywhere — on a split model that
is the device doing the work (the others are idle and record early). Times stay in
issue order, so stages still partition the call exactly; what the calibration cannot
see (the difference between two cards' launch latencies) is the cross-device error,
measured on two GPUs by ``tests/test_multi_device.py`` and ``benchmarks/multi_gpu.py``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .clocks import Resolved, place_on_one_clock
from .pytimeline import TimelineError

__all__ = ["MultiDeviceTimeline"]


class MultiDeviceTimeline:
    """Several per-device timelines (``_C.CudaTimeline``) driven as one."""

    backend = "cuda"

    def __init__(self, timelines: Sequence[Any]):
        if len(timelines) < 2:
            raise ValueError("a MultiDeviceTimeline needs two or more device timelines")
        self.timelines = list(timelines)
        self._marks = tuple(tl.mark for tl in self.timelines)
        self.mark_devices = np.zeros(0, dtype=np.int64)  # of the last resolve

    @property
    def devices(self) -> list[int]:
        return [tl.device for tl in self.timelines]

    def mark(self, label: int) -> None:
        for mark in self._marks:  # hot path: one event record per device
            mark(label)

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

    def __len__(self) -> int:
        return len(self.timelines[0])
