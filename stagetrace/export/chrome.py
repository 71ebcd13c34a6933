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
import math
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

from ..records import StageRecord
from ..stages import Span
from .files import replacing

__all__ = ["chrome_trace", "write_chrome_trace", "merge_chrome_traces", "read_chrome_trace", "TraceFileError"]

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
    """The call's event's args; a swept call's point as its own field (``{"max_new_tokens": 2, ...}``)."""
    point = {"sweep_point": dict(rec.sweep_point)} if rec.sweep_point else {}
    return {**point, "sample_id": rec.sample_id, "call_index": rec.call_index, "model": rec.model_class,
            "batch_size": rec.batch_size, "prompt_tokens": rec.prompt_tokens, "output_tokens": rec.output_tokens,
            "total_ms": rec.total_ms, "vision_ms": rec.vision_ms, "prefill_ms": rec.prefill_ms,
            "decode_ms": rec.decode_ms, "other_ms": rec.other_ms, "ttft_ms": rec.ttft_ms, "tpot_ms": rec.tpot_ms,
            "images": rec.images, "image_tokens": rec.image_tokens}


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
            if s.starts_after_matmul:  # layer_marks="matmul": said on the span, not only counted per call
                args["starts"] = "after the previous layer's last matmul"
            if s.ends_after_matmul:
                args["ends"] = "after this layer's last matmul"
        name = s.name if not host else f"{s.name} (issued)"
        cat = "host" if host else ("layer" if s.kind == "layer" else "stage")
        events.append({"name": name, "cat": cat, "ph": "X", "ts": round(base_us + _us(s.start_ns), 3),
                       "dur": _us(s.dur_ns), "pid": pid, "tid": tid(s) if callable(tid) else tid, "args": args})
    return events


def _lead_events(rec: StageRecord, base_us: float, pid: int, tid_of: Callable[[Span], int],
                 flow_base: int) -> list[dict]:
    """How far the GPU ran behind the host (``lead.py``): counters of each decode step's median
    lead and GPU-bound share, and a flow arrow from each stage's start on the host track (when it was issued) to
    the same start on its GPU track (when it ran)."""
    events: list[dict] = []
    steps = [s for s in rec.spans if s.kind == "step"]
    for s, lead in zip(steps, rec.decode_step_lead_us):
        if lead is not None:
            events.append({"name": "GPU lead (µs, step median)", "ph": "C", "pid": pid,
                           "ts": round(base_us + _us(s.start_ns), 3), "args": {"lead_us": round(lead, 3)}})
    # GPU-bound share of each step (lead.py's lower bound), 0..1: where launch overhead ends
    for s, bound_ms in zip(steps, rec.decode_step_gpu_bound_ms):
        if bound_ms is not None and s.dur_ns > 0:
            events.append({"name": "GPU-bound share (step)", "ph": "C", "pid": pid,
                           "ts": round(base_us + _us(s.start_ns), 3),
                           "args": {"share": round(min(1.0, bound_ms * 1e6 / s.dur_ns), 4)}})
    host = {s.kind: s for s in rec.host_spans if s.kind in ("vision", "prefill", "decode")}
    for k, s in enumerate(x for x in rec.spans if x.kind in host):
        fid = f"{pid}-{flow_base}-{k}"  # unique within the trace and across merged ranks
        events.append({"name": f"{s.kind} issued → ran", "cat": "lead", "ph": "s", "id": fid, "pid": pid,
                       "tid": HOST_TID, "ts": round(base_us + _us(host[s.kind].start_ns), 3)})
        events.append({"name": f"{s.kind} issued → ran", "cat": "lead", "ph": "f", "bp": "e", "id": fid, "pid": pid,
                       "tid": tid_of(s), "ts": round(base_us + _us(s.start_ns), 3)})
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
        events += _lead_events(rec, base_us, pid, tid_of, flow_base=len(events))
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
    """Writes the trace whole or not at all (see :mod:`.files`); gzip when the name ends in .gz (any case)."""
    data = json.dumps(trace, separators=(",", ":")).encode("utf-8")
    with replacing(path) as fh:
        if path.suffix.lower() == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
                gz.write(data)
        else:
            fh.write(data)
    return path


def write_chrome_trace(records: Iterable[StageRecord], path: str | os.PathLike[str],
                       rank: int | None = None) -> Path:
    """Writes ``path`` (``.json``, or gzip-compressed when it ends in ``.gz``, any case)."""
    return _dump(chrome_trace(records, rank=rank), Path(path))


