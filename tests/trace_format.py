"""A validator for the Chrome Trace Event Format subset stagetrace writes.

Rules checked (from the Trace Event Format spec): the JSON object form with a
``traceEvents`` list and ``displayTimeUnit`` of "ms" or "ns"; required fields per
phase; µs timestamps as non-negative numbers; non-negative durations; metadata
naming every process and thread used; complete events strictly nested per track
(a span either contains another or is disjoint from it); counters with numeric values;
every flow end ("f") bound to a flow start ("s") of the same id, no earlier than it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

EPS_US = 1e-3  # timestamps are rounded to ns (3 decimals of µs)

REQUIRED = {"X": ("name", "ph", "ts", "dur", "pid", "tid"), "M": ("name", "ph", "pid", "args"),
            "i": ("name", "ph", "ts", "pid", "tid"), "C": ("name", "ph", "ts", "pid", "args"),
            "s": ("name", "ph", "ts", "pid", "tid", "id"), "f": ("name", "ph", "ts", "pid", "tid", "id")}
METADATA_NAMES = {"process_name", "thread_name", "process_sort_index", "thread_sort_index", "process_labels"}


def validate_trace(trace: dict[str, Any]) -> dict[tuple[int, int], list[dict]]:
    """Raises AssertionError on the first violation; returns the X events per (pid, tid)."""
    assert isinstance(trace, dict) and isinstance(trace.get("traceEvents"), list), "object form with traceEvents"
    assert trace.get("displayTimeUnit") in ("ms", "ns"), "displayTimeUnit must be 'ms' or 'ns'"
    named_pids, named_threads = set(), set()
    tracks: dict[tuple[int, int], list[dict]] = defaultdict(list)
    flow_starts: dict[Any, dict] = {}
    for ev in trace["traceEvents"]:
        ph = ev.get("ph")
        assert ph in REQUIRED, f"unexpected phase {ph!r} in {ev}"
        for f in REQUIRED[ph]:
            assert f in ev, f"{ph} event lacks {f!r}: {ev}"
        assert isinstance(ev["pid"], int) and isinstance(ev["name"], str)
        if ph == "M":
            assert ev["name"] in METADATA_NAMES, ev
            assert isinstance(ev["args"], dict)
            if ev["name"] == "process_name":
                assert isinstance(ev["args"].get("name"), str)
                named_pids.add(ev["pid"])
            if ev["name"] == "thread_name":
                assert isinstance(ev["args"].get("name"), str)
                named_threads.add((ev["pid"], ev["tid"]))
            continue
        if ph == "C":
            assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0, ev
            assert ev["args"] and all(isinstance(v, (int, float)) for v in ev["args"].values()), ev
            continue
        assert isinstance(ev["tid"], int)
        if ph == "s":
            assert ev["id"] not in flow_starts, f"flow id {ev['id']} started twice"
            flow_starts[ev["id"]] = ev
        if ph == "f":
            start = flow_starts.get(ev["id"])
            assert start is not None, f"flow end without a start: {ev}"
            assert ev["ts"] >= start["ts"] - EPS_US, f"flow ends before it starts: {start} -> {ev}"
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0, f"negative or non-numeric ts: {ev}"
        if ph == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0, f"negative duration: {ev}"
            if "args" in ev:
                assert isinstance(ev["args"], dict)
            tracks[(ev["pid"], ev["tid"])].append(ev)
    for key, evs in tracks.items():
        assert key[0] in named_pids, f"process {key[0]} has no process_name"
        assert key in named_threads, f"track {key} has no thread_name"
        stack: list[dict] = []
        for ev in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
            end = ev["ts"] + ev["dur"]
            # Pop spans that ended before this one starts (disjoint); a span that still
            # contains it stays as its parent.
            while (stack and stack[-1]["ts"] + stack[-1]["dur"] <= ev["ts"] + EPS_US
                   and end > stack[-1]["ts"] + stack[-1]["dur"] + EPS_US):
                stack.pop()
            if stack:
                top_end = stack[-1]["ts"] + stack[-1]["dur"]
                assert end <= top_end + EPS_US, (
                    f"span {ev['name']} [{ev['ts']}, {end}] partially overlaps {stack[-1]['name']} "
                    f"[{stack[-1]['ts']}, {top_end}] on track {key}")
            stack.append(ev)
    return tracks
