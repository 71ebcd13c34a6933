"""The pure clock merges (``low_level/clocks.py``), on synthetic clocks: several GPUs onto one
calibrated clock, and GPU-side stamps onto the event timeline."""
from __future__ import annotations

import numpy as np
import pytest

from stagetrace.labels import Kind, label
from stagetrace.low_level import Marks
from stagetrace.low_level.clocks import COMPANION, StampMergeError, merge_stamps, place_on_one_clock
from stagetrace.low_level.pytimeline import TimelineError

L = [label(Kind.CALL_BEGIN), label(Kind.PREFILL_FORWARD), label(Kind.LM_BEGIN), label(Kind.CALL_END)]
DECODE, LB0, LE0 = label(Kind.DECODE_FORWARD), label(Kind.LAYER_BEGIN, 0), label(Kind.LAYER_END, 0)


# ---------------------------------------------------------------- several devices, one clock
def _cols(device_ns, host0, stream=7, companion=0):
    n = len(device_ns)
    return (np.asarray(L[:n], np.int32) | companion, np.asarray(device_ns, np.int64),
            host0 + np.arange(n, dtype=np.int64) * 2_000, np.full(n, stream, np.int64))


def test_each_mark_takes_the_latest_device_on_the_shared_clock():
    # device 0 works 1 ms then hands over; device 1 idles, then works 2 ms
    dev0 = _cols([0, 1_000_000, 1_000_000, 1_000_000], host0=5_000)
    # each mark on both devices: device 1's companion issued 1.3 µs after device 0's record
    dev1 = _cols([0, 10, 1_000_500, 3_000_500], host0=6_300, companion=COMPANION)
    (labels, t, host, streams), which = place_on_one_clock([dev0, dev1])
    assert labels.tolist() == L
    assert which.tolist() == [0, 0, 1, 1]  # the call starts at its first record (both idle)
    assert t.tolist() == [0, 1_000_000, 1_000_500 + 1_300, 3_000_500 + 1_300]
    assert np.all(np.diff(t) >= 0), "latest-of-monotone stays monotone: stages still partition"
    assert host.tolist() == dev0[2].tolist() and streams.tolist() == [7] * 4


def _records(rows):
    """Per device, resolved columns from (device, label, device_ns since its first record, host_ns) rows."""
    out = []
    for d in range(2):
        mine = [r for r in rows if r[0] == d]
        out.append((np.asarray([r[1] for r in mine], np.int32), np.asarray([r[2] for r in mine], np.int64),
                    np.asarray([r[3] for r in mine], np.int64), np.full(len(mine), 10 + d, np.int64)))
    return out


def test_marks_on_one_device_and_marks_on_every_device_merge_in_issue_order():
    lb1, le1 = label(Kind.LAYER_BEGIN, 1), label(Kind.LAYER_END, 1)
    rows = [  # (device, label, device time since its first record, host issue time)
        (0, L[0], 0, 1_000), (1, L[0] | COMPANION, 0, 2_000),        # on both: calibrates
        (0, LB0, 500, 3_000), (0, LE0, 40_000, 4_000),                # layer 0 on device 0
        (0, lb1, 40_000, 5_000), (1, le1, 90_000, 6_000),             # layer 1 on device 1
        (0, L[3], 90_100, 7_000), (1, L[3] | COMPANION, 90_200, 8_000),  # on both: the latest
    ]
    (labels, t, host, streams), which = place_on_one_clock(_records(rows))
    assert labels.tolist() == [L[0], LB0, LE0, lb1, le1, L[3]]
    # device 1's clock starts 1 µs later on the host clock: its records sit 1 µs later
    assert t.tolist() == [0, 500, 40_000, 40_000, 91_000, 91_200]
    assert which.tolist() == [0, 0, 0, 0, 1, 1]
    assert host.tolist() == [1_000, 3_000, 4_000, 5_000, 6_000, 7_000]
    assert streams.tolist() == [10, 10, 10, 10, 11, 10]  # each mark's own stream
    # a mark up to the calibration error early is held at the one before; far more is an error
    rows[5] = (1, le1, 37_000, 6_000)  # 2 µs before layer 1's begin on device 0
    (_, t, _, _), _ = place_on_one_clock(_records(rows))
    assert t.tolist()[3:5] == [40_000, 40_000]
    with pytest.raises(TimelineError, match="mark 4 .device 1. reads 2.0 µs before"):
        place_on_one_clock(_records(rows), max_held_ns=1_000)


