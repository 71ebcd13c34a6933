"""How far the GPU runs behind the host (lead.py), on synthetic clocks of known shape."""
from __future__ import annotations

import numpy as np
import pytest

from stagetrace.labels import Kind, kind_of, label, layer_labels
from stagetrace import lead as lead_module
from stagetrace.lead import CAUGHT_UP_US, _per_step, call_leads, lead_ns
from stagetrace.stages import stages_from_marks

LAYERS = [lab for pair in layer_labels(4, "pair") for lab in pair]


def _call(steps: int, layers: bool = True, returns: bool = True, lead_every: int = 1) -> np.ndarray:
    """A call's labels as the tracer marks them; ``returns``: each forward's return to generate()
    (a decode step's on steps 0, N, 2N, ... with ``lead_every`` N)."""
    inner = LAYERS if layers else []
    back = [label(Kind.FORWARD_RETURN)] if returns else []
    seq = [label(Kind.CALL_BEGIN), label(Kind.PREFILL_FORWARD), label(Kind.LM_BEGIN), *inner, label(Kind.LM_HEAD_END),
           *back]
    for k in range(steps):
        seq += [label(Kind.DECODE_FORWARD), *inner, *(back if k % lead_every == 0 else [])]
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


def _all(labels, device, host, backend="cuda", issued_by_host=None):
    spans = stages_from_marks(labels, device).spans
    return call_leads(labels, device, host, spans, backend, issued_by_host)


def _leads(labels, device, host, backend="cuda", issued_by_host=None):
    """(per stage, per step median lead, per step verdict)."""
    out = _all(labels, device, host, backend, issued_by_host)
    return out["stages"], out["step_lead_us"], out["step_verdict"]


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
    out = _all(labels, device, host)
    medians, verdicts, gpu_bound = out["step_lead_us"], out["step_verdict"], out["step_gpu_bound_ms"]
    assert verdicts == ["host-bound", "host-bound", "gpu-bound", "host-bound"]
    inside = len(LAYERS) + 1  # marks inside the step after the spin (layers, the return), each issued 10 µs apart
    assert 2_000 - 10 * inside <= medians[2] <= 2_000, medians
    # the step's GPU-bound time: the spin and the 3 µs works queued behind it, less what the host took
    # to issue them (the queue drained meanwhile); the other steps: none
    assert 2.0 - 0.01 * inside <= gpu_bound[2] <= 2.0 + 0.003 * inside and gpu_bound[:2] + gpu_bound[3:] == [0.0] * 3


def test_a_queue_that_grows_from_an_empty_start_is_gpu_bound_not_mixed():
    """A batch-32 prefill: its first layer mark finds the GPU idle (nothing queued yet), every
    later one far behind. Counting marks would say mixed; by time the stage is GPU-bound."""
    labels = _call(steps=1)
    first_layer = int(np.flatnonzero(labels == LAYERS[0])[0])
    device, host = _clocks(labels, lambda i: 0 if i <= first_layer else 4_000)
    stages = _leads(labels, device, host)[0]
    assert stages["prefill"]["verdict"] == "gpu-bound" and stages["prefill"]["min_us"] <= CAUGHT_UP_US
    assert stages["prefill"]["gpu_bound_share"] > 0.95


@pytest.mark.parametrize("seed", range(20))
def test_gpu_bound_time_is_a_lower_bound_within_each_span(seed):
    """On random clocks: never more than the span, never more than the leads, and the per-step
    sums (vectorized) equal a loop over the marks."""
    rng = np.random.default_rng(seed)
    labels = _call(steps=5, layers=bool(seed % 2))
    work = rng.integers(0, 60, size=len(labels))
    device, host = _clocks(labels, lambda i: int(work[i]), lambda i: int(rng.integers(0, 30)))
    out = _all(labels, device, host)
    spans = stages_from_marks(labels, device).spans
    lead = lead_ns(device, host)
    usable = ~np.isin(kind_of(labels), [Kind.CALL_BEGIN, Kind.CALL_END, Kind.PREFILL_FORWARD, Kind.DECODE_FORWARD])
    steps = [s for s in spans if s.kind == "step"]
    starts = list(np.flatnonzero(labels == label(Kind.DECODE_FORWARD))) + [len(labels) - 1]
    for k, (s, got) in enumerate(zip(steps, out["step_gpu_bound_ms"])):
        want = 0
        for j in range(starts[k] + 1, starts[k + 1]):  # the step's marks, by issue order
            if usable[j] and lead[j] > CAUGHT_UP_US * 1e3:
                want += min(lead[j], device[j] - device[j - 1])
        assert got * 1e6 == pytest.approx(want) and want <= s.end_ns - s.start_ns
    for kind, st in out["stages"].items():
        (span,) = [s for s in spans if s.kind == kind]
        if st["gpu_bound_ms"] is not None:
            assert 0 <= st["gpu_bound_ms"] * 1e6 <= span.end_ns - span.start_ns + 1e-3
            assert 0 <= st["gpu_bound_share"] <= 1


