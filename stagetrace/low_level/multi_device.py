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
measured on two GPUs by ``tests/test_multi_gpu.py`` and ``benchmarks/multi_gpu.py``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .pytimeline import TimelineError

__all__ = ["MultiDeviceTimeline", "place_on_one_clock"]

Resolved = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def place_on_one_clock(per_device: Sequence[Resolved]) -> tuple[Resolved, np.ndarray]:
    """Merges per-device resolved columns of the same marks into one timeline.

    Returns the merged columns (device times relative to the merged first mark; host
    times and streams of the first device) and, per mark, the index of the device whose
    time it took (the device whose work the boundary waited for).
    """
    if not per_device:
        raise ValueError("no devices to merge")
    labels = per_device[0][0]
    for i, cols in enumerate(per_device[1:], 1):
        if len(cols[0]) != len(labels) or not np.array_equal(cols[0], labels):
            raise TimelineError(f"device {i} holds {len(cols[0])} marks and device 0 holds {len(labels)}: "
                                "every mark must be recorded on every device")
    if len(labels) == 0:
        return per_device[0], np.zeros(0, dtype=np.int64)
    # (devices, marks): each device's times on the host clock, from its first mark's issue time
    common = np.stack([np.asarray(host, np.int64)[0] + np.asarray(dev, np.int64) for _, dev, host, _ in per_device])
    which = np.argmax(common, axis=0)
    t = common[which, np.arange(common.shape[1])]
    first = per_device[0]
    return (labels, t - t[0], first[2], first[3]), which.astype(np.int64)


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
