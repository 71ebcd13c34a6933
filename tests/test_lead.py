"""How far the GPU runs behind the host (lead.py), on synthetic clocks of known shape."""
from __future__ import annotations

import numpy as np
import pytest

from stagetrace.labels import Kind, label, layer_labels
from stagetrace.lead import CAUGHT_UP_US, _per_span, call_leads, lead_ns
from stagetrace.stages import stages_from_marks

LAYERS = [lab for pair in layer_labels(4, "pair") for lab in pair]


def _call(steps: int, layers: bool = True) -> np.ndarray:
    inner = LAYERS if layers else []
    seq = [label(Kind.CALL_BEGIN), label(Kind.PREFILL_FORWARD), label(Kind.LM_BEGIN), *inner, label(Kind.LM_HEAD_END)]
    for _ in range(steps):
        seq += [label(Kind.DECODE_FORWARD), *inner]
    return np.array(seq + [label(Kind.CALL_END)], dtype=np.int32)


def _clocks(labels: np.ndarray, work_before_us, host_wait_us=lambda i: 0) -> tuple[np.ndarray, np.ndarray]:
    """The host issues a mark every 10 µs (plus ``host_wait_us(i)`` it waits before mark i); the
    GPU runs ``work_before_us(i)`` µs of work queued before mark i and reaches the mark 1 µs
    after it was issued at the earliest."""
    gaps = [0] + [10_000 + host_wait_us(i) * 1_000 for i in range(1, len(labels))]
    host = 10**12 + np.cumsum(gaps).astype(np.int64)
    device = np.zeros(len(labels), dtype=np.int64)
    for i in range(1, len(labels)):
        device[i] = max(device[i - 1] + work_before_us(i) * 1_000, host[i] - host[0] + 1_000)
    return device, host


def _leads(labels, device, host, backend="cuda", compiled=False):
    spans = stages_from_marks(labels, device).spans
    return call_leads(labels, device, host, spans, backend, compiled)


def test_the_lead_of_a_mark_is_gpu_time_minus_issue_time_on_the_aligned_clock():
    device, host = np.array([0, 30_000, 90_000]), np.array([500, 10_500, 20_500])
    assert lead_ns(device, host).tolist() == [0, 20_000, 70_000]


def test_a_gpu_that_keeps_up_with_the_host_is_host_bound_and_a_queue_that_never_drains_gpu_bound():
    labels = _call(steps=3)
    stages, medians, verdicts = _leads(labels, *_clocks(labels, lambda i: 3))  # 3 µs of work per 10 µs issued
    assert stages["prefill"]["verdict"] == stages["decode"]["verdict"] == "host-bound"
    assert verdicts == ["host-bound"] * 3 and all(m == pytest.approx(1.0) for m in medians)
    stages, medians, verdicts = _leads(labels, *_clocks(labels, lambda i: 400))  # 400 µs per 10 µs issued
    assert stages["prefill"]["verdict"] == stages["decode"]["verdict"] == "gpu-bound"
    assert verdicts == ["gpu-bound"] * 3 and all(m > CAUGHT_UP_US for m in medians)


def test_a_spin_inside_one_step_turns_that_step_gpu_bound_by_its_length():
    labels = _call(steps=4)
    steps_at = np.flatnonzero(labels == label(Kind.DECODE_FORWARD))
    spin_at = steps_at[2] + 1  # 2 ms of GPU work before step 2's first layer mark
    # generate() reads a GPU value every step: the host waits for the spin before step 3
    device, host = _clocks(labels, lambda i: 2_000 if i == spin_at else 3,
                           lambda i: 2_000 if i == steps_at[3] else 0)
    _, medians, verdicts = _leads(labels, device, host)
    assert verdicts == ["host-bound", "host-bound", "gpu-bound", "host-bound"]
    inside = len(LAYERS)  # marks inside the step after the spin, each issued 10 µs after the last
    assert 2_000 - 10 * inside <= medians[2] <= 2_000, medians


