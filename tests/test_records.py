"""Reading records back: what a records file holds that is not a record is skipped and
reported once per file, never fatal, never averaged as a number."""
from __future__ import annotations

import json
import os
import random
import warnings

import pytest

from stagetrace.export.table import summarize
from stagetrace.records import SCHEMA_VERSION, RecordLoadWarning, StageRecord, load_records


def _good(**over) -> dict:
    d = StageRecord(10.0, 1.0, 5.0, 3.0, 1.0, 6.0, [1.5, 1.5], 1, 4, 3, sample_id="a").to_dict()
    d.update(over)
    return d


def _write(path, *lines: str | dict, bom: bool = False) -> None:
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def _load(path) -> tuple[list[StageRecord], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = load_records(path)
    assert all(issubclass(w.category, RecordLoadWarning) for w in caught)
    return recs, [str(w.message) for w in caught]


def test_corrupt_lines_are_skipped_in_one_warning_or_raised_on_request(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write(path, _good(), "not json", '{"unknown_field_only": 1}', "", _good())
    recs, msgs = _load(path)
    assert len(recs) == 2 and len(msgs) == 1
    assert "bad.jsonl: skipped 2 unreadable record line(s) of 4 (line 2: not JSON" in msgs[0]
    assert len(load_records(path, on_error="ignore")) == 2
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_records(path, on_error="raise")


@pytest.mark.parametrize("line, reason", [
    ("[1, 2, 3]", "a JSON list, not an object"), ("42", "a JSON int, not an object"),
    ('"text"', "a JSON str, not an object"), ("null", "a JSON NoneType, not an object"),
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
])
def test_json_that_is_not_a_record_object_is_skipped_with_its_reason(tmp_path, line, reason):
    path = tmp_path / "r.jsonl"
    _write(path, _good(), line, _good(sample_id="b"))
    recs, msgs = _load(path)
    assert [r.sample_id for r in recs] == ["a", "b"]
    assert len(msgs) == 1 and reason in msgs[0] and "line 2" in msgs[0]


@pytest.mark.parametrize("field, value", [
    ("total_ms", "12.5"), ("total_ms", float("nan")), ("prefill_ms", float("inf")), ("decode_ms", -float("inf")),
    ("decode_step_ms", [1.0, "2"]), ("decode_step_ms", [float("nan")]), ("batch_size", "1"), ("batch_size", 1.5),
    ("batch_size", True), ("output_tokens", "3"), ("versions", 5), ("sample_id", 7), ("spans", [1, 2]),
    ("spans", [{"name": "x", "start_ns": "0", "end_ns": 1, "depth": 0}]), ("schema", "1"),
    ("images", "2"), ("image_tokens", 1.5), ("image_sizes", [[1, "2"]]), ("lead", {"prefill": 3}),
    ("sweep_point", {"dtype": None}), ("sweep_point", {"max_new_tokens": float("nan")}), ("sweep_point", [1]),
])
def test_a_wrong_typed_or_non_finite_number_is_rejected_not_averaged(tmp_path, field, value):
    path = tmp_path / "r.jsonl"
    # json.dumps writes NaN and Infinity literals, which json.loads accepts: the loader must not
    _write(path, _good(), _good(**{field: value}), _good(**{field: value}), _good())
    recs, msgs = _load(path)
    assert len(recs) == 2 and summarize(recs)["total_ms"]["mean"] == 10.0
    assert len(msgs) == 1 and "skipped 2 unreadable" in msgs[0] and field in msgs[0], msgs


def test_output_tokens_none_is_a_record_whose_output_could_not_be_counted(tmp_path):
    """The tracer writes None where generate() returned no (batch, tokens) sequences (MusicGen)."""
    path = tmp_path / "r.jsonl"
    _write(path, _good(output_tokens=None), _good())
    recs, msgs = _load(path)
    assert [r.output_tokens for r in recs] == [None, 3] and msgs == []


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    _write(path, _good(sample_id="first"), _good(sample_id="second"), bom=True)
    recs, msgs = _load(path)
    assert [r.sample_id for r in recs] == ["first", "second"] and msgs == []


@pytest.mark.parametrize("seed", range(4))
def test_a_file_of_random_bytes_is_one_summary_warning(tmp_path, seed):
    path = tmp_path / "noise.jsonl"
    rng = random.Random(seed)
    path.write_bytes(bytes(rng.randrange(256) for _ in range(5000)) + b"\n" * 40)
    recs, msgs = _load(path)
    assert recs == [] and len(msgs) == 1 and msgs[0].startswith(f"{path}: skipped ")


def test_a_record_of_another_schema_version_loads_with_missing_fields_as_none(tmp_path):
    path = tmp_path / "old.jsonl"
    old = {"schema": SCHEMA_VERSION + 1, "total_ms": 5.0, "prefill_ms": 4.0, "batch_size": 1, "sample_id": "x",
           "a_field_from_the_future": [1]}
    _write(path, old, old, _good())
    recs, msgs = _load(path)
    assert len(recs) == 3 and len(msgs) == 1
    assert f"2 of version {SCHEMA_VERSION + 1}" in msgs[0] and f"writes version {SCHEMA_VERSION}" in msgs[0]
    r = recs[0]
    assert (r.total_ms, r.prefill_ms, r.sample_id, r.schema) == (5.0, 4.0, "x", SCHEMA_VERSION + 1)
    assert r.vision_ms is None and r.decode_ms is None and r.output_tokens is None and r.prompt_tokens is None
    assert r.decode_step_ms == [] and r.versions == {} and r.tpot_ms is None
    s = summarize(recs)  # missing stages are left out, not taken as 0
    assert s["total_ms"]["count"] == 3 and s["decode_ms"]["count"] == 1


def test_a_record_of_this_version_missing_a_required_field_is_skipped(tmp_path):
    path = tmp_path / "r.jsonl"
    bad = _good()
    del bad["total_ms"]
    _write(path, bad, _good())
    recs, msgs = _load(path)
    assert len(recs) == 1 and len(msgs) == 1 and "total_ms" in msgs[0]


def test_a_non_utf8_line_is_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(_good()).encode() + b"\n\xff\xfe\x00garbage\n" + json.dumps(_good()).encode() + b"\n")
    recs, msgs = _load(path)
    assert len(recs) == 2 and len(msgs) == 1 and os.fspath(path) in msgs[0]


def test_a_sweep_point_round_trips_with_its_types(tmp_path):
    point = {"dtype": "bfloat16", "max_new_tokens": 8, "size.longest_edge": 0.5, "do_resize": False}
    path = tmp_path / "r.jsonl"
    _write(path, _good(sweep_point=point), _good(sample_id="b"))
    recs, msgs = _load(path)
    assert not msgs and recs[0].sweep_point == point and recs[1].sweep_point is None
    assert type(recs[0].sweep_point["do_resize"]) is bool and recs[0].to_dict()["sweep_point"] == point
