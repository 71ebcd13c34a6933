"""stagetrace.compare and `stagetrace compare`: synthetic runs with known differences."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from stagetrace.cli import main
from stagetrace.compare import STAGES, compare
from stagetrace.export.comparison import (CSV_COLUMNS, comparison_csv, comparison_json, comparison_markdown,
                                          format_comparison)
from stagetrace.records import StageRecord, write_jsonl
from stagetrace.testing.synthetic import latency_records, scaled

REPS = 500  # enough for stable intervals here, and fast


@pytest.fixture(scope="module")
def run_a() -> list[StageRecord]:
    return latency_records(200, seed=0)


def rows_of(c, stat="p50") -> dict[str, object]:
    return {r.stage: r for r in c.rows if r.stat == stat}


@pytest.fixture(scope="module")
def similar_calls() -> list[StageRecord]:
    """Calls alike (one prompt length, batch and length of output): unpaired comparisons see 20%."""
    return latency_records(200, seed=5, batch_sizes=(1,), prompt_tokens=(480, 520), output_tokens=(16, 17))


@pytest.mark.parametrize("ids", [True, False])
def test_b_twenty_percent_slower_is_slower_with_its_delta_inside_the_interval(run_a, similar_calls, ids):
    a = run_a if ids else similar_calls
    c = compare(a, scaled(a, 1.2, noise=0.01, ids=ids), reps=REPS)
    assert c.paired is ids
    assert {r.stage for r in c.rows} == set(STAGES) and len(c.rows) == 3 * len(STAGES)
    for r in c.rows:
        assert r.verdict == "slower", r
        assert r.low_pct <= r.delta_pct <= r.high_pct and r.low_pct > 0
    for r in rows_of(c).values():
        assert abs(r.delta_pct - 20) < (1.5 if ids else 3), r


def test_b_faster_is_faster(run_a):
    c = compare(run_a, scaled(run_a, 0.8, noise=0.01), reps=REPS)
    assert {r.verdict for r in c.rows} == {"faster"}
    assert all(r.high_pct < 0 for r in c.rows)


@pytest.mark.parametrize("ids", [True, False])
def test_a_against_a_copy_of_itself_is_no_change(run_a, ids):
    c = compare(run_a, scaled(run_a, 1.0, ids=ids), reps=REPS)
    assert {r.verdict for r in c.rows} == {"no change"}
    assert all(r.delta_pct == 0 and r.low_pct <= 0 <= r.high_pct for r in c.rows)


def test_pairing_narrows_the_interval_and_finds_a_small_change_unpaired_cannot(run_a):
    b = scaled(run_a, 1.03, noise=0.005)
    paired = rows_of(compare(run_a, b, reps=REPS, stages=["prefill"]))["prefill"]
    unpaired = rows_of(compare(run_a, b, reps=REPS, stages=["prefill"], paired=False))["prefill"]
    assert paired.verdict == "slower" and 2 < paired.low_pct and paired.high_pct < 4
    assert unpaired.verdict == "no change" and unpaired.low_pct < 0 < unpaired.high_pct
    assert (paired.high_pct - paired.low_pct) * 5 < unpaired.high_pct - unpaired.low_pct
    assert math.isnan(paired.noise_pct) and unpaired.noise_pct > 3  # split halves: the spread between samples


def test_paired_noise_floor_from_repeats_in_a_keeps_a_change_within_the_noise_a_no_change(run_a):
    a = scaled(run_a, 1.05) + scaled(run_a, 0.95)  # every sample measured twice, 10% apart: its median is run_a's
    c = compare(a, scaled(run_a, 1.004), reps=REPS, stages=["total"])
    r = rows_of(c)["total"]
    assert c.paired and "200 samples measured more than once" in c.noise
    assert r.low_pct > 0 and r.delta_pct == pytest.approx(0.4)  # a real change, surely: every sample is 0.4% slower
    assert r.noise_pct > 1 and r.verdict == "no change"          # but within what A measures against itself
    assert rows_of(compare(a, scaled(run_a, 1.2), reps=REPS, stages=["total"]))["total"].verdict == "slower"


def test_records_with_an_error_are_left_out_and_counted(run_a):
    failed = [StageRecord.failed("boom", batch_size=1, prompt_tokens=4, output_tokens=0, sample_id="s0")] * 3
    with_errors = compare(run_a + failed, run_a, reps=REPS, stages=["total"])
    assert (with_errors.errors_a, with_errors.errors_b, with_errors.records_a) == (3, 0, 203)
    assert str(with_errors.rows) == str(compare(run_a, run_a, reps=REPS, stages=["total"]).rows)


def test_seeded_the_same_and_a_stage_alone_gives_the_same_numbers(run_a):
    b = scaled(run_a, 1.1, noise=0.05)
    full = compare(run_a, b, reps=REPS, seed=3)
    assert str(full.rows) == str(compare(run_a, b, reps=REPS, seed=3).rows)
    assert str([r for r in full.rows if r.stage == "ttft"]) == str(compare(run_a, b, reps=REPS, seed=3,
                                                                           stages=["ttft"]).rows)
    other = compare(run_a, b, reps=REPS, seed=4)
    assert [r.low_pct for r in other.rows] != [r.low_pct for r in full.rows]


def test_stages_without_values_are_left_out_with_the_reason_and_a_zero_baseline_is_n_a():
    a = latency_records(30, seed=1, vision=False, output_tokens=(1, 2))  # text-only, one token: decode is 0
    b = latency_records(30, seed=2, vision=False, output_tokens=(3, 5), id_prefix="b")
    c = compare(a, b, reps=REPS)
    assert "vision" in c.skipped and "A 0, B 0" in c.skipped["vision"]
    assert "tpot" in c.skipped and "A 0, B 30" in c.skipped["tpot"]
    assert {r.verdict for r in c.rows if r.stage == "decode"} == {"n/a"}
    assert math.isnan(rows_of(c)["decode"].delta_pct)


def test_slower_than_takes_p50_beyond_the_threshold_with_the_interval_above_zero(run_a):
    c = compare(run_a, scaled(run_a, 1.2, noise=0.01), reps=REPS, stages=["prefill", "total"])
    assert {r.stage for r in c.slower_than(10)} == {"prefill", "total"}
    assert c.slower_than(25) == [] and [r.stage for r in c.slower_than(10, ["total"])] == ["total"]


def test_asked_to_pair_runs_without_shared_ids_is_a_value_error(run_a):
    with pytest.raises(ValueError, match="cannot pair"):
        compare(run_a, scaled(run_a, 1.0, ids=False), paired=True)
    with pytest.raises(ValueError, match="unknown stage"):
        compare(run_a, run_a, stages=["prefil"])


def test_every_format_says_the_same_rows(run_a):
    c = compare(run_a, scaled(run_a, 1.2, noise=0.01), reps=REPS, stages=["prefill", "vision"])
    table = format_comparison(c)
    assert "paired by sample id: 200 samples" in table and table.count("slower") == 6
    rows = list(csv.DictReader(io.StringIO(comparison_csv(c))))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 6 and {r["verdict"] for r in rows} == {"slower"}
    assert float(rows[0]["delta_pct"]) == pytest.approx(c.rows[0].delta_pct)
    data = json.loads(comparison_json(c))
    assert data["kind"] == "stagetrace-comparison" and data["paired"] is True and len(data["rows"]) == 6
    md = comparison_markdown(c).splitlines()
    assert sum(line.startswith("| prefill |") for line in md) == 3 and "**slower**" in md[-1]


# ---------------------------------------------------------------- the command
@pytest.fixture()
def runs(tmp_path, run_a) -> tuple[Path, Path]:
    (tmp_path / "A").mkdir()
    write_jsonl(run_a[:100], tmp_path / "A" / "records.rank0.jsonl")
    write_jsonl(run_a[100:], tmp_path / "A" / "records.rank1.jsonl")
    write_jsonl(run_a, tmp_path / "A" / "records.jsonl")  # their merge: not read twice
    write_jsonl(scaled(run_a, 1.2, noise=0.01), tmp_path / "B.jsonl")
    return tmp_path / "A", tmp_path / "B.jsonl"


def one_error_line(capsys, expect: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("stagetrace: error: ") and err.count("\n") == 1 and expect in err, err


def test_compare_command_writes_each_format_and_prints_the_table(runs, tmp_path, capsys):
    a, b = runs
    out = [tmp_path / "c.csv", tmp_path / "c.json", tmp_path / "c.md"]
    argv = ["compare", str(a), str(b), "--reps", "200", "--csv", str(out[0]), "--json", str(out[1]),
            "--markdown", str(out[2])]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "A: 200 records; B: 200 records; paired" in printed and "slower" in printed
    assert len(list(csv.DictReader(out[0].open()))) == 21
    assert json.loads(out[1].read_text())["records_a"] == 200
    assert out[2].read_text().count("| total |") == 3
    assert main(argv) == 0  # its own JSON is replaced; records named .json are not
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--json", "-", "--stage", "total", "--reps", "100"]) == 0
    assert [r["stage"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["total"] * 3


def test_fail_if_slower_exits_1_only_for_a_slower_p50_beyond_the_threshold(runs, capsys):
    a, b = runs
    base = ["compare", str(a), str(b), "--reps", "200", "--stage", "prefill"]
    assert main([*base, "--fail-if-slower", "5"]) == 1
    assert capsys.readouterr().err.startswith("stagetrace: slower: prefill p50 +20.")
    assert main([*base, "--fail-if-slower", "30"]) == 0
    assert main(["compare", str(b), str(a), "--reps", "200", "--fail-if-slower", "0"]) == 0  # B is faster


@pytest.mark.parametrize("case, extra, expect", [
    ("missing", ["MISSING"], "does not exist"),
    ("reps", ["--reps", "5"], "--reps must be between"),
    ("seed", ["--seed", "-1"], "--seed must be >= 0"),
    ("threshold", ["--fail-if-slower", "nan"], "--fail-if-slower must be"),
    ("two stdouts", ["--json", "-", "--markdown", "-"], "only one of"),
    ("csv stdout", ["--csv", "-"], "--csv - is not supported"),
    ("same output", ["--csv", "OUT", "--markdown", "OUT"], "name the same file"),
    ("output is input", ["--csv", "B"], "is also an input"),
    ("over records", ["--json", "RECORDS"], "named like records"),
    ("empty folder", ["EMPTY"], "holds no records.jsonl"),
    ("stage", ["--stage", "prefil"], "invalid choice"),
    ("too few", ["FEW"], "nothing to compare"),
])
def test_compare_bad_inputs_are_one_line_and_exit_2(runs, tmp_path, capsys, case, extra, expect):
    a, b = runs
    (tmp_path / "empty").mkdir()
    write_jsonl(latency_records(3), tmp_path / "few.jsonl")
    (tmp_path / "other.jsonl").write_bytes(b.read_bytes())
    names = {"B": str(b), "OUT": str(tmp_path / "o.csv"), "RECORDS": str(tmp_path / "other.jsonl"),
             "MISSING": str(tmp_path / "missing.jsonl"), "EMPTY": str(tmp_path / "empty"),
             "FEW": str(tmp_path / "few.jsonl")}
    extra = [names.get(x, x) for x in extra]
    inputs = [x for x in extra if x in (names["MISSING"], names["EMPTY"], names["FEW"])]
    argv = ["compare", *(inputs + [str(b)] if inputs else [str(a), str(b)]),
            *[x for x in extra if x not in inputs], "--reps", "100"]
    if case == "reps":
        argv = argv[:-2]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(argv) == 2
    one_error_line(capsys, expect)
    assert {p: p.read_bytes() for p in before} == before
