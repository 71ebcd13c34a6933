"""Outputs: Chrome traces that pass the format's rules, records that survive a crash, summaries."""
from __future__ import annotations

import gzip
import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import stagetrace
from stagetrace.testing import tiny
from stagetrace.export.chrome import chrome_trace, merge_chrome_traces, read_chrome_trace
from stagetrace.export.table import format_summary, summarize, write_csv
from stagetrace.records import JsonlWriter, RecordLoadWarning, StageRecord, load_records

from helpers import gen_kwargs
from trace_format import validate_trace

ROOT = Path(__file__).resolve().parent.parent


def traced(family: str, calls: int = 2, new_tokens: int = 4, **kw) -> stagetrace.Tracer:
    case = tiny.build(family)
    with stagetrace.trace(case.model, **kw) as tracer:
        for i in range(calls):
            with tracer.sample(f"s{i}"):
                case.model.generate(**gen_kwargs(case, new_tokens))
    return tracer


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_chrome_trace_of_text_and_vlm_calls_follows_the_format(family, tmp_path):
    tracer = traced(family, calls=3)
    path = tracer.save_chrome_trace(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    tracks = validate_trace(trace)
    gpu = [evs for (pid, tid), evs in tracks.items() if tid != 0]
    host = tracks[(0, 0)]
    assert len(gpu) == 1 and host
    calls = [e for e in gpu[0] if e["name"] == "generate"]
    assert len(calls) == 3
    for ev, rec in zip(sorted(calls, key=lambda e: e["ts"]), tracer.records):
        assert ev["dur"] == pytest.approx(rec.total_ms * 1e3, abs=1e-3)  # µs
        assert ev["args"]["output_tokens"] == 4 and ev["args"]["sample_id"] == rec.sample_id
        assert ev["args"]["prefill_ms"] == rec.prefill_ms
        assert ev["args"]["image_tokens"] == rec.image_tokens and bool(rec.image_tokens) == (family == "llava")
        assert "sweep_point" not in ev["args"]  # a call outside a sweep has none
    names = {e["name"] for e in gpu[0]}
    assert {"prefill", "decode", "step 0", "step 2"} <= names
    assert ("vision" in names) == (family == "llava")
    assert {e["name"] for e in host} >= {"generate (issued)", "prefill (issued)"}


def test_layer_spans_nest_inside_prefill_and_steps(tmp_path):
    tracer = traced("llava", calls=1, layer_detail="all")
    trace = json.loads(tracer.save_chrome_trace(tmp_path / "t.json").read_text())
    tracks = validate_trace(trace)
    layers = [e for (p, t), evs in tracks.items() if t != 0 for e in evs if e["cat"] == "layer"]
    assert len(layers) == 2 * 4  # 2 layers x (prefill + 3 steps)


def test_gzip_traces_are_written_and_read(tmp_path):
    tracer = traced("llama", calls=1)
    path = tracer.save_chrome_trace(tmp_path / "trace.json.gz")
    with gzip.open(path, "rt") as fh:
        validate_trace(json.load(fh))
    assert read_chrome_trace(path)["otherData"]["calls"] == 1


def test_a_stage_level_trace_of_a_16_token_call_stays_in_kilobytes(tmp_path):
    tracer = traced("llava", calls=1, new_tokens=16)
    size = tracer.save_chrome_trace(tmp_path / "trace.json").stat().st_size
    assert size < 16 * 1024, size  # a 16-token call: about 6 KiB


def _two_rank_traces(tmp_path, second_family: str):
    """A trace of rank 0 (two Llama calls) and one of rank 1 (one call of ``second_family``)."""
    a, b = traced("llama", calls=2), traced(second_family, calls=1)
    for r in b.records:
        r.rank = 1
    return a.save_chrome_trace(tmp_path / "trace.rank0.json"), b.save_chrome_trace(tmp_path / "trace.rank1.json")


def test_two_ranks_merge_side_by_side_on_one_clock(tmp_path):
    pa, pb = _two_rank_traces(tmp_path, "llava")
    merged = read_chrome_trace(merge_chrome_traces([pa, pb], tmp_path / "merged.json"))
    tracks = validate_trace(merged)
    assert {pid for pid, _ in tracks} == {0, 1}
    names = {e["args"]["name"] for e in merged["traceEvents"] if e["name"] == "process_name"}
    assert names == {"stagetrace rank 0", "stagetrace rank 1"}
    # rank 1 ran after rank 0: its first call starts after rank 0's first call on the merged clock
    first = {pid: min(e["ts"] for (p, t), evs in tracks.items() if p == pid for e in evs) for pid in (0, 1)}
    assert first[1] > first[0]


def test_records_round_trip_through_jsonl(tmp_path):
    tracer = traced("llava", calls=2)
    path = tracer.save_jsonl(tmp_path / "r.jsonl")
    back = load_records(path)
    assert back == tracer.records  # dataclass equality, in-memory fields excluded
    line = json.loads(path.read_text().splitlines()[0])
    for key in ("vision_ms", "prefill_ms", "decode_ms", "other_ms", "total_ms", "ttft_ms", "decode_step_ms",
                "output_tokens", "prompt_tokens", "batch_size", "model_class", "model_name", "device", "backend",
                "versions", "sample_id"):
        assert key in line
    assert set(line["versions"]) == {"stagetrace", "torch", "transformers"}


def test_records_with_spans_rebuild_the_same_trace(tmp_path):
    tracer = traced("llava", calls=2)
    path = tracer.save_jsonl(tmp_path / "r.jsonl", spans=True)
    assert chrome_trace(load_records(path)) == chrome_trace(tracer.records)


def test_streaming_appends_and_flushes_each_record(tmp_path):
    path = tmp_path / "stream.jsonl"
    case = tiny.build("llama")
    with stagetrace.trace(case.model, jsonl=path) as tracer:
        case.model.generate(**gen_kwargs(case, 2))
        assert len(path.read_text().splitlines()) == 1  # on disk before the block ends
        case.model.generate(**gen_kwargs(case, 2))
    assert [r.call_index for r in load_records(path)] == [0, 1] and len(tracer.records) == 2


def test_a_crash_mid_stream_leaves_every_finished_record_readable(tmp_path):
    path = tmp_path / "crash.jsonl"
    child = textwrap.dedent(f"""
        import stagetrace
        from stagetrace.testing import tiny
        case = tiny.build("llama")
        kw = dict(case.inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        with stagetrace.trace(case.model, jsonl={str(path)!r}):
            while True:
                case.model.generate(**kw)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if path.exists() and len(path.read_bytes().splitlines()) >= 5:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the child wrote no records")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(path, "a") as fh:  # what a kill in the middle of a write leaves behind
        fh.write('{"total_ms": 1.0, "vision_m')
    with pytest.warns(RecordLoadWarning, match="unreadable record"):
        recs = load_records(path)
    assert len(recs) >= 5 and all(r.error is None and r.total_ms > 0 for r in recs)
    assert [r.call_index for r in recs] == list(range(len(recs)))
    # a new writer on the same file starts on a fresh line, so the next record stays readable
    with JsonlWriter(path) as w:
        w.write(recs[0])
    with pytest.warns(RecordLoadWarning):
        assert len(load_records(path)) == len(recs) + 1


def _rec(total, vision, prefill, decode, steps):
    return StageRecord(total_ms=total, vision_ms=vision, prefill_ms=prefill, decode_ms=decode,
                       other_ms=total - (vision or 0) - prefill - decode, ttft_ms=total - decode,
                       decode_step_ms=steps, batch_size=1, prompt_tokens=4, output_tokens=len(steps) + 1)


def test_summary_statistics_match_numpy():
    rng = np.random.default_rng(1)
    recs = []
    for i in range(50):
        steps = list(rng.uniform(1, 3, size=int(rng.integers(1, 6))))
        recs.append(_rec(100 + 10 * rng.random(), None if i % 5 == 0 else rng.uniform(5, 9),
                         rng.uniform(10, 20), sum(steps), steps))
    recs.append(StageRecord.failed("dropped marks", batch_size=1, prompt_tokens=1, output_tokens=1))
    s = summarize(recs)
    timed = recs[:-1]
    for stage in ("total_ms", "vision_ms", "prefill_ms", "decode_ms", "other_ms", "ttft_ms", "tpot_ms"):
        v = np.array([getattr(r, stage) for r in timed if getattr(r, stage) is not None])
        assert s[stage]["count"] == len(v)
        assert s[stage]["mean"] == pytest.approx(v.mean())
        for q in (50, 90, 99):
            assert s[stage][f"p{q}"] == pytest.approx(np.percentile(v, q))
        assert s[stage]["min"] == v.min() and s[stage]["max"] == v.max()
    assert s["vision_ms"]["count"] == 40
    text = format_summary(s)
    assert text.splitlines()[0].split() == ["stage", "(ms)", "count", "mean", "p50", "p90", "p99", "min", "max"]
    assert len({len(line) for line in text.splitlines()}) == 1  # aligned


def test_a_stage_absent_everywhere_has_count_zero_and_a_dash(tmp_path):
    s = summarize([_rec(10, None, 4, 3, [3.0])])
    assert s["vision_ms"]["count"] == 0 and math.isnan(s["vision_ms"]["mean"])
    assert " - " in format_summary(s).splitlines()[3]
    write_csv(s, tmp_path / "s.csv")
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "stage,count,mean,p50,p90,p99,min,max" and len(rows) == 8


def test_the_validator_rejects_what_the_format_forbids():
    base = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "p"}},
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1, "args": {"name": "t"}}]

    def trace(*events):
        return {"traceEvents": base + list(events), "displayTimeUnit": "ms"}

    x = lambda n, ts, dur: {"name": n, "ph": "X", "ts": ts, "dur": dur, "pid": 0, "tid": 1}  # noqa: E731
    validate_trace(trace(x("a", 0, 10), x("b", 2, 3), x("c", 10, 5)))  # nested, then disjoint
    for bad in (trace(x("a", 0, 10), x("b", 5, 10)),            # partial overlap
                trace(x("a", 0, -1)),                           # negative duration
                trace({"name": "a", "ph": "X", "ts": 0, "pid": 0, "tid": 1}),  # no dur
                trace(dict(x("a", 0, 1), tid=7)),               # unnamed track
                {"traceEvents": [], "displayTimeUnit": "s"}):   # bad unit
        with pytest.raises(AssertionError):
            validate_trace(bad)


def test_merging_a_merged_trace_again_changes_nothing(tmp_path):
    pa, pb = _two_rank_traces(tmp_path, "llama")
    once = read_chrome_trace(merge_chrome_traces([pa, pb], tmp_path / "m1.json"))
    twice = read_chrome_trace(merge_chrome_traces([tmp_path / "m1.json"], tmp_path / "m2.json"))
    assert twice == once and once["otherData"]["calls"] == 3 and once["otherData"]["ranks"] == [0, 1]
    # a merged trace with a rank it lacks: ranks kept, nothing counted twice
    c = traced("llama", calls=1)
    for r in c.records:
        r.rank = 2
    more = read_chrome_trace(merge_chrome_traces([tmp_path / "m1.json", c.save_chrome_trace(tmp_path / "t2.json")],
                                                 tmp_path / "m3.json"))
    assert more["otherData"]["ranks"] == [0, 1, 2] and more["otherData"]["calls"] == 4
    assert len([e for e in more["traceEvents"] if e["name"] == "generate"]) == 4
    validate_trace(more)


def test_merge_refuses_to_write_over_an_input_and_leaves_it_whole(tmp_path):
    p = traced("llama", calls=1).save_chrome_trace(tmp_path / "trace.json")
    before = p.read_bytes()
    with pytest.raises(ValueError, match="is also an input"):
        merge_chrome_traces([p], p)
    (tmp_path / "link.json").symlink_to(p)
    with pytest.raises(ValueError, match="is also an input"):
        merge_chrome_traces([tmp_path / "link.json"], p)
    assert p.read_bytes() == before


def test_inputs_of_one_rank_each_are_numbered_and_named_by_input(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa = traced("llama", calls=1).save_chrome_trace(tmp_path / "a" / "trace.json")
    pb = traced("llama", calls=1).save_chrome_trace(tmp_path / "b" / "trace.json")
    merged = read_chrome_trace(merge_chrome_traces([pa, pb], tmp_path / "m.json"))
    names = {e["pid"]: e["args"]["name"] for e in merged["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "stagetrace rank 0 (a/trace.json)", 1: "stagetrace rank 0 (b/trace.json)"}
    validate_trace(merged)


@pytest.mark.parametrize("content, name, expect", [
    (b'{"traceEvents": [{"name": "x", "ph": "X"', "t.json", "truncated or not JSON"),
    (b"plain text", "t.json.gz", "not gzip (though named .gz)"),
    (gzip.compress(b'{"traceEvents": []}')[:-6], "t.json.gz", "truncated or corrupt gzip"),
    (b'{"events": []}', "t.json", "without a traceEvents list"),
    (b"[1, 2]", "t.json", "without a traceEvents list"),
    (b'{"traceEvents": [5]}', "t.json", "event 0 is not an event"),
    (b'{"traceEvents": [{"name": "x", "ph": "X", "pid": 0, "ts": "soon"}]}', "t.json", "event 0"),
    (b"\xff\xfe\x00", "t.json", "not UTF-8 JSON"),
    (b"[" * 100_000, "t.json", "nested too deeply"),
])
def test_a_file_that_is_not_a_trace_is_one_line_error(tmp_path, content, name, expect):
    from stagetrace.export.chrome import TraceFileError

    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(TraceFileError) as info:
        read_chrome_trace(p)
    msg = str(info.value)
    assert expect in msg and "\n" not in msg and msg.startswith(str(p))
    with pytest.raises(TraceFileError):
        merge_chrome_traces([p], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_trace_names_ending_in_gz_in_any_case_are_gzip_and_links_are_replaced_not_followed(tmp_path):
    tracer = traced("llama", calls=1)
    p = tracer.save_chrome_trace(tmp_path / "TRACE.JSON.GZ")
    assert p.read_bytes()[:2] == b"\x1f\x8b" and read_chrome_trace(p)["otherData"]["calls"] == 1
    plain = tracer.save_chrome_trace(tmp_path / "plain.json")
    (tmp_path / "named.json.gz").write_bytes(plain.read_bytes())  # plain JSON under a .gz name still reads
    assert read_chrome_trace(tmp_path / "named.json.gz") == read_chrome_trace(plain)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "link.json").symlink_to(victim)
    tracer.save_chrome_trace(tmp_path / "link.json")
    assert victim.read_text() == "precious" and not (tmp_path / "link.json").is_symlink()
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []  # no temporary file left
