"""GPU-side stamps (``torch.ops.stagetrace.stamp``): marks that live inside compiled graphs.

The op, its fake-tensor behaviour and the merge arithmetic are checked on the CPU twin;
what only a GPU can show (capture into a CUDA graph, %globaltimer against known work)
is checked by the ``gpu`` tests at the end, written once per behaviour.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import stagetrace
from stagetrace.testing import tiny
from stagetrace.labels import Kind, label
from stagetrace.low_level import graph_stamps as gs
from stagetrace.tracing import TracingError

from helpers import (DEVICES, assert_partition, build_on, compile_forward_by_hand, dynamo_state, gen_kwargs, hook_state, sync,
                     static_compiled, tokens)

DECODE, LB0, LE0 = label(Kind.DECODE_FORWARD), label(Kind.LAYER_BEGIN, 0), label(Kind.LAYER_END, 0)


def _ring(device: str):
    ring = gs.ring_for(torch.device(device))
    ring.reset(0)
    return ring, gs.ring_id(ring)


# ---------------------------------------------------------------- the op
def test_the_op_is_registered_with_a_schema_fake_kernel_and_autograd_that_torch_accepts():
    _, rid = _ring("cpu")
    result = torch.library.opcheck(torch.ops.stagetrace.stamp.default, (torch.randn(2, 3), rid, 7))
    assert set(result.values()) == {"SUCCESS"}, result


def test_under_fake_tensors_the_op_only_describes_its_output():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ring, rid = _ring("cpu")
    with FakeTensorMode():
        x = torch.empty(4, 1, 8, dtype=torch.bfloat16)
        y = torch.ops.stagetrace.stamp.default(x, rid, 3)
        assert (y.shape, y.dtype, y.stride()) == (x.shape, x.dtype, x.stride())
    assert len(ring.read(0)[0]) == 0, "a fake call must not stamp"


@pytest.mark.parametrize("device", DEVICES)
def test_the_op_returns_a_copy_and_stamps_in_call_order(device):
    ring, rid = _ring(device)
    x = torch.arange(12.0, device=device).reshape(3, 4)
    ys = [torch.ops.stagetrace.stamp.default(x, rid, lab) for lab in (5, 6, 7)]
    ts = torch.ops.stagetrace.stamp.default(x.t(), rid, 8)  # non-contiguous: stamp, then copy
    sync(device)
    assert all(torch.equal(y, x) and y.data_ptr() != x.data_ptr() for y in ys) and torch.equal(ts, x.t())
    labels, t_ns, dropped = ring.read(0 if device == "cpu" else torch.cuda.current_stream().cuda_stream)
    assert labels.tolist() == [5, 6, 7, 8] and dropped == 0
    assert np.all(np.diff(t_ns) >= 0)


def test_a_full_ring_counts_drops_and_never_overwrites():
    ring = gs.HostStampRing(capacity=3)
    for lab in range(5):
        ring.stamp(lab)
    labels, _, dropped = ring.read()
    assert labels.tolist() == [0, 1, 2] and dropped == 2


def test_a_device_without_stamps_says_why():
    assert gs.stamps_unavailable_reason("cpu") is None
    assert "no GPU-side stamps" in gs.stamps_unavailable_reason("mps")


# ---------------------------------------------------------------- layer detail in compiled decode
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "llava"])
def test_layer_detail_in_compiled_decode_stamps_every_layer_of_every_step(family, device):
    import torch._dynamo

    case = build_on(family, device)
    kw = gen_kwargs(case, 5, **static_compiled(case, device))
    torch._dynamo.reset()
    plain = tokens(case.model.generate(**kw))
    hooks = hook_state(case.model)
    # lead_every=1: the lead at every step's return (a compiled decode samples it by default)
    with stagetrace.trace(case.model, layer_detail="all", lead_every=1) as tracer:
        with pytest.warns(UserWarning, match="no longer fuse across layer boundaries"):
            first = tokens(case.model.generate(**kw))  # compiles the stamped variant once
        assert torch.equal(first, plain)  # fp32 here; bf16 rounding may differ (the warning says so)
        settled = dynamo_state()
        for _ in range(2):
            assert torch.equal(tokens(case.model.generate(**kw)), plain), "stamps changed the tokens"
    assert dynamo_state() == settled, "stamped decode recompiled after its first call"
    assert settled["graph_breaks"] == 0 and settled["cudagraph_skips"] == 0, settled
    assert hook_state(case.model) == hooks
    assert torch.equal(tokens(case.model.generate(**kw)), plain)  # untraced again
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and len(rec.decode_step_ms) == 4
        steps = [s for s in rec.spans if s.name.startswith("step ")]
        layers = [s for s in rec.spans if s.name.startswith("layer")]
        assert len(layers) == 2 * 5  # two layers in the prefill and in each of 4 steps
        # the stamps' host times are borrowed from their step's event: flagged, and kept out of the lead
        stamped = rec.marks.from_stamp
        # per step: each layer's begin and the last one's end (inside the graph a layer's end and
        # the next one's begin are one point: one stamp, whatever layer_marks says), in 4 steps
        assert stamped is not None and int(stamped.sum()) == 3 * 4
        assert None not in rec.decode_step_lead_us and "unknown" not in rec.decode_step_verdict
        for step in steps:
            inside = [s for s in layers if step.start_ns <= s.start_ns and s.end_ns <= step.end_ns]
            assert [s.name for s in inside] == ["layer 0", "layer 1"], (step, inside)
            assert inside[0].end_ns <= inside[1].start_ns


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_layer_detail_in_compiled_decode_runs_the_stamped_graph_only_on_sampled_steps(device):
    import torch._dynamo

    case = build_on("llama", device)
    kw = gen_kwargs(case, 7, **static_compiled(case, device))
    torch._dynamo.reset()
    plain = tokens(case.model.generate(**kw))
    hooks = hook_state(case.model)
    with stagetrace.trace(case.model, layer_detail="all", layer_every=3) as tracer:
        with pytest.warns(UserWarning, match="no longer fuse across layer boundaries"):
            assert torch.equal(tokens(case.model.generate(**kw)), plain)  # compiles the stamped variant
        settled = dynamo_state()
        for _ in range(2):
            assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert dynamo_state() == settled, "switching between the stamped and the bare graph recompiled"
    assert settled["graph_breaks"] == 0 and settled["cudagraph_skips"] == 0, settled
    assert hook_state(case.model) == hooks
    assert torch.equal(tokens(case.model.generate(**kw)), plain)  # untraced again
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and len(rec.decode_step_ms) == 6 and rec.layer_every == 3
        assert rec.layer_steps == [0, 3] and not rec.error
        assert int(rec.marks.from_stamp.sum()) == 2 * 3  # 2 layers' begins and the last end, in 2 of 6 steps
        steps = [s for s in rec.spans if s.name.startswith("step ")]
        for k, step in enumerate(steps):
            inside = [s for s in rec.spans if s.name.startswith("layer") and step.start_ns <= s.start_ns
                      and s.end_ns <= step.end_ns]
            assert [s.name for s in inside] == (["layer 0", "layer 1"] if k in (0, 3) else []), (k, inside)


def test_compiled_decode_places_one_stamp_per_boundary_whatever_layer_marks_says():
    """A layer's end and the next one's begin are one point of the graph: pair and shared place
    the same stamps (and share one compiled graph); only the eager prefill's marks differ."""
    import torch._dynamo

    case = tiny.build("llama")
    kw = gen_kwargs(case, 4, **static_compiled(case, "cpu"))
    torch._dynamo.reset()
    plain = tokens(case.model.generate(**kw))
    with pytest.warns(UserWarning), stagetrace.trace(case.model, layer_detail="all") as pair:
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
    settled = dynamo_state()
    with pytest.warns(UserWarning), stagetrace.trace(case.model, layer_detail="all", layer_marks="shared") as tracer:
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert dynamo_state() == settled, "the same stamps compiled twice"
    assert pair.records[0].n_marks - tracer.records[0].n_marks == 1  # the prefill's layer 0 end (eager)
    assert int(pair.records[0].marks.from_stamp.sum()) == int(tracer.records[0].marks.from_stamp.sum()) == 3 * 3
    (rec,) = tracer.records
    assert_partition(rec)
    # call (2) + prefill (forward, lm, head: 3) + its layers (2 begins + the last end: 3), then per
    # step its event and 3 stamps (the calibration stamps anchor the merge, they are not marks),
    # and the return to generate() of the prefill's forward and of decode step 0 (the lead on
    # every COMPILED_LEAD_EVERY-th compiled step)
    assert rec.n_marks == 2 + 3 + 3 + 3 * (1 + 3) + 2 and rec.lead_every > 2
    steps = [s for s in rec.spans if s.name.startswith("step ")]
    assert len(steps) == 3 and len([s for s in rec.spans if s.name.startswith("layer")]) == 2 * 4


