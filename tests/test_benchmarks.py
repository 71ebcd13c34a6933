"""Each benchmark script runs end to end in a tiny CPU configuration, so none of them rots."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPTS = {
    "mark_cost": ["--cpu", "--n", "2000", "--reps", "2"],
    "accuracy": ["--cpu", "--reps", "2", "--steps", "2", "--vision-us", "2000", "--prefill-us", "3000",
                 "--step-us", "1000"],
    "overhead": ["--cpu-tiny", "--reps", "2", "--warmup", "1", "--new-tokens", "3", "--profiler-reps", "1",
                 "--configs", "llava_b1,llama_b2", "--settle", "1"],
    "subtraction": ["--cpu-tiny", "--samples", "3"],
    "in_context": ["--cpu-tiny", "--reps", "2", "--new-tokens", "2", "--pin-cpu", "3"],
    "direct_cost": ["--cpu-tiny", "--reps", "2", "--sync-reps", "2", "--new-tokens", "3", "--pin-cpu", "3"],
    "stamp_fusion": ["--cpu-tiny"],
    "lead": ["--cpu-tiny", "--reps", "1", "--warmup", "1", "--new-tokens", "4"],
    "compiled": ["--cpu-tiny", "--reps", "2", "--warmup", "1", "--new-tokens", "3", "--stamps", "100",
                 "--configs", "llama_b1", "--step-clock", "--settle", "1", "--touch-untraced"],
    "compiled_switch": ["--cpu-tiny", "--reps", "3", "--warmup", "1", "--new-tokens", "14", "--every", "4",
                        "--warm-guards"],
    "guard_checks": ["--cpu-tiny", "--reps", "3"],
    "fit_validation": ["--cpu-tiny", "--samples", "30", "--ab-samples", "6", "--warmup", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_runs_on_the_cpu(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *SCRIPTS[script],
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    payload = json.loads(result.read_text())
    assert payload["device"] == "cpu"  # also on a GPU machine: the CPU configuration was asked for
    assert payload["env"]["card"] and payload["env"]["torch"] and payload["env"]["transformers"]
    assert payload["results"]
    if script == "accuracy":
        assert payload["results"]["stagetrace"]["max_partition_error_ms"] < 1e-9
    if script == "overhead":
        assert {r["config"] for r in payload["results"]} == {"llava_b1", "llama_b2"}
        assert "plain_again" in payload["results"][0]["methods"]
    if script == "compiled":
        (r,) = payload["results"]
        assert all(r["same_tokens"].values()) and r["stamps_per_step"] == 3
        for m in ("stagetrace_layers", "stagetrace_layers_every8", "stagetrace_layers_every8_cold",
                  "stagetrace_layers_every32", "stagetrace_layers_matmul"):
            assert r["methods"][m]["compiled_decode"] and not r["methods"][m]["errors"], m
            assert r["methods"][m]["layer_stack_median_us"] > 0, m  # read off the stamps of every step
        d = r["methods"]["stagetrace"]["direct"]  # every native mark of a stage-level call, timed
        # (it stops at its maximum length: its last stop check takes no mark)
        assert sum(d["by_kind_per_call"].values()) == r["methods"]["stagetrace"]["n_marks"]
        assert d["us_per_call_waited_for"] <= d["us_per_call"]
        # the tracer's Python outside its marks: each per-step hook, once per forward (the prefill's too),
        # but the input preparation's wrapper: on the prefill only, its steps run without it
        sp = r["methods"]["stagetrace"]["step_python"]
        assert set(sp["us_per_call"]) == {"prepare_inputs_for_generation", "_update_model_kwargs_for_generation",
                                          "stop_check_hook"}
        forwards = d["by_kind_per_call"]["DECODE_FORWARD"] + 1
        assert sp["invocations_last_call"]["prepare_inputs_for_generation"] == 1
        assert sp["invocations_last_call"]["_update_model_kwargs_for_generation"] == forwards
        assert sp["invocations_last_call"]["prepare_inputs_for_generation (timers alone)"] == forwards
        assert sp["us_per_call_raw"]["prepare_inputs_for_generation"] > 0
        st = r["methods"]["stagetrace"]
        assert st["accounted_with_python_pct"] == pytest.approx(st["accounted_pct"] + st["step_python_pct"])
        # the prefill's return, then the lead's on every COMPILED_LEAD_EVERY-th step (the default)
        from stagetrace.tracing.tracer import COMPILED_LEAD_EVERY

        steps = d["by_kind_per_call"]["DECODE_FORWARD"]
        assert steps > 0 and d["by_kind_per_call"]["FORWARD_RETURN"] == 1 + -(-steps // COMPILED_LEAD_EVERY)
        # the step marks at the input preparation (the probe): as many marks, none left over
        assert r["methods"]["stagetrace_prepare_mark"]["n_marks"] == r["methods"]["stagetrace"]["n_marks"]
        for m in ("stagetrace_lead_every1", "host_clock", "stagetrace_no_lead", "stagetrace_prepare_mark"):
            assert r["methods"][m]["compiled_decode"] and not r["methods"][m]["errors"], m
        assert (r["methods"]["stagetrace_lead_every1"]["n_marks"] - r["methods"]["stagetrace"]["n_marks"]
                == steps - -(-steps // COMPILED_LEAD_EVERY))
        for m, row in r["methods"].items():  # --step-clock: the paired host-clock split of every method
            assert {"host_head_paired_us", "host_setup_paired_us", "host_prefill_paired_us", "host_step_paired_us",
                    "host_tail_paired_us"} <= set(row), m
            assert len(row["host_samples_ms"]["setup_ms"]) == 2  # one per repetition
            assert sum(d["n"] for d in row["host_head_us_by_previous"].values()) == 2
            assert "gc.collect" in row["host_head_us_by_previous"] or m != "plain"  # repetition 0 starts with plain
    if script == "compiled_switch":
        r = payload["results"]
        assert r["compiled_decode"] and not r["errors"]
        # 13 decode steps, the last without a next entry: periods start at 0, 4, 8 (12 has no end)
        assert [r["within_call_host_us"][p]["n"] for p in ("stamped", "first_bare", "later_bare")] == [9, 9, 9]
        assert all(len(s["step_us"]) == 12 for ss in r["samples"].values() for s in ss)
        assert len(r["graphs_clocked"]) == 2  # the bare graph and the stamped one
        # --warm-guards: every switch after a call's first step was warmed, and each found its entry
        w = r["warm_guards"]
        assert w["warmed"] == w["passed"] > 0 and not w["off"]
        assert "layers_every4_warm" in r["host_split_median_us"]
        for name, kinds in r["host_split_median_us"].items():  # dynamo's part, and of it the lookup, per step
            for kind, d in kinds.items():
                assert 0 < d["lookup"] <= d["guards"] <= d["compiled"], (name, kind)
    if script == "guard_checks":
        r = payload["results"]
        # the bare and the stamped entry; each check passes or fails as the layers' forwards say
        assert r["entries"] == 2 and r["unexpected_results"] == []
        three_each = {"stamped, stamps staying (every step)", "bare, staying (a bare step after a bare one)"}
        assert {k for k in r["check_us"] if "caches evicted" in k} == {  # --evict-mb's default: the cold checks too
            "stamped, staying, caches evicted before", "bare, staying, caches evicted before"}
        assert all(v["n"] == 3 * (3 if k in three_each else 1) and v["median"] > 0 for k, v in r["check_us"].items())
    if script == "in_context":
        assert {"plain", "noop", "event_mark", "plain_again"} <= set(payload["results"])
        assert payload["marks_per_call"] == 2 * 2 * 2  # 2 layers, prefill + 1 step, begin + end
    if script == "direct_cost":
        res = payload["results"]
        stage, layers = res["direct_stage"], res["direct_layers"]
        assert not stage["errors"] and not layers["errors"]
        # tiny LLaVA, 3 new tokens: 3 forwards; 2 layers with a begin and an end mark each
        assert layers["marks_per_call"] - stage["marks_per_call"] == 3 * 2 * 2
        assert layers["by_kind"]["LAYER_BEGIN"]["n"] == layers["by_kind"]["LAYER_END"]["n"] == 2 * 3 * 2  # calls × forwards × layers
        assert stage["by_kind"]["DECODE_FORWARD"]["n"] == 2 * 2 and stage["direct_cost_per_call_us"] > 0
        sync = res["after_sync"]
        assert {v: d["n"] for v, d in sync["decode_forward_host_us"].items()} == dict.fromkeys(
            ["plain", "stage", "probe_marks", "probe_launch", "probe_mark_launch", "layers", "layers_host_clock"], 4)
        assert {"layers_minus_stage_us", "layers_minus_layers_host_clock_us"} <= set(sync)
        within = res["within_call"]
        assert within["events"]["pairs"] > 0 and within["host_clock"]["pairs"] > 0
        assert {k: v["n"] for k, v in sync["probe"].items()} == dict.fromkeys(
            ["first_mark", "second_mark", "launch_alone", "mark_before_launch", "launch_after_mark"], 4)
        for part in ("after_call_stage", "after_call_layers"):  # reps 2: 2 read after each call, 2 batched
            after = res[part]
            assert after["calls"] == 4 and after["build_after_each_call_us"]["n"] == after["build_batched_us"]["n"] == 2
            assert all(after[k]["median_us"] > 0 for k in ("resolve_us", "from_timeline_us", "hold_features_us",
                                                            "stage_math_us", "leads_us", "meta_us")), part
    if script == "stamp_fusion":
        res = payload["results"]
        assert all(r["same_output"] for r in res.values())
        assert res["boundary"]["kernels_over_plain"] > 0  # a copy at each boundary splits a fused kernel
        assert res["after_last_mm"]["kernels_over_plain"] == 0 and payload["last_mm"] == ["Linear"]
        # the tracer's pass moves the shared stamps between layers (2 layers: layer 1's begin and
        # its end) and wins back their fusions; layer 0's begin stays at the embeddings' output
        assert res["matmul"]["stamps_after_matmul"] == 2 and res["shared"]["stamps_after_matmul"] == 0
        assert res["matmul"]["kernels"] < res["shared"]["kernels"]
    if script == "lead":
        assert payload["all_pass"] and {r["case"] for r in payload["results"]} == {
            "b1_eager", "b32_eager", "b1_spin", "b1_long_spin", "b1_compiled"}
    if script == "fit_validation":
        _check_fit_validation(payload, tmp_path)
    if script == "subtraction":
        assert payload["results"]["stagetrace"]["inconsistency_worst_ms"] <= 0


def _check_fit_validation(payload, tmp_path):
    import math

    from stagetrace import LatencyModel, load_records
    from stagetrace.fit import fit

    counts = payload["counts"]
    assert (counts["samples"], counts["train"], counts["test"]) == (30, 24, 6)
    assert set(counts["tiles"]) == {"3", "4", "5"}  # the tile count (so the image tokens) varies
    assert payload["checks"]["bad"] == {} and payload["checks"]["max_partition_error_ms"] < 1e-9
    held = payload["results"]["held_out"]
    stages = {"vision_ms", "prefill_ms", "decode_ms", "decode_step_ms", "tpot_ms", "ttft_ms", "other_ms", "total_ms"}
    assert set(held) == stages
    assert all(math.isfinite(e["mape_pct"]) and e["rows"] > 0 for e in held.values())
    assert held["total_ms"]["rows"] == 6 and held["decode_step_ms"]["rows"] > 6
    assert set(payload["results"]["targets"]) == {"vision_ms", "prefill_ms", "total_ms"}
    assert all(isinstance(t["met"], bool) for t in payload["results"]["targets"].values())
    floor = payload["results"]["noise_floor"]  # A1, A2, A3: each A/B sample three times
    assert {"vision_ms", "prefill_ms", "total_ms"} <= set(floor) and floor["total_ms"]["calls"] == 6
    assert all(f["best_constant_mape_pct"] <= f["mape_pct"] for f in floor.values())
    assert all(isinstance(v, bool) for t in payload["results"]["targets"].values()
               for v in t["within_noise_floor"].values())
    assert payload["results"]["fits"]["vision_ms"]["features"] == ["image_tokens"]
    trip = payload["round_trip"]
    assert trip["same_dict"] and trip["max_prediction_diff_ms"] == 0 and trip["predict_matches_records"]
    # the fit can be redone from the saved records: the same model
    folder = tmp_path / payload["files"]["folder"]
    records = load_records(folder / payload["files"]["records_fit"])
    assert [r.sample_id for r in records] == [s["id"] for s in payload["samples"]]
    train = {s["id"] for s in payload["samples"] if s["split"] == "train"}
    redone = fit([r for r in records if r.sample_id in train], seed=payload["params"]["seed"])
    assert redone.to_dict() == LatencyModel.load(folder / "model.json").to_dict()
    ab = payload["ab"]
    assert ab["effective"]["B"] == {"model": "eager", "vision": "eager", "text": "eager"}
    assert ab["effective"]["A3"] == {"model": "sdpa", "vision": "sdpa", "text": "sdpa"}
    assert all(not c["bad"] and c["records"] == 6 for c in ab["checks"].values())
    for key in ("ab", "aa"):
        c = ab["comparisons"][key]
        assert c["paired"] and {r["stage"] for r in c["rows"]} >= {"vision", "prefill", "decode", "total"}
        assert (folder / f"{key}.md").read_text().count("|") > 20
    assert ab["aa_verdicts_p50"]["total"] in ("no change", "slower", "faster")  # said, not asserted: CPU noise
    assert len(load_records(folder / "ab-A.jsonl")) == 12 and len(load_records(folder / "ab-B.jsonl")) == 6


@pytest.mark.slow
def test_fit_validation_with_repeats_scores_each_call_and_each_samples_typical_call(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_validation.py"), "--cpu-tiny", "--samples",
                           "20", "--repeats", "3", "--ab-samples", "0", "--warmup", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    payload = json.loads(result.read_text())
    assert payload["counts"]["repeats"] == 3 and payload["checks"]["records"] == 60 and payload["checks"]["bad"] == {}
    assert payload["counts"]["test"] == 3 * 4  # 4 held-out samples, 3 calls each
    typical = payload["results"]["held_out_typical_call"]
    assert typical["total_ms"]["rows"] == 4 and typical["prefill_ms"]["rows"] == 4  # one row per held-out sample
    for t in payload["results"]["targets"].values():
        assert isinstance(t["met"], bool) and isinstance(t["typical_call_met"], bool)
    assert "typical call" in proc.stdout


def test_compiled_pairs_pairs_two_traced_methods_repetition_by_repetition(tmp_path):
    """Two methods of one compiled.py run, paired with each other: the whole call in % of plain's
    median and each host-clock part; a pair the run does not hold is one line on stderr and exit 2."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compiled_pairs

    parts = {"setup_ms": [1.0, 1.1, 1.2, 1.3], "prefill_ms": [20.0] * 4, "step_ms": [3.0] * 4, "tail_ms": [0.2] * 4}
    later = {k: [v + (0.001 if k == "step_ms" else 0.0) for v in vs] for k, vs in parts.items()}
    run = {"results": [{"config": "llama_b1", "methods": {
        "plain": {"median_ms": 100.0, "walls_ms": [100.0] * 4},
        "a": {"walls_ms": [101.0, 102.0, 101.5, 101.0], "host_samples_ms": later},
        "b": {"walls_ms": [100.5, 101.5, 101.0, 100.5], "host_samples_ms": parts}}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    row, = compiled_pairs.main([str(path), "a", "b"])
    assert row["whole_call_pct"] == pytest.approx(0.5) and row["reps"] == 4
    assert row["step_us"] == pytest.approx(1.0) and row["setup_us"] == pytest.approx(0.0)
    lo, hi = row["whole_call_ci95_pct"]
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compiled_pairs.py"), str(path), "a", "c"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "has no config with both a and c" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