def test_at_stage_level_the_forward_return_decides_and_without_it_the_verdict_is_unknown():
    labels = _call(steps=3, layers=False)
    # each forward is 300 µs of GPU work issued in 10 µs; what follows it (sampling) is small
    forward_work = lambda i: 300 if labels[i] in (label(Kind.FORWARD_RETURN), label(Kind.LM_HEAD_END)) else 3  # noqa: E731
    stages, medians, verdicts = _leads(labels, *_clocks(labels, forward_work))
    assert verdicts == ["gpu-bound"] * 3 and stages["decode"]["verdict"] == "gpu-bound"
    assert stages["decode"]["marks"] == 3 and all(m > CAUGHT_UP_US for m in medians)
    # prefill reads its closing mark (lm_head's end, issued right after its work) and the return
    assert stages["prefill"]["marks"] == 1 and stages["prefill"]["verdict"] == "gpu-bound"
    stages, _, verdicts = _leads(labels, *_clocks(labels, lambda i: 3))
    assert verdicts == ["host-bound"] * 3 and stages["decode"]["verdict"] == "host-bound"
    labels = _call(steps=3, layers=False, returns=False)  # a generate() that never hands back: no mark inside a step
    stages, medians, verdicts = _leads(labels, *_clocks(labels, lambda i: 300))
    assert verdicts == ["unknown"] * 3 and medians == [None] * 3 and stages["decode"]["verdict"] == "unknown"


@pytest.mark.parametrize("work_us, host_us, truth", [(300, 0, "gpu-bound"), (3, 0, "host-bound"), (60, 100, "mixed")])
def test_a_sampled_lead_reads_the_decode_share_over_the_steps_it_marked(work_us, host_us, truth):
    """lead_every=3: the return is marked on steps 0, 3, 6 only. Those steps carry the
    verdict; the others are unknown; the decode stage's share is the read steps' GPU-bound
    time over *their* length — over all of decode it would be a third of the truth, and a
    GPU-bound decode would read as mixed."""
    full, sampled = _call(steps=8, layers=False), _call(steps=8, layers=False, lead_every=3)
    # each forward is work_us of GPU work; the host then works host_us (sampling) before the next step
    clocks = lambda labels: _clocks(labels, lambda i: work_us if labels[i] in (  # noqa: E731
        label(Kind.FORWARD_RETURN), label(Kind.LM_HEAD_END)) else 3,
        lambda i: host_us if labels[i] == label(Kind.DECODE_FORWARD) else 0)
    st_full, _, v_full = _leads(full, *clocks(full))
    out = _all(sampled, *clocks(sampled))
    st, medians, verdicts = out["stages"], out["step_lead_us"], out["step_verdict"]
    read = [0, 3, 6]
    assert [k for k, m in enumerate(medians) if m is not None] == read
    assert [verdicts[k] for k in read] == [v_full[k] for k in read] == [truth] * 3
    assert all(verdicts[k] == "unknown" for k in range(8) if k not in read)
    assert st["decode"]["steps_read"] == 3 and st_full["decode"]["steps_read"] == 8
    assert st["decode"]["verdict"] == st_full["decode"]["verdict"] == truth
    bound = [b for b in out["step_gpu_bound_ms"] if b is not None]
    steps = [s for s in stages_from_marks(sampled, clocks(sampled)[0]).spans if s.kind == "step"]
    over_ms = sum((steps[k].end_ns - steps[k].start_ns) / 1e6 for k in read)
    assert st["decode"]["gpu_bound_ms"] == pytest.approx(sum(bound))
    assert st["decode"]["gpu_bound_share"] == pytest.approx(sum(bound) / over_ms)


