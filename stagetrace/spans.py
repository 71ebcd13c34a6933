"""Spans: named intervals of one call, as columns (one numpy array per field).

A call with layer detail has tens of thousands of spans; building a Python object per
span after every ``generate()`` would cost more than everything else done then. The
stage math therefore fills a :class:`SpanTable` (columns), and :class:`Span` objects
exist only when a reader iterates (exporters, tests).

What must stay true:

* a span's identity is its fields — ``kind`` (one of :data:`SPAN_KINDS`), ``index``
  (the step or layer number, ``None`` otherwise), ``depth`` and ``device`` — and
  nothing reads it back from ``name``, which is for people only;
* ``SPAN_KINDS`` is stored by position in files: append, never renumber.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Span", "SpanTable", "SPAN_KINDS", "KIND_CODE"]

# The call, its stages, decode steps, decoder layers. Codes are positions: append only.
SPAN_KINDS = ("call", "vision", "prefill", "decode", "step", "layer")
KIND_CODE = {k: i for i, k in enumerate(SPAN_KINDS)}
_INDEXED = {"step", "layer"}


@dataclass(frozen=True)
class Span:
    """An interval on the call's timeline, ns relative to the call's first mark."""

    kind: str                 # one of SPAN_KINDS
    index: int | None         # the step or layer number; None for the call and its stages
    start_ns: int
    end_ns: int
    depth: int                # 0 call, 1 stage, 2 step or prefill layer, 3 layer inside a step
    device: str | None = None  # the GPU whose work it is, when the model is split over several
    # layer_marks="matmul" in compiled code: the span starts / ends at a stamp taken right after
    # the last matmul of the layer before that boundary, not at the boundary itself (so the
    # work after a layer's last matmul, e.g. its residual add, counts to the next layer)
    starts_after_matmul: bool = False
    ends_after_matmul: bool = False

    @property
    def dur_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def name(self) -> str:
        """For display only ("generate", "prefill", "step 3", "layer 7")."""
        if self.kind == "call":
            return "generate"
        return f"{self.kind} {self.index}" if self.kind in _INDEXED else self.kind


class SpanTable:
    """Spans as parallel columns; iterating yields :class:`Span` objects.

    ``device`` holds a position in ``devices`` (-1: not placed on a particular device).
    """

    __slots__ = ("kind", "index", "start_ns", "end_ns", "depth", "device", "devices", "starts_after_matmul",
                 "ends_after_matmul")

    def __init__(self, kind: np.ndarray, index: np.ndarray, start_ns: np.ndarray, end_ns: np.ndarray,
                 depth: np.ndarray, device: np.ndarray | None = None, devices: Sequence[str] = (),
                 starts_after_matmul: np.ndarray | None = None, ends_after_matmul: np.ndarray | None = None):
        self.kind = np.asarray(kind, dtype=np.int8)
        self.index = np.asarray(index, dtype=np.int32)
        self.start_ns = np.asarray(start_ns, dtype=np.int64)
        self.end_ns = np.asarray(end_ns, dtype=np.int64)
        self.depth = np.asarray(depth, dtype=np.int8)
        n = len(self.kind)
        self.device = np.full(n, -1, dtype=np.int16) if device is None else np.asarray(device, dtype=np.int16)
        self.devices = tuple(devices)
        # two arrays, never one shared by both columns (writing one must not change the other)
        self.starts_after_matmul = (np.zeros(n, dtype=bool) if starts_after_matmul is None
                                    else np.asarray(starts_after_matmul, bool))
        self.ends_after_matmul = (np.zeros(n, dtype=bool) if ends_after_matmul is None
                                  else np.asarray(ends_after_matmul, bool))

    @classmethod
    def empty(cls) -> "SpanTable":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, z)

    @classmethod
    def from_spans(cls, spans: Iterable[Span]) -> "SpanTable":
        spans = list(spans)
        devices = sorted({s.device for s in spans if s.device is not None})
        code = {d: i for i, d in enumerate(devices)}
        return cls(np.array([KIND_CODE[s.kind] for s in spans], dtype=np.int8),
                   np.array([-1 if s.index is None else s.index for s in spans], dtype=np.int32),
                   np.array([s.start_ns for s in spans], dtype=np.int64),
                   np.array([s.end_ns for s in spans], dtype=np.int64),
                   np.array([s.depth for s in spans], dtype=np.int8),
                   np.array([code.get(s.device, -1) for s in spans], dtype=np.int16), devices,
                   np.array([s.starts_after_matmul for s in spans], dtype=bool),
                   np.array([s.ends_after_matmul for s in spans], dtype=bool))

    @classmethod
    def from_dicts(cls, rows: Iterable[dict[str, Any]]) -> "SpanTable":
        return cls.from_spans(Span(**row) for row in rows)

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def __getitem__(self, i: int) -> Span:
        kind = SPAN_KINDS[int(self.kind[i])]
        d = int(self.device[i])
        return Span(kind, int(self.index[i]) if kind in _INDEXED else None, int(self.start_ns[i]),
                    int(self.end_ns[i]), int(self.depth[i]), self.devices[d] if d >= 0 else None,
                    bool(self.starts_after_matmul[i]), bool(self.ends_after_matmul[i]))

    def __iter__(self) -> Iterator[Span]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SpanTable):
            return list(self) == list(other)
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"SpanTable({len(self)} spans)"

    def has_kind(self, kind: str) -> bool:
        return bool(np.any(self.kind == KIND_CODE[kind]))

    def of_kind(self, kind: str) -> list[Span]:
        return [self[i] for i in np.flatnonzero(self.kind == KIND_CODE[kind])]

    def placed(self, device: np.ndarray, devices: Sequence[str]) -> "SpanTable":
        """The same spans with a device (a position in ``devices``) per span."""
        return SpanTable(self.kind, self.index, self.start_ns, self.end_ns, self.depth, device, devices,
                         self.starts_after_matmul, self.ends_after_matmul)

    def to_dicts(self) -> list[dict[str, Any]]:
        """One dict per span; the after-matmul flags only where set (almost every span has none)."""
        rows = []
        for s in self:
            row = {"kind": s.kind, "index": s.index, "start_ns": s.start_ns, "end_ns": s.end_ns, "depth": s.depth,
                   "device": s.device}
            if s.starts_after_matmul:
                row["starts_after_matmul"] = True
            if s.ends_after_matmul:
                row["ends_after_matmul"] = True
            rows.append(row)
        return rows
