"""Per-call records: what one traced ``generate()`` call took, stage by stage.

A record is plain data (ms floats, token counts, metadata). Its spans — on the device
timeline and on the host clock (when each boundary's mark was issued), both computed
once when the record is built — and the raw marks stay attached in memory for
exporters (Chrome trace); they are not part of its JSON form unless asked for.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .spans import Span, SpanTable
from .stages import StageTimes

__all__ = ["StageRecord", "JsonlWriter", "load_records", "RecordLoadWarning", "STAGES"]

# The stage columns every summary and table shows, in order.
STAGES = ("total_ms", "vision_ms", "prefill_ms", "decode_ms", "other_ms", "ttft_ms", "tpot_ms")

# 1: the first release. 2: spans carry their identity as fields (kind, index), not a name.
SCHEMA_VERSION = 2


_IN_MEMORY = ("spans", "host_spans", "marks")


class RecordLoadWarning(UserWarning):
    """A line of a records file could not be read and was skipped."""


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e6


@dataclass
class StageRecord:
    # stage times (ms); vision is None when no vision ran, decode is 0 for one-token calls
    total_ms: float | None
    vision_ms: float | None
    prefill_ms: float | None
    decode_ms: float | None
    other_ms: float | None
    ttft_ms: float | None
    decode_step_ms: list[float]
    # what the call did
    batch_size: int
    prompt_tokens: int
    output_tokens: int
    # where and how it was measured
    call_index: int = 0
    sample_id: str | None = None
    model_class: str = ""
    model_name: str = ""
    device: str = "cpu"
    backend: str = "cpu"
    layout: str = ""
    layer_detail: str = "off"
    layer_marks: str = "pair"  # "shared": one mark per boundary between layers (see Tracer)
    compiled_decode: bool = False  # generate() compiled the decode step; steps were marked outside the graph
    stream: int = 0          # handle of the stream the call's marks were recorded on
    devices: list[str] = field(default_factory=list)  # every GPU of a model split over several, `device` first
    device_streams: list[int] = field(default_factory=list)  # the stream marked on each of `devices`
    rank: int = 0            # torchrun rank (RANK) of the process that made the record
    host_start_ns: int = 0   # time.monotonic_ns() when the call's first mark was issued
    unix_start: float = 0.0  # wall clock (time.time()) at that same moment: aligns calls, ranks
    unix_time: float = 0.0   # wall clock at the call's end
    versions: dict[str, str] = field(default_factory=dict)
    n_marks: int = 0
    resolve_ms: float = 0.0  # host time of the call's one sync + resolve, after generate() returned
    error: str | None = None  # set when the call's marks could not be turned into stages
    schema: int = SCHEMA_VERSION
    # in-memory only: the spans and raw marks behind the numbers
    spans: SpanTable = field(default_factory=SpanTable.empty, repr=False, compare=False)
    host_spans: SpanTable = field(default_factory=SpanTable.empty, repr=False, compare=False)
    marks: Any = field(default=None, repr=False, compare=False)

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first: decode time over decode steps."""
        if not self.decode_step_ms or self.decode_ms is None:
            return None
        return self.decode_ms / len(self.decode_step_ms)

    @classmethod
    def from_stages(cls, st: StageTimes, host_spans: SpanTable | None = None, **meta: Any) -> "StageRecord":
        return cls(total_ms=_ms(st.total_ns), vision_ms=_ms(st.vision_ns), prefill_ms=_ms(st.prefill_ns),
                   decode_ms=_ms(st.decode_ns), other_ms=_ms(st.other_ns), ttft_ms=_ms(st.ttft_ns),
                   decode_step_ms=[s / 1e6 for s in st.decode_step_ns], spans=st.spans,
                   host_spans=host_spans if host_spans is not None else SpanTable.empty(), **meta)

    @classmethod
    def failed(cls, error: str, **meta: Any) -> "StageRecord":
        return cls(total_ms=None, vision_ms=None, prefill_ms=None, decode_ms=None, other_ms=None,
                   ttft_ms=None, decode_step_ms=[], error=error, **meta)

    def to_dict(self, spans: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _IN_MEMORY}
        d["versions"] = dict(self.versions)
        d["devices"] = list(self.devices)
        d["device_streams"] = list(self.device_streams)
        d["decode_step_ms"] = list(self.decode_step_ms)
        d["tpot_ms"] = self.tpot_ms
        if spans:
            d["spans"] = _as_table(self.spans).to_dicts()
            d["host_spans"] = _as_table(self.host_spans).to_dicts()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageRecord":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and k not in _IN_MEMORY}
        rec = cls(**kw)
        if "spans" in d:
            rec.spans = _read_spans(d["spans"])
        if "host_spans" in d:
            rec.host_spans = _read_spans(d["host_spans"])
        return rec


def _as_table(spans: SpanTable | list[Span]) -> SpanTable:
    return spans if isinstance(spans, SpanTable) else SpanTable.from_spans(spans)


def _read_spans(rows: list[dict[str, Any]]) -> SpanTable:
    """Spans of a records file; schema 1 wrote a span's identity as its display name only."""
    return SpanTable.from_spans(Span(**row) if "kind" in row else _schema1_span(**row) for row in rows)


def _schema1_span(name: str, start_ns: int, end_ns: int, depth: int, device: str | None = None) -> Span:
    kind, _, index = name.partition(" ")
    return Span("call" if kind == "generate" else kind, int(index) if index else None, start_ns, end_ns, depth,
                device)


def _line(record: StageRecord, spans: bool) -> str:
    """One record as one JSONL line: the only place the file format is written."""
    return json.dumps(record.to_dict(spans=spans), separators=(",", ":")) + "\n"


class JsonlWriter:
    """Appends one record per line and flushes it, so a crash loses at most the call in flight.

    ``fsync=True`` also survives a machine crash, at a few ms per record.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False, spans: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._spans = spans
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")
        # A previous run killed mid-line leaves a partial line: start ours on a fresh one.
        if self._fh.tell() > 0:
            with open(self.path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    self._fh.write("\n")

    def write(self, record: StageRecord) -> None:
        if self._fh is None:
            raise ValueError(f"JsonlWriter for {self.path} is closed")
        self._fh.write(_line(record, self._spans))
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(path: str | os.PathLike[str], on_error: str = "warn") -> Iterator[StageRecord]:
    """Yields the records of a JSONL file; bad lines are reported and skipped (never fatal)."""
    if on_error not in ("warn", "ignore", "raise"):
        raise ValueError(f"on_error must be 'warn', 'ignore' or 'raise', got {on_error!r}")
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield StageRecord.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                msg = f"{path}:{lineno}: skipped an unreadable record ({type(exc).__name__}: {exc})"
                if on_error == "raise":
                    raise ValueError(msg) from exc
                if on_error == "warn":
                    warnings.warn(msg, RecordLoadWarning, stacklevel=3)


def load_records(path: str | os.PathLike[str], on_error: str = "warn") -> list[StageRecord]:
    """Reads records written by :class:`JsonlWriter` or ``Tracer.save_jsonl``.

    A corrupt or truncated line (e.g. the last one of a run that was killed) is
    reported as a :class:`RecordLoadWarning` and skipped.
    """
    return list(iter_records(path, on_error))


def write_jsonl(records: Iterable[StageRecord], path: str | os.PathLike[str], spans: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(_line(r, spans))
