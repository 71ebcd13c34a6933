"""Per-call records: what one traced ``generate()`` call took, stage by stage.

A record is plain data (ms floats, token counts, metadata). Its spans — on the device
timeline and on the host clock (when each boundary's mark was issued), both computed
once when the record is built — and the raw marks stay attached in memory for
exporters (Chrome trace); they are not part of its JSON form unless asked for.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .spans import SPAN_KINDS, Span, SpanTable
from .stages import StageTimes

__all__ = ["StageRecord", "JsonlWriter", "load_records", "parse_record_line", "RecordLoadWarning", "STAGES"]

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
    output_tokens: int | None  # None: generate() returned no (batch, tokens) sequences to count (warnings say)
    # what it was given, for latency models (None where the inputs do not tell)
    images: int | None = None            # images (or videos) in the call
    image_sizes: list[list[int]] = field(default_factory=list)  # (height, width) in pixels of each
    image_tokens: int | None = None      # image/video placeholder tokens fed to the language model
    text_tokens: int | None = None       # attended prompt tokens that are not image tokens
    # where and how it was measured
    call_index: int = 0
    sample_id: str | None = None
    # the settings of a `profile --sweep` this call ran under ({"max_new_tokens": 8, "dtype": "bfloat16"});
    # None outside a sweep. A field of its own: sample ids stay the dataset's.
    sweep_point: dict[str, str | int | float | bool] | None = None
    model_class: str = ""
    model_name: str = ""
    device: str = "cpu"
    backend: str = "cpu"
    layout: str = ""
    layer_detail: str = "off"
    layer_marks: str = "pair"  # "shared": one mark per boundary between layers; "matmul": see Tracer
    # layer marks taken right after their layer's last matmul instead of at the boundary
    # (layer_marks="matmul", compiled decode steps): that layer's residual add counts to the next
    layer_marks_after_matmul: int = 0
    layer_every: int = 1       # with layer_detail="all": layers were asked for on every N-th decode step
    layer_steps: list[int] = field(default_factory=list)  # the decode steps that carry layer spans (measured)
    # the forward's return to generate() (the lead's mark at stage level) was marked on the
    # prefill and on every N-th decode step: decode_step_lead_us is None on the others
    lead_every: int = 1
    compiled_decode: bool = False  # generate() compiled the decode step; steps were marked outside the graph
    # compiled decode: the steps whose start was marked where the step before them (or the prefill)
    # had its stopping criteria issued, before generate() waited for the GPU; the others start at
    # their input preparation (compiled) or their forward (eager). See the README's Stage definitions
    decode_steps_from_stop_check: int = 0
    stream: int = 0          # handle of the stream the call's marks were recorded on
    devices: list[str] = field(default_factory=list)  # every GPU of a model split over several, `device` first
    device_streams: list[int] = field(default_factory=list)  # the stream marked on each of `devices`
    rank: int = 0            # torchrun rank (RANK) of the process that made the record
    host_start_ns: int = 0   # time.monotonic_ns() when the call's first mark was issued
    unix_start: float = 0.0  # wall clock (time.time()) at that same moment: aligns calls, ranks
    unix_time: float = 0.0   # wall clock at the call's end
    versions: dict[str, str] = field(default_factory=dict)
    n_marks: int = 0
    resolve_ms: float = 0.0  # host time of the call's one sync + resolve, after generate() returned, inside the call
    build_ms: float = 0.0    # host time to build this record from the call's marks (later, outside the call)
    error: str | None = None  # set when the call's marks could not be turned into stages
    # what the numbers cannot tell, said out loud (e.g. images given but no vision stage marked)
    warnings: list[str] = field(default_factory=list)
    # how far the GPU ran behind the host (lead.py): per stage min/median/max µs, marks,
    # GPU-bound time (a lower bound, ms), its share and the verdict; per decode step the
    # median lead and the GPU-bound time (None: no mark inside) and the verdict
    lead: dict[str, dict[str, Any]] = field(default_factory=dict)
    decode_step_lead_us: list[float | None] = field(default_factory=list)
    decode_step_gpu_bound_ms: list[float | None] = field(default_factory=list)
    decode_step_verdict: list[str] = field(default_factory=list)
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
    def from_stages(cls, st: StageTimes, **meta: Any) -> "StageRecord":
        return cls(total_ms=_ms(st.total_ns), vision_ms=_ms(st.vision_ns), prefill_ms=_ms(st.prefill_ns),
                   decode_ms=_ms(st.decode_ns), other_ms=_ms(st.other_ns), ttft_ms=_ms(st.ttft_ns),
                   decode_step_ms=[s / 1e6 for s in st.decode_step_ns], spans=st.spans,
                   host_spans=st.host_spans, **meta)

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
        d["warnings"] = list(self.warnings)
        d["lead"] = {k: dict(v) for k, v in self.lead.items()}
        d["decode_step_lead_us"] = list(self.decode_step_lead_us)
        d["decode_step_gpu_bound_ms"] = list(self.decode_step_gpu_bound_ms)
        d["decode_step_verdict"] = list(self.decode_step_verdict)
        d["layer_steps"] = list(self.layer_steps)
        d["image_sizes"] = [list(x) for x in self.image_sizes]
        d["sweep_point"] = None if self.sweep_point is None else dict(self.sweep_point)
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


# ---------------------------------------------------------------- loading and validation
# What each JSON field must hold. A field not listed (added later) is passed through as is.
_FIELD_KINDS: dict[str, str] = {
    **dict.fromkeys(("total_ms", "vision_ms", "prefill_ms", "decode_ms", "other_ms", "ttft_ms"), "number?"),
    **dict.fromkeys(("unix_start", "unix_time", "resolve_ms", "build_ms"), "number"),
    **dict.fromkeys(("batch_size", "prompt_tokens", "call_index", "stream", "rank",
                     "host_start_ns", "n_marks", "schema", "layer_every", "lead_every",
                     "layer_marks_after_matmul", "decode_steps_from_stop_check"), "int"),
    **dict.fromkeys(("model_class", "model_name", "device", "backend", "layout", "layer_detail", "layer_marks"),
                    "str"),
    **dict.fromkeys(("sample_id", "error"), "str?"),
    "compiled_decode": "bool", "decode_step_ms": "numbers", "devices": "strs", "device_streams": "ints",
    "warnings": "strs", "lead": "lead_map", "decode_step_lead_us": "numbers?s",
    "decode_step_gpu_bound_ms": "numbers?s", "decode_step_verdict": "strs", "images": "int?", "image_tokens": "int?",
    "text_tokens": "int?", "output_tokens": "int?", "image_sizes": "int_lists", "layer_steps": "ints",
    "sweep_point": "point?", "versions": "str_map", "spans": "spans", "host_spans": "spans",
}
# A span as written: its identity in kind + index (schema 2) or in its name (schema 1).
_SPAN_FIELDS = {2: {"kind": "str", "index": "int?", "start_ns": "int", "end_ns": "int", "depth": "int",
                    "device": "str?", "starts_after_matmul": "bool", "ends_after_matmul": "bool"},
                1: {"name": "str", "start_ns": "int", "end_ns": "int", "depth": "int", "device": "str?"}}
_SPAN_OPTIONAL = ("device", "index", "starts_after_matmul", "ends_after_matmul")  # may be left out
_EMPTY = {"numbers": list, "strs": list, "ints": list, "str_map": dict, "int_lists": list, "lead_map": dict,
          "numbers?s": list}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fits(kind: str, v: Any) -> bool:
    if kind.endswith("?"):
        return v is None or _fits(kind[:-1], v)
    if kind == "number":
        return _is_number(v)
    if kind == "int":
        return _is_int(v)
    if kind in ("str", "bool"):
        return isinstance(v, str if kind == "str" else bool)
    if kind in ("numbers", "strs", "ints"):
        each = {"numbers": _is_number, "strs": lambda x: isinstance(x, str), "ints": _is_int}[kind]
        return isinstance(v, list) and all(each(x) for x in v)
    if kind == "numbers?s":
        return isinstance(v, list) and all(x is None or _is_number(x) for x in v)
    if kind == "lead_map":
        return isinstance(v, dict) and all(
            isinstance(st, dict) and all(x is None or isinstance(x, str) or _is_number(x) for x in st.values())
            for st in v.values())
    if kind == "int_lists":
        return isinstance(v, list) and all(isinstance(x, list) and all(_is_int(i) for i in x) for x in v)
    if kind == "point":  # a sweep point: setting name -> a string, a finite number or true/false
        return isinstance(v, dict) and all(isinstance(x, (str, bool)) or _is_number(x) for x in v.values())
    if kind == "str_map":
        return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
    if kind == "spans":
        return isinstance(v, list) and all(isinstance(s, dict) and _fits_span(s) for s in v)
    raise AssertionError(kind)


def _fits_span(s: dict[str, Any]) -> bool:
    shape = _SPAN_FIELDS[2 if "kind" in s else 1]
    return (set(s) <= set(shape) and all(k in s for k in shape if k not in _SPAN_OPTIONAL)
            and all(_fits(shape[k], x) for k, x in s.items())
            and ("kind" not in s or s["kind"] in SPAN_KINDS))


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked(d: Any) -> dict[str, Any]:
    """The fields of one parsed line, checked; ValueError says what is wrong.

    A record of another schema version gets None (or an empty list/dict) for the fields it lacks.
    """
    if not isinstance(d, dict):
        raise ValueError(f"a JSON {type(d).__name__}, not an object")
    if "schema" not in d:
        raise ValueError("no 'schema' field: not a stagetrace record")
    for key, value in d.items():
        kind = _FIELD_KINDS.get(key)
        if kind is not None and not _fits(kind, value):
            raise ValueError(f"{key} is {_shown(value)}, not {_kind_words(kind)}")
    if d["schema"] == SCHEMA_VERSION:
        return d
    filled = dict(d)
    for f in fields(StageRecord):
        if f.name not in filled and f.name not in _IN_MEMORY:
            filled[f.name] = _EMPTY.get(_FIELD_KINDS.get(f.name, ""), lambda: None)()
    return filled


_KIND_WORDS = {"number?": "a finite number or null", "number": "a finite number", "int": "an integer",
               "str": "a string", "str?": "a string or null", "bool": "true or false",
               "numbers": "a list of finite numbers", "strs": "a list of strings", "ints": "a list of integers",
               "str_map": "an object of strings", "spans": "a list of spans",
               "numbers?s": "a list of finite numbers or nulls", "lead_map": "an object of per-stage objects",
               "int_lists": "a list of lists of integers", "point": "an object of strings, numbers and booleans"}


def _kind_words(kind: str) -> str:
    """What a field of ``kind`` must hold, in words (``X?``: X or null)."""
    return _KIND_WORDS.get(kind) or f"{_KIND_WORDS[kind.rstrip('?')]} or null"


def parse_record_line(line: str) -> StageRecord:
    """One line of a records file as a record; ValueError (a one-line reason) when it is not one."""
    try:
        return StageRecord.from_dict(_checked(json.loads(line)))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def iter_records(path: str | os.PathLike[str], on_error: str = "warn") -> Iterator[StageRecord]:
    """Yields the records of a JSONL file; bad lines are skipped (never fatal).

    With ``on_error="warn"`` a file gets at most one :class:`RecordLoadWarning` for all of
    its skipped lines (however many: a file of random bytes is one warning), and one for
    records of another schema version (loaded, with the fields they lack as None).
    ``"raise"`` raises ValueError at the first bad line; ``"ignore"`` says nothing.
    """
    if on_error not in ("warn", "ignore", "raise"):
        raise ValueError(f"on_error must be 'warn', 'ignore' or 'raise', got {on_error!r}")
    skipped: list[tuple[int, str]] = []
    other_versions: dict[Any, int] = {}
    lines = 0
    # utf-8-sig: a byte-order mark some editors put first is not part of the first record
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                rec = parse_record_line(line)
            except ValueError as exc:
                if on_error == "raise":
                    raise ValueError(f"{path}:{lineno}: skipped an unreadable record: {exc}") from None
                skipped.append((lineno, str(exc)))
                continue
            if rec.schema != SCHEMA_VERSION:
                other_versions[rec.schema] = other_versions.get(rec.schema, 0) + 1
            yield rec
    if on_error != "warn":
        return
    if skipped:
        first, reason = skipped[0]
        more = f"; {len(skipped) - 1} more" if len(skipped) > 1 else ""
        warnings.warn(f"{path}: skipped {len(skipped)} unreadable record line(s) of {lines} "
                      f"(line {first}: {reason}{more})", RecordLoadWarning, stacklevel=3)
    if other_versions:
        found = ", ".join(f"{n} of version {v}" for v, n in sorted(other_versions.items()))
        warnings.warn(f"{path}: records of another schema version ({found}; this stagetrace writes version "
                      f"{SCHEMA_VERSION}): the fields they lack are None", RecordLoadWarning, stacklevel=3)


def load_records(path: str | os.PathLike[str], on_error: str = "warn") -> list[StageRecord]:
    """Reads records written by :class:`JsonlWriter` or ``Tracer.save_jsonl``.

    A corrupt or truncated line (e.g. the last one of a run that was killed), a line
    that is not a record, or a record with a string, NaN or infinity where a number
    belongs is skipped; see :func:`iter_records` for how that is reported.
    """
    return list(iter_records(path, on_error))


def write_jsonl(records: Iterable[StageRecord], path: str | os.PathLike[str], spans: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(_line(r, spans))