def test_the_cpu_backend_has_one_clock():
    labels = _call(steps=2)
    host = 10**12 + np.arange(len(labels), dtype=np.int64) * 10_000
    stages, medians, verdicts = _leads(labels, host - host[0], host, backend="cpu")  # one clock
    assert verdicts == ["n/a", "n/a"] and stages["prefill"]["verdict"] == "n/a" and medians == [0.0, 0.0]


def test_stamps_never_enter_a_lead_and_compiled_steps_are_classified_by_their_return():
    """Compiled decode: each step is an event, GPU-side stamps (host time borrowed from the
    step's event), then the forward's return. A graph launch issues the step at once, so the
    GPU is still running it at the return: gpu-bound, read off the return mark alone."""
    step = [label(Kind.DECODE_FORWARD), *LAYERS, label(Kind.FORWARD_RETURN)]
    labels = np.array([label(Kind.CALL_BEGIN), label(Kind.PREFILL_FORWARD), label(Kind.LM_BEGIN),
                       label(Kind.LM_HEAD_END), label(Kind.FORWARD_RETURN), *step * 2, label(Kind.CALL_END)],
                      dtype=np.int32)
    stamp = np.isin(kind_of(labels), [Kind.LAYER_BEGIN, Kind.LAYER_END])
    device, host = _clocks(labels, lambda i: 300)
    host = np.where(stamp, host[np.maximum.accumulate(np.where(~stamp, np.arange(len(labels)), 0))], host)
    _, medians, verdicts = _leads(labels, device, host, issued_by_host=~stamp)
    assert verdicts == ["gpu-bound", "gpu-bound"]
    returns = np.flatnonzero(labels == label(Kind.FORWARD_RETURN))[1:]
    assert medians == pytest.approx(list(lead_ns(device, host)[returns] / 1e3))  # the return's lead only


@pytest.mark.parametrize("seed", range(10))
def test_vectorized_per_step_statistics_equal_a_loop(seed):
    rng = np.random.default_rng(seed)
    step = np.sort(rng.integers(-1, 12, size=200))
    lead_us = rng.random(200) * 60
    per = _per_step(step, lead_us, 12)
    for k in range(12):
        inside = lead_us[step == k]
        assert per["n"][k] == len(inside)
        if len(inside):
            assert per["min"][k] == inside.min() and per["max"][k] == inside.max()
            assert per["median"][k] == pytest.approx(np.median(inside))


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
    counters = [e for e in events if e["ph"] == "C"]  # the lead and GPU-bound counters, one value per step each
    assert [e["name"] for e in counters].count("GPU lead (µs, step median)") == 3
    assert [e["args"]["share"] for e in counters if e["name"] == "GPU-bound share (step)"] == [0.0] * 3
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
    text = format_lead(summarize_lead([rec("host-bound", ["mixed"] * 8 + ["host-bound"] * 2)]))
    assert "decode mixed at 8 of 10 steps" in text and "host-bound at" not in text
    text = format_lead(summarize_lead([rec("unknown", ["unknown"] * 3)]))
    assert "layer_detail='all'" in text and "host-bound at" not in text
    assert format_lead(summarize_lead([])) == ""