@pytest.mark.parametrize("device", DEVICES)
def test_layer_detail_inside_a_forward_compiled_by_hand(device):
    import torch._dynamo

    case = build_on("llama", device)
    generate = compile_forward_by_hand(case, device, 4)

    torch._dynamo.reset()
    plain = generate()
    assert torch.equal(generate(), plain)
    with pytest.warns(UserWarning, match="fuse across layer boundaries"):
        tracer = stagetrace.trace(case.model, layer_detail="all").start()
    try:
        assert torch.equal(generate(), plain)  # recompiles the forward once, with the stamps
        settled = dynamo_state()
        for _ in range(2):
            assert torch.equal(generate(), plain)
        assert dynamo_state() == settled, "the stamped forward recompiled after its first call"
    finally:
        tracer.stop()
    assert torch.equal(generate(), plain) and dynamo_state() == settled  # the unstamped graph is still cached
    assert settled["graph_breaks"] == 0 and settled["cudagraph_skips"] == 0, settled
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and len(rec.decode_step_ms) == 3
        prefill = next(s for s in rec.spans if s.name == "prefill")
        layers = [s for s in rec.spans if s.name.startswith("layer")]
        assert len(layers) == 2 * 4  # two layers in the prefill forward and in each of 3 steps
        assert [s.name for s in layers if prefill.start_ns <= s.start_ns and s.end_ns <= prefill.end_ns] == [
            "layer 0", "layer 1"]


