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


# ---------------------------------------------------------------- the robust, non-negative solver
def _brute_nnls(a, b, free):
    """The exact optimum: the best unconstrained solve over every set of active (zero) constrained variables."""
    import itertools

    import numpy as np

    n = a.shape[1]
    best, best_x = np.inf, None
    constrained = [j for j in range(n) if not free[j]]
    for k in range(len(constrained) + 1):
        for zero in itertools.combinations(constrained, k):
            keep = [j for j in range(n) if j not in zero]
            x = np.zeros(n)
            if keep:
                x[keep] = np.linalg.lstsq(a[:, keep], b, rcond=None)[0]
            if all(x[j] >= -1e-12 for j in constrained):
                cost = float(np.sum((a @ x - b) ** 2))
                if cost < best:
                    best, best_x = cost, x
    return best, best_x


def test_nnls_matches_brute_force_on_small_random_problems():
    import numpy as np

    from stagetrace.fit import nnls

    rng = np.random.default_rng(0)
    for trial in range(300):
        m, n = int(rng.integers(3, 12)), int(rng.integers(1, 6))
        a = rng.standard_normal((m, n)) * (10.0 ** rng.integers(-2, 3, n))  # columns of different scales
        b = rng.standard_normal(m) * 5
        free = rng.random(n) < (0.3 if trial % 2 else 0.0)
        x = nnls(a, b, free=free)
        best, best_x = _brute_nnls(a, b, free)
        assert np.all(x[~free] >= 0), (trial, x)
        assert np.sum((a @ x - b) ** 2) == pytest.approx(best, rel=1e-9, abs=1e-12), trial
        if m >= n:  # full column rank: the optimum is unique
            assert np.allclose(x, best_x, rtol=1e-7, atol=1e-9), (trial, x, best_x)


def test_nnls_known_solutions():
    import numpy as np

    from stagetrace.fit import nnls

    assert nnls(np.eye(3), np.array([1.0, -2.0, 3.0])).tolist() == [1.0, 0.0, 3.0]
    assert nnls(np.eye(3), np.array([1.0, -2.0, 3.0]), free=[False, True, False]).tolist() == [1.0, -2.0, 3.0]
    # b in the cone of a's columns: the exact non-negative combination
    a = np.array([[1.0, 2.0], [3.0, 1.0], [0.0, 4.0]])
    assert np.allclose(nnls(a, a @ np.array([0.5, 2.0])), [0.5, 2.0])
    # a falling trend: the slope would be negative, so it is 0 and the intercept takes the mean
    t = np.arange(1.0, 6.0)
    assert np.allclose(nnls(np.column_stack([np.ones(5), t]), 10 - t), [7.0, 0.0])
    assert nnls(np.zeros((4, 0)), np.ones(4)).shape == (0,)


def _with_slow_calls(share=0.15, factor=1.8, n=300, seed=1):
    import numpy as np

    from stagetrace.testing.synthetic import scaled

    recs = latency_records(n, seed=0, noise=0.02)
    slow = set(np.random.default_rng(seed).choice(n, round(share * n), replace=False).tolist())
    return [scaled([r], factor)[0] if i in slow else r for i, r in enumerate(recs)], {f"s{i}" for i in slow}


_TRUE_FEATURES = {"prefill_ms": ("batch_prompt_tokens", "batch_prompt_tokens_sq"),
                  "vision_ms": ("batch_prompt_tokens",), "decode_step_ms": ("batch_size", "batch_context_tokens")}
_TRUE_COEF = {"prefill_ms": (2.0, 0.01, 2e-6), "vision_ms": (4.0, 0.002), "decode_step_ms": (1.0, 0.1, 0.0005)}


def _coef_errors(m):
    return {t: [abs(got / want - 1) for got, want in zip((m.fits[t].intercept_ms, *m.fits[t].coef_ms), true)]
            for t, true in _TRUE_COEF.items()}


def test_fifteen_percent_slow_calls_do_not_move_the_robust_fit():
    """15% of calls run whole × 1.8 (a host in a slow state): the robust fit gives the generator's
    coefficients back within 5% and names those calls; plain weighted least squares does not."""
    data, slow = _with_slow_calls()
    robust = fit(data, features=_TRUE_FEATURES)
    plain = fit(data, features=_TRUE_FEATURES, robust=False, nonnegative=False)
    assert max(max(e) for e in _coef_errors(robust).values()) < 0.05, _coef_errors(robust)
    assert max(max(e) for e in _coef_errors(plain).values()) > 0.05, _coef_errors(plain)
    # its predictions too: the plain fit is pulled up several %
    truth = TRUE_MODEL["prefill_ms"](1000, 1)
    assert robust.predict(prompt_tokens=1000, output_tokens=2)["prefill_ms"]["ms"] == pytest.approx(truth, rel=0.015)
    assert plain.predict(prompt_tokens=1000, output_tokens=2)["prefill_ms"]["ms"] > 1.03 * truth
    named = set(robust.quality["prefill_ms"].outliers)
    assert len(named & slow) >= 0.95 * len(slow) and len(named - slow) <= 3, (len(named & slow), named - slow)
    assert robust.quality["prefill_ms"].median_ape_pct < 2.5 < robust.quality["prefill_ms"].mape_pct
    assert robust.trained["solver"]["robust"] == "huber" and plain.trained["solver"]["robust"] is None