@pytest.mark.parametrize("rows, why", [
    ([(0, L[0], 0, 1), (1, L[0], 0, 2)], "line up"),                                       # not a companion
    ([(0, L[0], 0, 1), (0, L[1], 0, 2), (1, L[1] | COMPANION, 0, 3)], "line up"),          # first not on both
    ([(0, L[0], 0, 1), (1, L[0] | COMPANION, 0, 2), (0, L[1], 5, 3), (1, L[2], 5, 3)], "same nanosecond"),
    ([(0, L[0], 0, 1), (1, L[1] | COMPANION, 0, 2)], "does not follow"),                   # another label
    ([(1, L[0] | COMPANION, 0, 1), (0, L[0], 0, 2)], "companion"),                          # before its mark
    ([(0, L[0], 0, 1)], "device 1 holds no record"),
])
def test_records_that_do_not_line_up_are_an_error(rows, why):
    with pytest.raises(TimelineError, match=why):
        place_on_one_clock(_records(rows))


# ---------------------------------------------------------------- merging stamps into the timeline
def _marks(labels, device_ns):
    n = len(labels)
    return Marks(np.asarray(labels, np.int32), np.asarray(device_ns, np.int64), np.arange(n, dtype=np.int64) + 100,
                 np.zeros(n, np.int64), "cuda")


def test_each_steps_stamps_are_placed_from_its_own_calibration_stamp():
    begin, end = label(Kind.CALL_BEGIN), label(Kind.CALL_END)
    marks = _marks([begin, DECODE, DECODE, end], [0, 1_000, 5_000, 9_000])
    # the stamp clock is far off and runs from another origin; only differences within a step count
    stamps = [DECODE, LB0, LE0, DECODE, LB0, LE0]
    t = [7_000_000, 7_000_100, 7_002_000, 8_000_000, 8_000_050, 8_003_000]
    merged = merge_stamps(marks, stamps, t, DECODE, dropped=0)
    assert merged.labels.tolist() == [begin, DECODE, LB0, LE0, DECODE, LB0, LE0, end]
    assert merged.device_ns.tolist() == [0, 1_000, 1_100, 3_000, 5_000, 5_050, 8_000, 9_000]
    assert merged.host_ns.tolist()[2:4] == [101, 101]  # issued with their step


def test_a_stamp_past_the_next_event_is_held_at_it():
    marks = _marks([label(Kind.CALL_BEGIN), DECODE, label(Kind.CALL_END)], [0, 1_000, 2_000])
    merged = merge_stamps(marks, [DECODE, LB0, LE0], [0, 500, 1_500], DECODE)
    assert merged.device_ns.tolist() == [0, 1_000, 1_500, 2_000, 2_000]


@pytest.mark.parametrize("stamps,match", [
    ([DECODE, LB0], "1 calibration stamps for 2 calibrated step events"),
    ([LB0, DECODE, DECODE], "before the first calibration stamp"),
])
def test_stamps_that_do_not_line_up_with_the_events_are_refused(stamps, match):
    marks = _marks([label(Kind.CALL_BEGIN), DECODE, DECODE, label(Kind.CALL_END)], [0, 1, 2, 3])
    with pytest.raises(StampMergeError, match=match):
        merge_stamps(marks, stamps, np.arange(len(stamps)), DECODE)


def test_drops_in_the_ring_fail_the_record_like_drops_in_the_timeline():
    marks = _marks([label(Kind.CALL_BEGIN), DECODE, label(Kind.CALL_END)], [0, 1, 2])
    assert merge_stamps(marks, [DECODE], [0], DECODE, dropped=4).dropped == 4


