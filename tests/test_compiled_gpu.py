"""Compiled decode on CUDA: what latency-minded users actually run.

transformers' static-cache path compiles the decode step with inductor and replays it as
CUDA graphs; a text-only model's forward may also be compiled by hand with
``mode="reduce-overhead"``. Tracing must add no graph break and no recompilation, leave
the tokens unchanged against the same compiled run untraced, and still partition exactly.
"""
from __future__ import annotations

import pytest
import torch

import stagetrace
from helpers import (assert_partition, build_on, compile_forward_by_hand, dynamo_state, fresh_dynamo,
                     gen_kwargs, hook_state, tokens)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl"])
def test_builtin_compiled_decode_on_cuda_graphs_is_traced_unchanged(family):
    case = build_on(family, "cuda")
    case.model.generation_config.cache_implementation = "static"  # generate() compiles decode itself
    kw = gen_kwargs(case, 6)
    fresh_dynamo()
    plain = tokens(case.model.generate(**kw))
    assert torch.equal(tokens(case.model.generate(**kw)), plain)  # CUDA graphs recorded and replayed
    before = dynamo_state()
    assert before.get("frames.ok", 0) >= 1, "generate() did not compile the decode step"
    assert before["graph_breaks"] == 0 and before["cudagraph_skips"] == 0, before
    hooks = hook_state(case.model)
    with stagetrace.trace(case.model, layer_detail="prefill") as tracer:
        for _ in range(3):
            assert torch.equal(tokens(case.model.generate(**kw)), plain), "tracing changed the tokens"
    assert dynamo_state() == before, "tracing made dynamo compile again or broke a graph"
    assert hook_state(case.model) == hooks
    assert torch.equal(tokens(case.model.generate(**kw)), plain)  # untraced again: same graphs
    assert dynamo_state() == before
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and rec.output_tokens == 6 and len(rec.decode_step_ms) == 5
        assert (rec.vision_ms is not None) == (family != "llama")
        assert len([s for s in rec.spans if s.name.startswith("layer")]) == 2  # prefill layers only


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_forward_compiled_by_hand_is_traced_unchanged(mode):
    """The hand-compiled recipe: a static cache, initialized before the compiled forward sees it.

    transformers initializes a static cache lazily, inside the first forward; when that
    forward is compiled too (prefill included), the cache's tensors become CUDA-graph
    outputs and the next replay overwrites them, untraced as well. Its own advice:
    ``early_initialization`` first (and reset the cache between calls).
    """
    case = build_on("llama", "cuda")
    generate = compile_forward_by_hand(case, "cuda", 6, mode=mode)
    fresh_dynamo()
    plain = generate()
    for _ in range(2):  # settle dynamic shapes and record the graphs
        assert torch.equal(generate(), plain)
    before = dynamo_state()
    assert before.get("frames.ok", 0) >= 1 and before["graph_breaks"] == 0, before
    with stagetrace.trace(case.model) as tracer:
        for _ in range(3):
            assert torch.equal(generate(), plain)
    assert dynamo_state() == before
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and len(rec.decode_step_ms) == 5 and rec.prompt_tokens == case.prompt_len


def test_compiled_decode_steps_time_known_gpu_work():
    """A spin of known length inside every decode step shows up in that step's time and lead.

    The lead at a step's forward return is the spin less the host's own time from issuing
    the spin to that return (inputs, the graph launch, generate()'s per-step work). That
    host time is read here, not assumed: on a slow host it ate 1.0-1.4 ms of a 2 ms spin,
    and the verdict "host-bound" was then the truth, not a fault.
    """
    import time

    from stagetrace.labels import Kind, kind_of
    from stagetrace.testing.reference import spin_cycles_per_us

    spin_us = 4000.0  # long against any host's per-step work, so the GPU must lead
    case = build_on("llama", "cuda")
    case.model.generation_config.cache_implementation = "static"
    cycles = int(spin_cycles_per_us() * spin_us)  # GPU work per step, issued outside the graph
    inner = case.model.prepare_inputs_for_generation
    spin_issued_ns: list[int] = []

    def prepare_with_spin(*args, **kwargs):
        torch.cuda._sleep(cycles)
        spin_issued_ns.append(time.monotonic_ns())  # the clock host marks are read on
        return inner(*args, **kwargs)

    case.model.prepare_inputs_for_generation = prepare_with_spin
    kw = gen_kwargs(case, 5)
    fresh_dynamo()
    case.model.generate(**kw)
    case.model.generate(**kw)
    spin_issued_ns.clear()
    with stagetrace.trace(case.model, lead_every=1) as tracer:  # every step's lead (the default samples)
        case.model.generate(**kw)
    rec = tracer.records[0]
    assert_partition(rec)
    assert rec.compiled_decode and len(rec.decode_step_ms) == 4
    for step_ms in rec.decode_step_ms:
        assert spin_us / 1e3 <= step_ms <= spin_us / 1e3 + 3.0, rec.decode_step_ms
    marks = rec.marks
    returns_ns = marks.host_ns[(kind_of(marks.labels) == Kind.FORWARD_RETURN) & marks.issued_by_host].tolist()
    assert len(returns_ns) == len(spin_issued_ns) == 5  # the prefill's forward, then 4 decode steps
    host_us = [(r - s) / 1e3 for r, s in zip(returns_ns[1:], spin_issued_ns[1:])]
    why = (rec.decode_step_verdict, rec.decode_step_lead_us, rec.decode_step_gpu_bound_ms, host_us)
    assert None not in rec.decode_step_lead_us, why
    for lead_us, gpu_bound_ms, host_step_us in zip(rec.decode_step_lead_us, rec.decode_step_gpu_bound_ms, host_us):
        # at least the spin less the host's time to the return (more if the GPU was still busy
        # when the spin was issued); at most the spin plus a little backlog
        assert spin_us - host_step_us - 200 <= lead_us <= spin_us + 500, why
        # the GPU-bound time counts from the return's issue: a lower bound of the same size
        assert (spin_us - host_step_us - 200) / 1e3 <= gpu_bound_ms <= (spin_us + 500) / 1e3, why
    if max(host_us) < spin_us / 2:  # the GPU was behind for most of every step
        assert "host-bound" not in rec.decode_step_verdict, why


def test_decode_first_compiled_under_tracing_serves_untraced_calls_too():
    """The first compiled call may happen while traced: graphs then serve untraced calls too."""
    case = build_on("llava", "cuda")
    case.model.generation_config.cache_implementation = "static"
    kw = gen_kwargs(case, 4)
    fresh_dynamo()
    with stagetrace.trace(case.model) as tracer:
        first = tokens(case.model.generate(**kw))
        second = tokens(case.model.generate(**kw))
    state = dynamo_state()
    assert torch.equal(first, second) and torch.equal(tokens(case.model.generate(**kw)), first)
    assert dynamo_state() == state and state["graph_breaks"] == 0
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and len(rec.decode_step_ms) == 3

