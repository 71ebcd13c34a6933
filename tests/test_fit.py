"""stagetrace.fit, stagetrace.LatencyModel, `stagetrace fit` and `stagetrace plot --fit`: records
drawn from a known latency model (stagetrace.testing.synthetic) must give that model back."""
from __future__ import annotations

import copy
import json

import pytest

import stagetrace
from stagetrace.cli import main
from stagetrace.fit import fit
from stagetrace.latency_model import MODEL_KIND, LatencyModel
from stagetrace.records import StageRecord, write_jsonl
from stagetrace.testing.synthetic import TRUE_MODEL, latency_records


@pytest.fixture(scope="module")
def records() -> list[StageRecord]:
    return latency_records(300, seed=0, noise=0.02)


@pytest.fixture(scope="module")
def model(records) -> LatencyModel:
    return fit(records)


def test_a_known_linear_and_quadratic_generator_is_recovered(model):
    for target in ("vision_ms", "prefill_ms", "decode_step_ms", "ttft_ms", "total_ms", "decode_ms"):
        q = model.quality[target]
        assert q.r2 > 0.99 and q.mape_pct < 3, (target, q)
    assert model.quality["other_ms"].mape_pct < 3  # a constant: R² says nothing there, the error does
    assert model.quality["decode_step_ms"].rows == sum(r.output_tokens - 1 for r in latency_records(300, seed=0))


def test_without_noise_the_coefficients_are_the_generators():
    m = fit(latency_records(60, seed=3, noise=0.0))
    prefill = m.fits["prefill_ms"]
    coef = dict(zip(prefill.features, prefill.coef_ms))
    assert prefill.intercept_ms == pytest.approx(2.0, abs=1e-6)
    assert coef["batch_prompt_tokens"] == pytest.approx(0.01, rel=1e-6)
    assert coef["batch_prompt_tokens_sq"] == pytest.approx(2e-6, rel=1e-6)
    assert abs(coef["prompt_tokens"]) < 1e-9 and abs(coef["prompt_tokens_sq"]) < 1e-12
    step = dict(zip(m.fits["decode_step_ms"].features, m.fits["decode_step_ms"].coef_ms))
    assert step["batch_context_tokens"] == pytest.approx(0.0005, rel=1e-6) and step["batch_size"] == pytest.approx(0.1)
    assert m.quality["total_ms"].r2 == pytest.approx(1.0, abs=1e-9)


def test_features_constant_or_redundant_in_the_data_are_dropped_and_named():
    m = fit(latency_records(40, seed=1, batch_sizes=(1,)))
    assert m.fits["prefill_ms"].features == ("prompt_tokens", "prompt_tokens_sq")
    assert m.fits["prefill_ms"].dropped == ("batch_size", "batch_prompt_tokens", "batch_prompt_tokens_sq")


def test_predict_gives_every_stage_near_the_truth_with_an_interval(model):
    p, b, t = 800, 2, 11
    pred = model.predict(prompt_tokens=p, output_tokens=t, batch_size=b)
    assert list(pred) == ["total_ms", "vision_ms", "prefill_ms", "decode_ms", "other_ms", "ttft_ms", "tpot_ms"]
    steps = sum(TRUE_MODEL["step_ms"](p + 1 + i, b) for i in range(t - 1))
    truth = {"vision_ms": TRUE_MODEL["vision_ms"](p, b), "prefill_ms": TRUE_MODEL["prefill_ms"](p, b),
             "decode_ms": steps, "tpot_ms": steps / (t - 1)}
    truth["total_ms"] = truth["vision_ms"] + truth["prefill_ms"] + steps + 0.5
    for k, v in truth.items():
        assert pred[k]["ms"] == pytest.approx(v, rel=0.03), k
    for v in pred.values():
        assert 0 <= v["low_ms"] < v["ms"] < v["high_ms"]
    assert model.predict(prompt_tokens=5, output_tokens=1)["tpot_ms"] is None  # one token: no decode step