@pytest.mark.gpu
def test_on_the_gpu_a_spin_in_one_eager_step_makes_it_gpu_bound_for_the_spins_length():
    """Stage level and every layer: tiny Llama's eager steps are host-bound (its kernels are
    tiny). 60 ms of GPU work queued after step 1's last layer: that step's GPU-bound time and
    its length grow by the spin, its lead reaches it, and the spin dominates the step; with
    layer detail there is one lead per layer boundary."""
    import stagetrace
    import torch
    from stagetrace.testing.reference import spin_cycles_per_us

    from helpers import build_on, cuda_skip_reason, gen_kwargs

    if cuda_skip_reason():
        pytest.skip(cuda_skip_reason())
    case = build_on("llama", "cuda")
    # long against the host's own time in the step before the spin (5-7 ms on a slow host with
    # every layer marked): at 20 ms the spin's share of the step fell to 0.73 there, under the
    # 0.75 that makes a step gpu-bound, though its GPU-bound time read the spin to 2%
    spin_ms = 60.0
    cycles, calls = int(spin_cycles_per_us() * spin_ms * 1e3), []

    def spin_at_step_1(module, args, out):
        calls.append(1)
        if len(calls) == 3:  # forwards: the prefill, step 0, then step 1
            torch.cuda._sleep(cycles)

    last_layer = case.model.model.layers[-1]
    kw = gen_kwargs(case, 6)
    case.model.generate(**kw)  # warm
    for detail in ("off", "all"):
        handle = last_layer.register_forward_hook(spin_at_step_1)
        calls.clear()
        try:
            with stagetrace.trace(case.model, layer_detail=detail) as tracer:
                case.model.generate(**kw)
        finally:
            handle.remove()
        (rec,) = tracer.records
        v, lead, gpu_bound = rec.decode_step_verdict, rec.decode_step_lead_us, rec.decode_step_gpu_bound_ms
        why = (detail, v, lead, gpu_bound, rec.decode_step_ms)
        assert v[1] == "gpu-bound" and 0.85 * spin_ms <= gpu_bound[1] <= 1.15 * spin_ms, why
        assert rec.lead["decode"]["max_us"] >= 0.8 * spin_ms * 1e3, why  # the return after the spin
        others = [x for i, x in enumerate(v) if i != 1]
        assert others.count("host-bound") >= len(others) - 1, why
        assert abs(rec.decode_step_ms[1] - np.median(rec.decode_step_ms) - spin_ms) <= 0.15 * spin_ms, why
        if detail == "all":  # a lead per layer boundary and the return, in every step
            assert rec.lead["decode"]["marks"] == len(rec.decode_step_ms) * (2 * len(case.model.model.layers) + 1)


def test_stage_and_step_medians_are_numpys_median_for_even_and_odd_counts():
    for steps in (2, 3):
        labels = _call(steps=steps)
        device, host = _clocks(labels, lambda i: 7 * i % 13 + 1, host_wait_us=lambda i: i % 5)
        out = _all(labels, device, host)
        lead_us = (device - (host - host[0])) / 1e3
        kinds = labels & 0xFF
        inner = ~np.isin(kinds, [int(k) for k in (Kind.CALL_BEGIN, Kind.CALL_END, Kind.PREFILL_FORWARD,
                                                   Kind.DECODE_FORWARD)])
        decode_start = int(np.flatnonzero(kinds == Kind.DECODE_FORWARD)[0])
        in_decode = inner & (np.arange(len(labels)) > decode_start)
        assert out["stages"]["decode"]["median_us"] == float(np.median(lead_us[in_decode]))
        assert out["stages"]["decode"]["marks"] == int(in_decode.sum())


@pytest.mark.skipif(lead_module._native_leads is None, reason="the native extension did not build")
def test_the_native_walk_equals_the_numpy_reference_on_random_calls():
    """csrc/call_leads.cpp and lead._lead_columns_numpy: equal, not close — the same counts, the
    same medians and sums to the last bit — with stamps (no issue time) and ties, 2,000 calls."""
    rng = np.random.default_rng(11)
    for trial in range(2000):
        steps = int(rng.integers(0, 5))
        labels = _call(steps=steps, layers=bool(rng.random() < 0.7), returns=bool(rng.random() < 0.8))
        device, host = _clocks(labels, lambda i: int(rng.integers(0, 60)), host_wait_us=lambda i: int(rng.integers(0, 40)))
        issued = None if trial % 2 else rng.random(len(labels)) < 0.8
        spans = stages_from_marks(labels, device).spans
        windows = np.array([[spans.start_ns[r], spans.end_ns[r]] for r in range(1, min(4, len(spans)))], dtype=np.int64)
        want = lead_module._lead_columns_numpy(labels, device, host, issued, windows, steps)
        got = lead_module._native_leads(labels, device, host, issued, windows, steps)
        assert got[0] == want[0]
        for a, b in zip(got[1:], want[1:]):
            assert a.tolist() == b.tolist()