def _reference_merge(marks, labels, t_ns, anchors, anchored=None):
    """The per-step loop the vectorized merge replaced: its executable description."""
    labels, t_ns = np.asarray(labels, np.int32), np.asarray(t_ns, np.int64)
    event_idx = np.flatnonzero(np.isin(marks.labels, anchors))
    if anchored is not None:
        event_idx = event_idx[np.asarray(anchored, bool)]
    anchor_idx = list(np.flatnonzero(np.isin(labels, anchors))) + [len(labels)]
    rows, start = [], 0
    for k, ev in enumerate(event_idx):
        rows += [(marks.labels[i], marks.device_ns[i], marks.host_ns[i]) for i in range(start, ev + 1)]
        for s in range(anchor_idx[k] + 1, anchor_idx[k + 1]):
            t = marks.device_ns[ev] + (t_ns[s] - t_ns[anchor_idx[k]])
            if ev + 1 < len(marks):
                t = min(t, marks.device_ns[ev + 1])
            rows.append((labels[s], t, marks.host_ns[ev]))
        start = ev + 1
    rows += [(marks.labels[i], marks.device_ns[i], marks.host_ns[i]) for i in range(start, len(marks))]
    return rows


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_the_vectorized_stamp_merge_equals_the_reference_loop(seed, sampled):
    """``sampled``: only some forwards were calibrated (and stamped), as a sampled compiled decode."""
    rng = np.random.default_rng(seed)
    prefill, anchors = label(Kind.PREFILL_FORWARD), (label(Kind.PREFILL_FORWARD), DECODE)
    n_steps = int(rng.integers(1, 6))
    events = [label(Kind.CALL_BEGIN), prefill] + [DECODE] * n_steps + [label(Kind.CALL_END)]
    marks = _marks(events, np.cumsum(rng.integers(1, 1_000, size=len(events))))
    anchored = rng.random(len(events) - 2) < 0.5 if sampled else np.ones(len(events) - 2, bool)
    stamps, t = [], []
    for ev, calibrated in zip(events[1:-1], anchored):
        if not calibrated:
            continue
        stamps.append(ev)
        stamps += [label(Kind.LAYER_BEGIN + int(rng.integers(0, 2)), int(rng.integers(0, 4)))
                   for _ in range(int(rng.integers(0, 5)))]
    t = np.cumsum(rng.integers(1, 800, size=len(stamps))) + 10**9
    merged = merge_stamps(marks, stamps, t, anchors, anchored=anchored if sampled else None)
    got = list(zip(merged.labels.tolist(), merged.device_ns.tolist(), merged.host_ns.tolist()))
    want = [(int(a), int(b), int(c)) for a, b, c in _reference_merge(marks, stamps, t, anchors,
                                                                     anchored if sampled else None)]
    assert got == want


def test_sampled_steps_place_their_stamps_from_their_own_calibration_and_bare_steps_stand():
    begin, end = label(Kind.CALL_BEGIN), label(Kind.CALL_END)
    marks = _marks([begin, DECODE, DECODE, DECODE, end], [0, 1_000, 5_000, 7_000, 9_000])
    stamps, t = [DECODE, LB0, LE0, DECODE, LB0, LE0], [10, 110, 900, 50_000, 50_100, 50_700]
    merged = merge_stamps(marks, stamps, t, DECODE, anchored=[True, False, True])
    assert merged.labels.tolist() == [begin, DECODE, LB0, LE0, DECODE, DECODE, LB0, LE0, end]
    assert merged.device_ns.tolist() == [0, 1_000, 1_100, 1_890, 5_000, 7_000, 7_100, 7_700, 9_000]
    with pytest.raises(StampMergeError, match="2 calibration flags for 3 step events"):
        merge_stamps(marks, stamps, t, DECODE, anchored=[True, True])
    with pytest.raises(StampMergeError, match="2 calibration stamps for 1 calibrated step events"):
        merge_stamps(marks, stamps, t, DECODE, anchored=[True, False, False])
