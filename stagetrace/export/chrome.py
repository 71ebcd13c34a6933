"""Chrome Trace Event Format (opens in Perfetto and chrome://tracing).

Layout: one process per rank; in it one track per GPU device/stream with the stages of
every call as nested complete ('X') events (generate ▸ vision / prefill / decode ▸ step i
▸ layer j) — for a model split over GPUs, layers and vision on the track of the GPU that
holds them, the call and its stages on the GPU generate() starts on — and one host track with the same stages on the host clock: when the host
*issued* each boundary's mark, so a reader sees how far the host ran ahead of the GPU.

Placement on one clock: each call's device times are relative to its first mark. That
first mark is placed at the host wall-clock time (``unix_start``) at which it was issued:
the previous call ended with a sync, so the stream is idle when a call starts and the
first event runs within a launch latency (a few µs) of its issue. Calls and ranks are
then ordered on the wall clock; ``ts`` is µs since the earliest call in the file.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from ..records import StageRecord
from ..stages import Span

__all__ = ["chrome_trace", "write_chrome_trace", "merge_chrome_traces", "read_chrome_trace"]

HOST_TID = 0


def _us(ns: int) -> float:
    return round(ns / 1e3, 3)


def _gpu_track_name(rec: StageRecord, device: str, stream: int) -> str:
    if rec.backend == "cpu":
        return f"device timeline: {device} (host clock, CPU backend)"
    return f"GPU {device} stream {stream:#x}"


def _track_of(rec: StageRecord, span: Span) -> tuple[str, int]:
    """(device, stream) of a span: its own GPU when the model is split over several."""
    if span.device is None or span.device == rec.device or span.device not in rec.devices:
        return rec.device, rec.stream
    i = rec.devices.index(span.device)
    return span.device, rec.device_streams[i] if i < len(rec.device_streams) else 0


def _call_args(rec: StageRecord) -> dict[str, Any]:
    return {"sample_id": rec.sample_id, "call_index": rec.call_index, "model": rec.model_class,
            "batch_size": rec.batch_size, "prompt_tokens": rec.prompt_tokens, "output_tokens": rec.output_tokens,
            "total_ms": rec.total_ms, "vision_ms": rec.vision_ms, "prefill_ms": rec.prefill_ms,
            "decode_ms": rec.decode_ms, "other_ms": rec.other_ms, "ttft_ms": rec.ttft_ms, "tpot_ms": rec.tpot_ms}


def _span_events(spans: Iterable[Span], rec: StageRecord, base_us: float, pid: int, tid: int | Callable[[Span], int],
                 host: bool) -> list[dict]:
    events = []
    for s in spans:
        if s.kind == "call":
            args = _call_args(rec)
        else:
            args = {"ms": s.dur_ns / 1e6}
            if s.index is not None:
                args[s.kind] = s.index
        name = s.name if not host else f"{s.name} (issued)"
        cat = "host" if host else ("layer" if s.kind == "layer" else "stage")
        events.append({"name": name, "cat": cat, "ph": "X", "ts": round(base_us + _us(s.start_ns), 3),
                       "dur": _us(s.dur_ns), "pid": pid, "tid": tid(s) if callable(tid) else tid, "args": args})
    return events


def chrome_trace(records: Iterable[StageRecord], rank: int | None = None,
                 origin_unix: float | None = None) -> dict[str, Any]:
    """The trace as a dict (``traceEvents``, ``displayTimeUnit``, ``otherData``)."""
    recs = [r for r in records if r.error is None and len(r.spans)]
    origin = origin_unix if origin_unix is not None else min((r.unix_start for r in recs), default=0.0)
    pid = rank if rank is not None else (recs[0].rank if recs else 0)
    tids: dict[tuple[str, int], int] = {}
    names: dict[int, str] = {}
    events: list[dict] = []
    for rec in recs:
        def tid_of(span: Span, rec: StageRecord = rec) -> int:
            device, stream = _track_of(rec, span)
            tid = tids.setdefault((device, stream), len(tids) + 1)
            names.setdefault(tid, _gpu_track_name(rec, device, stream))
            return tid

        base_us = (rec.unix_start - origin) * 1e6
        events += _span_events(rec.spans, rec, base_us, pid, tid_of, host=False)
        events += _span_events(rec.host_spans, rec, base_us, pid, HOST_TID, host=True)
    meta: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": HOST_TID, "args": {"name": f"stagetrace rank {pid}"}},
        {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": HOST_TID, "args": {"sort_index": pid}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": HOST_TID, "args": {"name": "host: marks issued"}},
        {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": HOST_TID, "args": {"sort_index": 1000}},
    ]
    for tid, name in names.items():
        meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    from .. import __version__

    return {"traceEvents": meta + events, "displayTimeUnit": "ms",
            "otherData": {"producer": f"stagetrace {__version__}", "origin_unix": origin, "ranks": [pid],
                          "calls": len(recs)}}


def _dump(trace: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(trace, separators=(",", ":"))
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def write_chrome_trace(records: Iterable[StageRecord], path: str | os.PathLike[str],
                       rank: int | None = None) -> Path:
    """Writes ``path`` (``.json``, or gzip-compressed when it ends in ``.gz``)."""
    return _dump(chrome_trace(records, rank=rank), Path(path))


def read_chrome_trace(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        return json.load(fh)


def merge_chrome_traces(paths: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Joins per-rank traces side by side: one process per input, on one wall clock.

    Each input keeps its own rank as pid when the ranks differ; otherwise inputs are
    numbered in the order given.
    """
    traces = [read_chrome_trace(p) for p in paths]
    if not traces:
        raise ValueError("no traces to merge")
    ranks = [t.get("otherData", {}).get("ranks", [0])[0] for t in traces]
    if len(set(ranks)) != len(ranks):
        ranks = list(range(len(traces)))
    origins = [t.get("otherData", {}).get("origin_unix", 0.0) for t in traces]
    origin = min(origins)
    merged: list[dict] = []
    for t, rank, o in zip(traces, ranks, origins):
        shift = (o - origin) * 1e6
        for ev in t["traceEvents"]:
            ev = dict(ev, pid=rank)
            if ev["ph"] == "M" and ev["name"] == "process_name":
                ev["args"] = {"name": f"stagetrace rank {rank}"}
            elif ev["ph"] == "M" and ev["name"] == "process_sort_index":
                ev["args"] = {"sort_index": rank}
            elif "ts" in ev:
                ev["ts"] = round(ev["ts"] + shift, 3)
            merged.append(ev)
    from .. import __version__

    return _dump({"traceEvents": merged, "displayTimeUnit": "ms",
                  "otherData": {"producer": f"stagetrace {__version__}", "origin_unix": origin, "ranks": ranks,
                                "calls": sum(t.get("otherData", {}).get("calls", 0) for t in traces)}}, Path(out))