def test_the_plain_fit_is_the_old_weighted_least_squares():
    import numpy as np

    recs = latency_records(60, seed=3, noise=0.02)
    m = fit(recs, robust=False, nonnegative=False)
    f = m.fits["vision_ms"]
    x = np.array([[r.prompt_tokens, r.batch_size, r.batch_size * r.prompt_tokens] for r in recs], dtype=float)
    y = np.array([r.vision_ms for r in recs])
    w = 1 / y
    beta = np.linalg.lstsq(np.column_stack([np.ones(len(y)), x]) * w[:, None], y * w, rcond=None)[0]
    assert np.allclose([f.intercept_ms, *f.coef_ms], beta, rtol=1e-6, atol=1e-9)


def test_coefficients_of_counts_and_the_intercept_are_never_negative():
    import numpy as np

    data, _ = _with_slow_calls(share=0.3, factor=2.5)
    for r in data[::4]:  # and some calls faster the longer their prompt: a trend no count may follow
        r.prefill_ms = max(30.0 - 0.01 * r.prompt_tokens, 1.0)
    for robust in (True, False):
        m = fit(data, robust=robust)
        for f in m.fits.values():
            assert f.intercept_ms >= 0 and all(c >= 0 for c in f.coef_ms), f
    # a falling stage: flat at best, never below 0 for more work
    recs = latency_records(40, seed=5)
    for r in recs:
        r.prefill_ms = 50.0 - 0.02 * r.prompt_tokens
    plain = fit(recs, robust=False, nonnegative=False).fits["prefill_ms"]
    assert min((plain.intercept_ms, *plain.coef_ms)) < 0  # what the old fit made of it
    sane = fit(recs).fits["prefill_ms"]
    assert sane.intercept_ms > 0 and all(c >= 0 for c in sane.coef_ms)
    grid = {"prompt_tokens": np.arange(0.0, 4000, 100), "batch_size": np.ones(40), "output_tokens": np.ones(40),
            "decode_steps": np.zeros(40)}
    assert np.all(np.diff(sane.predict_ms(grid)) >= 0)


def test_a_feature_with_negative_values_is_no_count_and_keeps_a_free_coefficient():
    recs = latency_records(40, seed=4)
    for i, r in enumerate(recs):
        r.image_tokens = (i % 9) - 4  # not a count
        r.vision_ms = 10.0 - 0.5 * r.image_tokens
    f = fit(recs, features={"vision_ms": ("image_tokens",)}).fits["vision_ms"]
    assert f.coef_ms[0] == pytest.approx(-0.5) and f.intercept_ms == pytest.approx(10.0)


def test_the_robust_fit_is_deterministic():
    data, _ = _with_slow_calls()
    a, b = fit(data), fit(list(data))
    assert a.to_dict() == b.to_dict()


def test_a_model_saved_before_median_ape_and_outliers_loads_with_defaults(model, tmp_path):
    import math

    d = model.to_dict()
    for q in d["quality"].values():
        del q["median_ape_pct"], q["outliers"]
    d["trained"].pop("solver")
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = LatencyModel.load(tmp_path / "old.json")
    assert all(math.isnan(q.median_ape_pct) and q.outliers == () for q in old.quality.values())
    assert old.predict(prompt_tokens=300, output_tokens=5) == model.predict(prompt_tokens=300, output_tokens=5)
    assert main_format_ok(old)


def main_format_ok(m):
    from stagetrace.cli.fit import format_model

    return "prefill_ms" in format_model(m)


def test_records_without_a_token_count_fit_on_decode_steps_and_refuse_a_feature_on_output_tokens():
    """output_tokens is None where generate() returned no (batch, tokens) sequences (MusicGen):
    the default features read decode steps, so such records still fit; a feature asked on
    output_tokens is refused with the reason, never fitted on NaN."""
    recs = latency_records(60, seed=4)
    for r in recs[::3]:
        r.output_tokens = None
    m = fit(recs)
    assert m.quality["total_ms"].r2 > 0.99
    with pytest.raises(ValueError, match="'output_tokens' is not a number for every call"):
        fit(recs, features={"total_ms": ["output_tokens"]})
