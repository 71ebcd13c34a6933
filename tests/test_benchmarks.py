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
                 "--configs", "llava_b1,llama_b2"],
    "subtraction": ["--cpu-tiny", "--samples", "3"],
    "in_context": ["--cpu-tiny", "--reps", "2", "--new-tokens", "2", "--pin-cpu", "3"],
    "lead": ["--cpu-tiny", "--reps", "1", "--warmup", "1", "--new-tokens", "4"],
    "compiled": ["--cpu-tiny", "--reps", "2", "--warmup", "1", "--new-tokens", "3", "--stamps", "100",
                 "--configs", "llama_b1"],
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
        assert all(r["same_tokens"].values()) and r["stamps_per_step"] == 4
        assert r["methods"]["stagetrace_layers"]["compiled_decode"] and not r["methods"]["stagetrace_layers"]["errors"]
    if script == "in_context":
        assert {"plain", "noop", "event_mark", "plain_again"} <= set(payload["results"])
        assert payload["marks_per_call"] == 2 * 2 * 2  # 2 layers, prefill + 1 step, begin + end
    if script == "lead":
        assert payload["all_pass"] and {r["case"] for r in payload["results"]} == {
            "b1_eager", "b32_eager", "b1_spin", "b1_long_spin", "b1_compiled"}
    if script == "subtraction":
        assert payload["results"]["stagetrace"]["inconsistency_worst_ms"] <= 0