class TraceFileError(ValueError):
    """A file that is not a readable stagetrace Chrome trace; the message is one line."""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_trace(trace: Any) -> str | None:
    """What keeps ``trace`` from being merged, or None."""
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        return "JSON without a traceEvents list"
    for i, ev in enumerate(trace["traceEvents"]):
        if not (isinstance(ev, dict) and isinstance(ev.get("ph"), str) and isinstance(ev.get("name"), str)
                and isinstance(ev.get("pid"), int) and not isinstance(ev.get("pid"), bool)
                and ("ts" not in ev or _is_num(ev["ts"]))):
            return f"event {i} is not an event with a name, a phase, an integer pid and a numeric ts"
    other = trace.get("otherData", {})
    if not isinstance(other, dict) or not _is_num(other.get("origin_unix", 0.0)) or not (
            isinstance(other.get("calls", 0), int) and not isinstance(other.get("calls", 0), bool)):
        return "otherData is not what stagetrace writes (origin_unix, calls)"
    return None


def read_chrome_trace(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a trace, gzip-compressed or not (told by its content, not its name).

    Raises :class:`TraceFileError` (one line) for a file that is not a trace; OSError as is.
    """
    p = Path(path)
    raw = p.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        trace = json.loads(raw.decode("utf-8-sig"))
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise TraceFileError(f"{p}: not a readable trace: a truncated or corrupt gzip file ({exc})") from None
    except UnicodeDecodeError:
        kind = "not gzip, and not UTF-8 JSON" if p.name.lower().endswith(".gz") else "not UTF-8 JSON"
        raise TraceFileError(f"{p}: not a readable trace: {kind}") from None
    except json.JSONDecodeError as exc:
        kind = "not gzip (though named .gz), and" if p.name.lower().endswith(".gz") else "truncated or"
        raise TraceFileError(f"{p}: not a readable trace: {kind} not JSON ({exc.msg} at line "
                             f"{exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise TraceFileError(f"{p}: not a readable trace: JSON nested too deeply") from None
    problem = _check_trace(trace)
    if problem:
        raise TraceFileError(f"{p}: not a readable trace: {problem}")
    return trace


def _same_file(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _pid_map(traces: list[dict[str, Any]], names: list[str]) -> dict[tuple[int, int], tuple[int, str | None]]:
    """(input, pid) -> (merged pid, process label or None to keep its own).

    Pids (ranks) are kept when no two inputs share one, so merging a merged trace again,
    alone or with ranks it lacks, changes nothing; otherwise every process is numbered in
    the order given and labelled with its rank and input.
    """
    pids = [sorted({ev["pid"] for ev in t["traceEvents"]}) for t in traces]
    flat = [p for ps in pids for p in ps]
    if len(flat) == len(set(flat)):
        return {(i, p): (p, None) for i, ps in enumerate(pids) for p in ps}
    out: dict[tuple[int, int], tuple[int, str | None]] = {}
    for i, ps in enumerate(pids):
        for p in ps:
            out[(i, p)] = (len(out), f"stagetrace rank {p} ({names[i]})")
    return out


def merge_chrome_traces(paths: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Joins per-rank traces side by side: one process per rank, on one wall clock.

    Each process keeps its rank as pid when no two inputs share one (so merging is
    idempotent); otherwise processes are numbered in the order given. Every input is
    read before anything is written; ``out`` may not be one of the inputs (ValueError),
    and is replaced whole (a temporary file, then a rename).
    """
    paths = [Path(p) for p in paths]
    out = Path(out)
    if not paths:
        raise ValueError("no traces to merge")
    for p in paths:
        if _same_file(p, out):
            raise ValueError(f"the output {out} is also an input: write the merge somewhere else")
    traces = [read_chrome_trace(p) for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if p.parent.name else p.name for p in paths]
    pid_of = _pid_map(traces, labels)
    origins = [float(t.get("otherData", {}).get("origin_unix", 0.0)) for t in traces]
    origin = min(origins)
    merged: list[dict] = []
    for i, (t, o) in enumerate(zip(traces, origins)):
        shift = (o - origin) * 1e6
        for ev in t["traceEvents"]:
            pid, label = pid_of[(i, ev["pid"])]
            ev = dict(ev, pid=pid)
            if ev["ph"] == "M" and ev["name"] == "process_name" and label is not None:
                ev["args"] = {"name": label}
            elif ev["ph"] == "M" and ev["name"] == "process_sort_index":
                ev["args"] = {"sort_index": pid}
            elif "ts" in ev:
                ev["ts"] = round(ev["ts"] + shift, 3)
            if ev["ph"] in ("s", "f"):  # flow ids are unique per process: qualify them by the output's
                ev["id"] = f"{pid}:{str(ev['id']).split(':', 1)[-1]}"
            merged.append(ev)
    from .. import __version__

    return _dump({"traceEvents": merged, "displayTimeUnit": "ms",
                  "otherData": {"producer": f"stagetrace {__version__}", "origin_unix": origin,
                                "ranks": sorted({p for p, _ in pid_of.values()}),
                                "calls": sum(t.get("otherData", {}).get("calls", 0) for t in traces)}}, out)
