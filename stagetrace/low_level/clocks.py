"""Pure clock merges: several clocks of one call placed on one timeline. No device, no torch.

* :func:`place_on_one_clock` — the same marks recorded on several GPUs (a model split
  over them), each GPU's events on its own clock, onto one clock calibrated before the
  call (see ``multi_device``);
* :func:`merge_stamps` — GPU-side stamps (``%globaltimer``, written inside CUDA graphs;
  see ``graph_stamps``) onto the event timeline, each forward's stamps anchored on the
  event mark of that forward.

Both run after every call they serve, on every mark: they are vectorized.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .marks import Marks
from .pytimeline import TimelineError

__all__ = ["Resolved", "place_on_one_clock", "merge_stamps", "StampMergeError"]

Resolved = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class StampMergeError(RuntimeError):
    """The stamps of a call do not line up with its events (so they are not used)."""


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


def merge_stamps(marks: Marks, labels: np.ndarray, t_ns: np.ndarray, anchor_label: int | tuple[int, ...],
                 dropped: int = 0) -> Marks:
    """Marks with the stamps placed on the events' timeline.

    Every stamp labelled with an anchor label is a calibration stamp taken right after the
    event mark of the same label (one per compiled forward, in order); the stamps after it
    belong to that forward and are placed at ``event + (stamp - calibration stamp)``, right
    after that event in the merged order. The clocks are compared only within a step, so
    drift between them never accumulates; what remains is the calibration stamp's own delay
    after its event (a few µs, which moves a step's stamps earlier, never across the step's
    start). A stamp is never placed after the next event.
    """
    labels = np.asarray(labels, dtype=np.int32)
    t_ns = np.asarray(t_ns, dtype=np.int64)
    anchors = np.asarray([anchor_label] if isinstance(anchor_label, int) else list(anchor_label), dtype=np.int32)
    event_idx = np.flatnonzero(np.isin(marks.labels, anchors))
    anchor_idx = np.flatnonzero(np.isin(labels, anchors))
    if len(anchor_idx) != len(event_idx):
        raise StampMergeError(f"{len(anchor_idx)} calibration stamps for {len(event_idx)} step events")
    if not np.array_equal(labels[anchor_idx], marks.labels[event_idx]):
        raise StampMergeError("calibration stamps and step events differ in kind or order")
    if len(labels) and (not len(anchor_idx) or anchor_idx[0] != 0):
        raise StampMergeError("stamps were taken before the first calibration stamp")
    total_dropped = marks.dropped + dropped
    stamp_pos = np.flatnonzero(~np.isin(labels, anchors))
    if not len(stamp_pos):  # nothing but calibration: the marks stand as they are
        return Marks(marks.labels, marks.device_ns, marks.host_ns, marks.streams, marks.backend, total_dropped,
                     marks.from_stamp)
    step = np.searchsorted(anchor_idx, stamp_pos, side="right") - 1  # the forward each stamp belongs to
    ev = event_idx[step]
    t = marks.device_ns[ev] + (t_ns[stamp_pos] - t_ns[anchor_idx[step]])
    has_next = ev + 1 < len(marks)
    t = np.where(has_next, np.minimum(t, marks.device_ns[np.minimum(ev + 1, len(marks) - 1)]), t)
    # merged order: each event, then the stamps of its forward in the order they were taken
    n = len(marks)
    key_major = np.concatenate([np.arange(n), ev])
    key_minor = np.concatenate([np.zeros(n, np.int64), 1 + np.arange(len(stamp_pos))])
    order = np.lexsort((key_minor, key_major))
    cat = lambda a, b: np.concatenate([a, b.astype(a.dtype)])[order]  # noqa: E731
    return Marks(cat(marks.labels, labels[stamp_pos]), cat(marks.device_ns, t), cat(marks.host_ns, marks.host_ns[ev]),
                 cat(marks.streams, marks.streams[ev]), backend=marks.backend, dropped=total_dropped,
                 from_stamp=cat(~marks.issued_by_host, np.ones(len(stamp_pos), dtype=bool)))
