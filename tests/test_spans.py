"""Spans as columns: identity in fields, placement on devices, round trips."""
from __future__ import annotations

import numpy as np

from stagetrace.records import StageRecord
from stagetrace.spans import Span, SpanTable

SPANS = [Span("call", None, 0, 100, 0), Span("vision", None, 5, 20, 1), Span("prefill", None, 20, 60, 1),
         Span("layer", 0, 25, 40, 2), Span("decode", None, 60, 100, 1), Span("step", 0, 60, 100, 2),
         Span("layer", 3, 61, 70, 3)]


def test_a_table_iterates_as_the_spans_it_was_made_from():
    table = SpanTable.from_spans(SPANS)
    assert len(table) == len(SPANS) and list(table) == SPANS and table == SPANS
    assert [s.name for s in table] == ["generate", "vision", "prefill", "layer 0", "decode", "step 0", "layer 3"]
    assert table.of_kind("layer") == [SPANS[3], SPANS[6]]


def test_placement_gives_each_span_a_device_without_touching_the_rest():
    table = SpanTable.from_spans(SPANS)
    placed = table.placed(np.array([0, 1, 0, 1, 0, 0, 1]), ("cuda:0", "cuda:1"))
    assert [s.device for s in placed] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0", "cuda:0", "cuda:1"]
    assert [s.device for s in table] == [None] * len(SPANS)


def test_spans_round_trip_through_a_record_dict_and_schema_1_names_still_load():
    rec = StageRecord(total_ms=1.0, vision_ms=None, prefill_ms=0.5, decode_ms=0.5, other_ms=0.0, ttft_ms=0.5,
                      decode_step_ms=[0.5], batch_size=1, prompt_tokens=1, output_tokens=2,
                      spans=SpanTable.from_spans(SPANS), host_spans=SpanTable.from_spans(SPANS[:2]))
    d = rec.to_dict(spans=True)
    assert d["spans"][3] == {"kind": "layer", "index": 0, "start_ns": 25, "end_ns": 40, "depth": 2, "device": None}
    back = StageRecord.from_dict(d)
    assert list(back.spans) == SPANS and list(back.host_spans) == SPANS[:2]
    old = dict(d, schema=1, spans=[{"name": s.name, "start_ns": s.start_ns, "end_ns": s.end_ns, "depth": s.depth,
                                    "device": None} for s in SPANS])
    assert list(StageRecord.from_dict(old).spans) == SPANS


def test_after_matmul_flags_survive_placement_and_a_records_file_and_are_written_only_where_set():
    from stagetrace.records import parse_record_line
    import json

    moved = [Span("layer", 0, 61, 65, 3, ends_after_matmul=True), Span("layer", 1, 65, 70, 3, starts_after_matmul=True,
                                                                       ends_after_matmul=True)]
    table = SpanTable.from_spans(SPANS + moved)
    placed = table.placed(np.zeros(len(table), dtype=np.int16), ("cuda:0",))
    assert [(s.starts_after_matmul, s.ends_after_matmul) for s in placed][-3:] == [(False, False), (False, True),
                                                                                   (True, True)]
    rec = StageRecord(total_ms=1.0, vision_ms=None, prefill_ms=0.5, decode_ms=0.5, other_ms=0.0, ttft_ms=0.5,
                      decode_step_ms=[0.5], batch_size=1, prompt_tokens=1, output_tokens=2, spans=table)
    rows = rec.to_dict(spans=True)["spans"]
    assert "ends_after_matmul" not in rows[0] and rows[-1]["starts_after_matmul"] is True
    back = parse_record_line(json.dumps(rec.to_dict(spans=True)))  # the file's own schema check accepts them
    assert list(back.spans) == SPANS + moved