def test_intervals_hold_fresh_records_at_about_the_nominal_rate(model):
    scores = model.evaluate(latency_records(500, seed=11, noise=0.02))
    for target in ("vision_ms", "prefill_ms", "total_ms", "ttft_ms", "decode_ms"):
        assert 0.89 <= scores[target]["inside_interval"] <= 0.995, (target, scores[target])
        assert scores[target]["mape_pct"] < 3


def test_save_and_load_give_the_same_model(model, tmp_path):
    path = model.save(tmp_path / "model.json")
    data = json.loads(path.read_text())
    assert data["kind"] == MODEL_KIND and data["version"] == 1
    back = stagetrace.LatencyModel.load(path)
    assert back.to_dict() == model.to_dict()
    assert back.predict(prompt_tokens=300, output_tokens=5) == model.predict(prompt_tokens=300, output_tokens=5)


@pytest.mark.parametrize("content, expect", [
    ("{not json", "not JSON"),
    ('{"kind": "stagetrace-comparison"}', "not a stagetrace latency model"),
    (f'{{"kind": "{MODEL_KIND}", "version": 9}}', "version 9"),
    (f'{{"kind": "{MODEL_KIND}", "version": 1, "fits": []}}', "malformed"),
    (f'{{"kind": "{MODEL_KIND}", "version": 1, "fits": {{"total_ms": {{"features": ["x"], "intercept_ms": 1, '
     '"coef_ms": []}}, "quality": {}}', "total_ms is malformed"),
])
def test_loading_what_is_not_a_model_is_a_one_line_value_error(tmp_path, content, expect):
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(ValueError, match=expect) as info:
        LatencyModel.load(tmp_path / "m.json")
    assert "\n" not in str(info.value)


def test_text_only_records_have_no_vision_and_errors_are_left_out_and_counted():
    recs = latency_records(30, seed=2, vision=False)
    failed = [StageRecord.failed("boom", batch_size=1, prompt_tokens=4, output_tokens=0)] * 4
    m = fit(recs + failed)
    assert m.trained["errors_left_out"] == 4 and m.trained["records"] == 34
    assert "vision_ms" in m.trained["skipped"] and m.predict(prompt_tokens=10, output_tokens=3)["vision_ms"] is None


def test_bad_arguments_are_value_errors(records):
    with pytest.raises(ValueError, match="at least 10 timed records"):
        fit(records[:9])
    with pytest.raises(ValueError, match="no model for 'prefil'"):
        fit(records, features={"prefil": ("prompt_tokens",)})
    with pytest.raises(ValueError, match="image_tokens"):
        fit(records, features={"vision_ms": ("image_tokens",)})
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        fit(records).predict(prompt_tokens=5, output_tokens=2, batch_size=0)


def test_a_record_field_becomes_a_feature_once_records_carry_it():
    recs = latency_records(40, seed=4)
    for r in recs:  # what item 2 of issue 15 will add: image tokens per record
        r.image_tokens = 576 * r.batch_size
        r.vision_ms = 3.0 + 0.01 * r.image_tokens
    m = fit(recs, features={"vision_ms": ("image_tokens",)})
    assert dict(zip(m.fits["vision_ms"].features, m.fits["vision_ms"].coef_ms))["image_tokens"] == pytest.approx(0.01)
    assert m.predict(prompt_tokens=10, output_tokens=2, image_tokens=1152)["vision_ms"]["ms"] == pytest.approx(14.52)
    with pytest.raises(ValueError, match="image_tokens"):
        m.predict(prompt_tokens=10, output_tokens=2)


def test_the_worst_held_out_records_are_named(records):
    odd = copy.copy(records[7])
    odd.sample_id, odd.total_ms = "odd-one", records[7].total_ms * 3
    m = fit(records + [odd])
    assert m.worst["total_ms"][0]["sample_id"] == "odd-one" and m.worst["total_ms"][0]["error_pct"] < -50


