"""Pure clock merges: several clocks of one call placed on one timeline. No device, no torch.

* :func:`place_on_one_clock` — marks recorded on several GPUs (a model split over them),
  each on the GPU whose work it waits for or on every GPU, each GPU's events on its own
  clock, onto one clock calibrated before the call (see ``multi_device``);
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

__all__ = ["Resolved", "COMPANION", "place_on_one_clock", "merge_stamps", "StampMergeError"]

Resolved = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class StampMergeError(RuntimeError):
    """The stamps of a call do not line up with its events (so they are not used)."""


# A label with this bit set is a *companion* record: the same mark as the record just issued
# on the first device, recorded on another device too (``MultiDeviceTimeline.mark``).
COMPANION = 1 << 30


def place_on_one_clock(per_device: Sequence[Resolved], max_held_ns: int = 50_000) -> tuple[Resolved, np.ndarray]:
    """Merges the records of several devices' timelines into one call's marks on one clock.

    Each device records some of the call's marks: a mark recorded on one device (the one
    whose work the boundary waits for), or on every device — a record on the first device
    followed, in issue order, by a companion record (label | ``COMPANION``) on each other one.

    What must stay true:

    * the call's first mark is recorded on every device while every device is idle (the
      calibration before the call): its host issue time is each device's origin, and each
      record sits at ``origin_d + (its event - device d's first event)``;
    * marks come out in the order the host issued them (one thread issues them all, each a
      CUDA call of about a µs, so no two records share a nanosecond; a tie is an error);
    * a mark on every device takes the latest of its records: the boundary is when the work
      issued before it has finished everywhere — except the first, which starts the call at
      its first record (every device idle, nothing to wait for);
    * times never go back: a mark reading earlier than the one before it (by the calibration
      error at most) is held at it; by more than ``max_held_ns``, it is an error.

    Returns the merged columns (device times relative to the first mark; each mark's own
    host time and stream, its first record's for a mark on every device) and, per mark, the
    index of the device whose time it took.
    """
    if not per_device:
        raise ValueError("no devices to merge")
    n_dev = len(per_device)
    if n_dev == 1:
        return per_device[0], np.zeros(len(per_device[0][0]), dtype=np.int64)
    sizes = [len(cols[0]) for cols in per_device]
    if sum(sizes) == 0:
        return per_device[0], np.zeros(0, dtype=np.int64)
    if min(sizes) == 0:
        raise TimelineError(f"device {sizes.index(0)} holds no record: the call's first mark must be recorded on "
                            "every device (it calibrates their clocks)")
    labels = np.concatenate([np.asarray(c[0], np.int64) for c in per_device])
    host = np.concatenate([np.asarray(c[2], np.int64) for c in per_device])
    # each device's times on the host clock, from its first record's issue time
    t = np.concatenate([np.asarray(c[2], np.int64)[0] + np.asarray(c[1], np.int64) for c in per_device])
    streams = np.concatenate([np.asarray(c[3], np.int64) for c in per_device])
    device = np.repeat(np.arange(n_dev), sizes)
    order = np.lexsort((device, host))  # issue order; a companion follows its first record
    labels, host, t, streams, device = labels[order], host[order], t[order], streams[order], device[order]
    companion = (labels & COMPANION) != 0
    if companion[0]:
        raise TimelineError("the first record is a companion: the mark it belongs to is missing")
    tie = np.flatnonzero((np.diff(host) == 0) & ~companion[1:])
    if len(tie):
        raise TimelineError(f"two marks were issued in the same nanosecond (records {int(tie[0])} and "
                            f"{int(tie[0]) + 1}): their order is unknown")
    first = np.flatnonzero(~companion)  # one per mark
    group = np.cumsum(~companion) - 1
    size = np.diff(np.append(first, len(labels)))
    shared = size > 1
    if np.any(size[shared] != n_dev) or np.any(device[first[shared]] != 0) or not shared[0]:
        raise TimelineError("a mark recorded on every device is missing on some: each device's records "
                            "must line up (the first mark, at least, on every device)")
    expect = np.arange(len(labels)) - first[group]  # position within the mark: device 0, 1, ...
    if np.any(device[companion] != expect[companion]) or np.any(
            (labels[companion] & ~COMPANION) != labels[first[group[companion]]]):
        raise TimelineError("a companion record does not follow its mark on the first device in device order")
    t_mark = np.maximum.reduceat(t, first)
    t_mark[0] = t[0]  # every device idle: the call starts when the host issued its first record
    latest = np.flatnonzero(t == t_mark[group])
    _, at = np.unique(group[latest], return_index=True)  # the first device holding the latest time
    which = device[latest[at]].astype(np.int64)
    which[0] = 0
    # A mark on one device can read earlier than the mark before it, whose time came from
    # another device, by up to the cross-device calibration error (a few µs): it is held at
    # that mark. More than ``max_held_ns`` means the device did not run the work before the
    # mark: an error, not a boundary moved silently.
    held = np.maximum.accumulate(t_mark)
    worst = int(np.max(held - t_mark))
    if worst > max_held_ns:
        bad = int(np.argmax(held - t_mark))
        raise TimelineError(f"mark {bad} (device {int(which[bad])}) reads {worst / 1e3:.1f} µs before the mark "
                            "issued ahead of it on another device: its device did not run the work before it")
    merged = (labels[first].astype(np.int32), held - held[0], host[first], streams[first])
    return merged, which


def merge_stamps(marks: Marks, labels: np.ndarray, t_ns: np.ndarray, anchor_label: int | tuple[int, ...],
                 dropped: int = 0, anchored: np.ndarray | None = None) -> Marks:
    """Marks with the stamps placed on the events' timeline.

    Every stamp labelled with an anchor label is a calibration stamp taken right after the
    event mark of the same label (one per compiled forward that stamps, in order); the stamps
    after it belong to that forward and are placed at ``event + (stamp - calibration stamp)``,
    right after that event in the merged order. ``anchored``: one flag per event of an anchor
    label, in order — True where that forward was calibrated (a sampled compiled decode
    calibrates only the steps that run the stamped graph; None: every one was). The clocks are
    compared only within a step, so drift between them never accumulates; what remains is the
    calibration stamp's own delay after its event (a few µs, which moves a step's stamps
    earlier, never across the step's start). A stamp is never placed after the next event.
    """
    labels = np.asarray(labels, dtype=np.int32)
    t_ns = np.asarray(t_ns, dtype=np.int64)
    anchors = np.asarray([anchor_label] if isinstance(anchor_label, int) else list(anchor_label), dtype=np.int32)
    event_idx = np.flatnonzero(np.isin(marks.labels, anchors))
    if anchored is not None:
        anchored = np.asarray(anchored, dtype=bool)
        if len(anchored) != len(event_idx):
            raise StampMergeError(f"{len(anchored)} calibration flags for {len(event_idx)} step events")
        event_idx = event_idx[anchored]
    anchor_idx = np.flatnonzero(np.isin(labels, anchors))
    if len(anchor_idx) != len(event_idx):
        raise StampMergeError(f"{len(anchor_idx)} calibration stamps for {len(event_idx)} calibrated step events")
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