def test_stage_level_marks_are_too_few_for_a_verdict_and_the_cpu_backend_has_one_clock():
    labels = _call(steps=3, layers=False)
    stages, _, verdicts = _leads(labels, *_clocks(labels, lambda i: 300))
    assert verdicts == ["unknown"] * 3 and stages["decode"]["verdict"] == "unknown"
    labels = _call(steps=2)
    host = 10**12 + np.arange(len(labels), dtype=np.int64) * 10_000
    stages, medians, verdicts = _leads(labels, host - host[0], host, backend="cpu")  # one clock
    assert verdicts == ["n/a", "n/a"] and stages["prefill"]["verdict"] == "n/a" and medians == [0.0, 0.0]
    _, _, verdicts = _leads(labels, *_clocks(labels, lambda i: 300), compiled=True)
    assert verdicts == ["unknown", "unknown"]  # stamps carry their step's issue time


@pytest.mark.parametrize("seed", range(10))
def test_vectorized_per_step_statistics_equal_a_loop(seed):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.integers(1, 50, size=200))
    lead_us = rng.random(200) * 60
    bounds = np.sort(rng.choice(t, size=12, replace=False))
    start, end = bounds[:-1], bounds[1:]
    per = _per_span(t, lead_us, start, end)
    for k, (a, b) in enumerate(zip(start, end)):
        inside = lead_us[(t > a) & (t < b)]
        assert per["n"][k] == len(inside)
        if len(inside):
            assert per["min"][k] == inside.min() and per["max"][k] == inside.max()
            assert per["median"][k] == pytest.approx(np.median(inside))
            assert per["caught"][k] == pytest.approx(np.mean(inside <= CAUGHT_UP_US))


def test_a_traced_call_carries_its_leads_and_the_report_says_what_they_mean(tmp_path, capsys):
    """On the CPU backend: the lead is 0 by construction, and the report says so."""
    import stagetrace
    from stagetrace.cli import main
    from stagetrace.export.chrome import chrome_trace
    from stagetrace.testing import tiny

    from helpers import gen_kwargs

    case = tiny.build("llava")
    with stagetrace.trace(case.model, layer_detail="all") as tracer:
        case.model.generate(**gen_kwargs(case, 4))
    (rec,) = tracer.records
    assert set(rec.lead) == {"vision", "prefill", "decode"} and rec.lead["prefill"]["verdict"] == "n/a"
    assert rec.decode_step_verdict == ["n/a"] * 3 and rec.decode_step_lead_us == [0.0] * 3
    back = stagetrace.StageRecord.from_dict(rec.to_dict())
    assert back.lead == rec.lead and back.decode_step_verdict == rec.decode_step_verdict
    events = chrome_trace([rec])["traceEvents"]
    assert sum(e["ph"] == "C" for e in events) == 3  # the lead counter, one value per step
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = [e for e in events if e["ph"] == "f"]
    assert len(starts) == len(ends) == 3 and all(e["id"] in starts and e["tid"] != 0 for e in ends)
    tracer.save_jsonl(tmp_path / "r.jsonl")
    assert main(["report", str(tmp_path / "r.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "GPU lead" in out and "lead is 0 by construction" in out


def test_the_lead_summary_hints_at_what_would_help():
    from stagetrace.export.lead_table import format_lead, summarize_lead
    from stagetrace.records import StageRecord

    def rec(prefill: str, steps: list[str]) -> StageRecord:
        return StageRecord(total_ms=1.0, vision_ms=None, prefill_ms=0.5, decode_ms=0.5, other_ms=0.0, ttft_ms=0.5,
                           decode_step_ms=[0.1] * len(steps), batch_size=1, prompt_tokens=4, output_tokens=len(steps) + 1,
                           backend="cuda", lead={"prefill": {"median_us": 900.0, "verdict": prefill}},
                           decode_step_lead_us=[5.0] * len(steps), decode_step_verdict=steps)

    text = format_lead(summarize_lead([rec("gpu-bound", ["host-bound"] * 10), rec("gpu-bound", ["host-bound"] * 10)]))
    assert "decode host-bound at 20 of 20 steps" in text and "prefill GPU-bound" in text
    text = format_lead(summarize_lead([rec("unknown", ["unknown"] * 3)]))
    assert "layer_detail='all'" in text and "host-bound at" not in text
    assert format_lead(summarize_lead([])) == ""
