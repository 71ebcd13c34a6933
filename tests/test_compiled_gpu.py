"""Compiled decode on CUDA: what latency-minded users actually run.

transformers' static-cache path compiles the decode step with inductor and replays it as
CUDA graphs; a text-only model's forward may also be compiled by hand with
``mode="reduce-overhead"``. Tracing must add no graph break and no recompilation, leave
the tokens unchanged against the same compiled run untraced, and still partition exactly.
"""
from __future__ import annotations

import functools

import pytest
import torch

import stagetrace
from helpers import assert_partition, build_on, gen_kwargs, hook_state, tokens

pytestmark = pytest.mark.gpu


def _dynamo_state() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {**{f"frames.{k}": v for k, v in counters["frames"].items()},
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}


def _fresh_dynamo() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl"])
def test_builtin_compiled_decode_on_cuda_graphs_is_traced_unchanged(family):
    case = build_on(family, "cuda")
    case.model.generation_config.cache_implementation = "static"  # generate() compiles decode itself
    kw = gen_kwargs(case, 6)
    _fresh_dynamo()
    plain = tokens(case.model.generate(**kw))
    assert torch.equal(tokens(case.model.generate(**kw)), plain)  # CUDA graphs recorded and replayed
    before = _dynamo_state()
    assert before.get("frames.ok", 0) >= 1, "generate() did not compile the decode step"
    assert before["graph_breaks"] == 0 and before["cudagraph_skips"] == 0, before
    hooks = hook_state(case.model)
    with stagetrace.trace(case.model, layer_detail="prefill") as tracer:
        for _ in range(3):
            assert torch.equal(tokens(case.model.generate(**kw)), plain), "tracing changed the tokens"
    assert _dynamo_state() == before, "tracing made dynamo compile again or broke a graph"
    assert hook_state(case.model) == hooks
    assert torch.equal(tokens(case.model.generate(**kw)), plain)  # untraced again: same graphs
    assert _dynamo_state() == before
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
    from transformers import StaticCache

    case = build_on("llama", "cuda")
    cfg = case.model.config
    cache = StaticCache(config=cfg, max_cache_len=case.prompt_len + 6)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(case.inputs["input_ids"].shape[0], cfg.num_key_value_heads, head_dim,
                               case.model.dtype, torch.device("cuda"))
    compiled = torch.compile(case.model.forward, mode=mode)

    # What torch asks of a hand-compiled forward replayed as CUDA graphs (untraced too):
    # mark each invocation as a new step, or a replay overwrites the last one's outputs.
    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    case.model.forward = forward
    kw = gen_kwargs(case, 6, past_key_values=cache, disable_compile=True)  # transformers must not compile again

    def generate():
        cache.reset()
        return tokens(case.model.generate(**kw))

    _fresh_dynamo()
    plain = generate()
    for _ in range(2):  # settle dynamic shapes and record the graphs
        assert torch.equal(generate(), plain)
    before = _dynamo_state()
    assert before.get("frames.ok", 0) >= 1 and before["graph_breaks"] == 0, before
    with stagetrace.trace(case.model) as tracer:
        for _ in range(3):
            assert torch.equal(generate(), plain)
    assert _dynamo_state() == before
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and len(rec.decode_step_ms) == 5 and rec.prompt_tokens == case.prompt_len


def test_compiled_decode_steps_time_known_gpu_work():
    """A spin of known length inside every decode step shows up in that step's time."""
    from stagetrace.low_level.reference import spin_cycles_per_us

    case = build_on("llama", "cuda")
    case.model.generation_config.cache_implementation = "static"
    cycles = int(spin_cycles_per_us() * 2000)  # 2 ms of GPU work per step, issued outside the graph
    inner = case.model.prepare_inputs_for_generation

    def prepare_with_spin(*args, **kwargs):
        torch.cuda._sleep(cycles)
        return inner(*args, **kwargs)

    case.model.prepare_inputs_for_generation = prepare_with_spin
    kw = gen_kwargs(case, 5)
    _fresh_dynamo()
    case.model.generate(**kw)
    case.model.generate(**kw)
    with stagetrace.trace(case.model) as tracer:
        case.model.generate(**kw)
    rec = tracer.records[0]
    assert_partition(rec)
    assert rec.compiled_decode and len(rec.decode_step_ms) == 4
    for step_ms in rec.decode_step_ms:
        assert 2.0 <= step_ms <= 2.0 + 3.0, rec.decode_step_ms


def test_decode_first_compiled_under_tracing_serves_untraced_calls_too():
    """The first compiled call may happen while traced: graphs then serve untraced calls too."""
    case = build_on("llava", "cuda")
    case.model.generation_config.cache_implementation = "static"
    kw = gen_kwargs(case, 4)
    _fresh_dynamo()
    with stagetrace.trace(case.model) as tracer:
        first = tokens(case.model.generate(**kw))
        second = tokens(case.model.generate(**kw))
    state = _dynamo_state()
    assert torch.equal(first, second) and torch.equal(tokens(case.model.generate(**kw)), first)
    assert _dynamo_state() == state and state["graph_breaks"] == 0
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and len(rec.decode_step_ms) == 3