def test_records_of_one_sample_are_held_out_together():
    from stagetrace.fit import _folds_by_sample

    recs = latency_records(30, seed=6) * 2 + latency_records(10, seed=7, id_prefix="")  # repeats; no ids
    for r in recs[60:]:
        r.sample_id = None
    fold = _folds_by_sample(recs, 5, seed=0)
    assert list(fold[:30]) == list(fold[30:60]) and len(set(fold)) == 5


def test_seeded_folds(records):
    assert fit(records, seed=5).to_dict() == fit(records, seed=5).to_dict()
    assert fit(records, seed=5).quality["total_ms"] != fit(records, seed=6).quality["total_ms"]


# ---------------------------------------------------------------- the commands
def test_fit_command_prints_r2_and_mape_and_writes_the_model(records, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    write_jsonl(records, tmp_path / "run" / "records.jsonl")
    out = tmp_path / "model.json"
    assert main(["fit", str(tmp_path / "run"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fitted on 300 records" in printed and "prefill_ms" in printed and "worst held-out" in printed
    assert LatencyModel.load(out).quality["total_ms"].rows == 300
    assert main(["fit", str(tmp_path / "run"), "-o", str(out), "--seed", "2"]) == 0  # replaces its own model


def test_plot_fit_draws_measured_against_predicted(records, tmp_path):
    pytest.importorskip("matplotlib")
    write_jsonl(records, tmp_path / "r.jsonl")
    fit(records).save(tmp_path / "m.json")
    assert main(["plot", "--fit", str(tmp_path / "m.json"), str(tmp_path / "r.jsonl"), "-o",
                 str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["few", "no -o", "folds", "seed", "over records", "over other json",
                                  "plot bad model", "plot missing model", "plot model is output"])
def test_fit_and_plot_fit_bad_inputs_are_one_line_and_exit_2(records, tmp_path, capsys, case):
    if case.startswith("plot"):
        pytest.importorskip("matplotlib")
    write_jsonl(records, tmp_path / "r.jsonl")
    write_jsonl(records[:5], tmp_path / "few.jsonl")
    (tmp_path / "other.json").write_text('{"traceEvents": []}')
    r, m = str(tmp_path / "r.jsonl"), str(tmp_path / "m.json")
    argv, expect = {
        "few": (["fit", str(tmp_path / "few.jsonl"), "-o", m], "at least 10 timed records"),
        "no -o": (["fit", r], "required: -o/--output"),
        "folds": (["fit", r, "-o", m, "--folds", "1"], "--folds must be between 2 and 10"),
        "seed": (["fit", r, "-o", m, "--seed", "-3"], "--seed must be >= 0"),
        "over records": (["fit", r, "-o", str(tmp_path / "few.jsonl")], "named like records"),
        "over other json": (["fit", r, "-o", str(tmp_path / "other.json")], "named like records"),
        "plot bad model": (["plot", "--fit", str(tmp_path / "other.json"), r, "-o", str(tmp_path / "p.png")],
                           "not a stagetrace latency model"),
        "plot missing model": (["plot", "--fit", m, r, "-o", str(tmp_path / "p.png")], "cannot be read"),
        "plot model is output": (["plot", "--fit", m, r, "-o", m], "is also an input"),
    }[case]
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("stagetrace: error: ") and err.count("\n") == 1 and expect in err, err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_vision_is_fitted_on_image_tokens_where_every_record_carries_them():
    from stagetrace.fit import VISION_FROM_IMAGE_TOKENS, fit
    from stagetrace.testing.synthetic import latency_records

    recs = latency_records(40, seed=3)
    for i, r in enumerate(recs):
        r.image_tokens = 100 + 10 * (i % 7)
        r.vision_ms = 0.02 * r.image_tokens + 1.0
    model = fit(recs)
    assert set(model.fits["vision_ms"].features + model.fits["vision_ms"].dropped) == set(VISION_FROM_IMAGE_TOKENS)
    assert "image_tokens" in model.fits["vision_ms"].features
    assert model.quality["vision_ms"].r2 > 0.99