def test_layer_detail_in_compiled_decode_is_refused_where_there_are_no_stamps(monkeypatch):
    case = tiny.build("llama")
    kw = gen_kwargs(case, 3, **static_compiled(case, "cpu"))
    monkeypatch.setattr(gs, "stamps_unavailable_reason", lambda device_type: "built without stamps (test)")
    with stagetrace.trace(case.model, layer_detail="all") as tracer:
        with pytest.raises(TracingError, match="need GPU-side stamps: built without stamps.*layer_detail='prefill'"):
            case.model.generate(**kw)
        case.model.generate(**kw, disable_compile=True)  # eager: events, no stamps needed
    (rec,) = tracer.records
    assert_partition(rec)
    assert not rec.compiled_decode


# ---------------------------------------------------------------- what only a GPU shows
@pytest.mark.gpu
def test_stamps_captured_in_a_cuda_graph_time_known_work_on_every_replay():
    from stagetrace.testing.reference import spin_cycles_per_us

    ring, rid = _ring("cuda")
    cycles_per_us = spin_cycles_per_us()
    stream = torch.cuda.Stream()
    x = torch.zeros(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            y = torch.ops.stagetrace.stamp.default(x, rid, 1)
            torch.cuda._sleep(int(500 * cycles_per_us))
            y = torch.ops.stagetrace.stamp.default(y, rid, 2)
            torch.cuda._sleep(int(2000 * cycles_per_us))
            y = torch.ops.stagetrace.stamp.default(y, rid, 3)
        ring.reset(stream.cuda_stream)
        for _ in range(3):
            graph.replay()
    labels, t_ns, dropped = ring.read(stream.cuda_stream)
    assert labels.tolist() == [1, 2, 3] * 3 and dropped == 0
    gaps_us = np.diff(t_ns.reshape(3, 3), axis=1) / 1e3
    assert np.all(np.abs(gaps_us[:, 0] - 500) <= 0.02 * 500 + 5), gaps_us
    assert np.all(np.abs(gaps_us[:, 1] - 2000) <= 0.02 * 2000 + 5), gaps_us
    assert np.all(t_ns[3::3] > t_ns[2:-1:3]), "each replay stamps after the one before"


@pytest.mark.gpu
def test_globaltimer_ticks_finely_enough_for_layer_stamps():
    from stagetrace.low_level import _C

    resolution_ns = _C.globaltimer_resolution_ns(torch.cuda.current_device())
    assert 0 < resolution_ns <= 1_000, resolution_ns
