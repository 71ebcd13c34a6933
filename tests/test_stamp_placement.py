"""The pass that moves layer stamps to right after their layer's last matmul
(``tracing.stamp_placement``, ``layer_marks="matmul"``).

The pass is checked on aten graphs of small functions (what inductor hands it: matmuls as
``mm``, views, pointwise ops and reductions), where it must move exactly where that keeps
the stamp's meaning and leave everything else alone; and through the tracer, with a test
backend that runs the configured post-grad pass on the graphs dynamo makes of generate()'s
compiled decode (inductor itself, and the kernels it saves, are for the GPU benchmark).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import stagetrace
from stagetrace.export.chrome import chrome_trace
from stagetrace.labels import AFTER_MATMUL, MAY_MOVE_TO_MATMUL, Kind, label
from stagetrace.low_level import graph_stamps as gs
from stagetrace.records import parse_record_line
from stagetrace.tracing import TracingError
from stagetrace.tracing.stamp_placement import (MoveStampsToLastMatmul, StampPassSlot,
                                                move_stamps_to_last_matmul)
from stagetrace.testing import tiny

from helpers import (assert_partition, build_on, compile_forward_by_hand, dynamo_state, gen_kwargs, hook_state,
                     static_compiled, tokens)

STAMP = torch.ops.stagetrace.stamp.default
LB0, LB1, LE1 = label(Kind.LAYER_BEGIN, 0), label(Kind.LAYER_BEGIN, 1), label(Kind.LAYER_END, 1)
MOVE = MAY_MOVE_TO_MATMUL  # what the tracer adds to the boundaries between layers under layer_marks="matmul"


def _ring():
    ring = gs.ring_for(torch.device("cpu"))
    ring.reset(0)
    return ring, gs.ring_id(ring)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _stamps(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is STAMP]


def _pre_norm_layers(rid: int, flag: int = MOVE):
    """Two pre-norm residual layers with stamps where the tracer puts them (shared labels)."""
    def fn(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        x = STAMP(x, rid, LB0)
        for i in range(2):
            if i:
                x = STAMP(x, rid, LB1 | flag)
            x = x + _rms(x) @ wa  # "attention"
            x = x + torch.relu(_rms(x) @ wb) @ wb.t()  # "MLP": its last matmul ends the layer's heavy work
        return STAMP(x, rid, LE1 | flag)
    return fn


def test_stamps_between_layers_move_to_the_last_matmul_and_say_so():
    ring, rid = _ring()
    x, wa, wb = torch.randn(3, 8), torch.randn(8, 8), torch.randn(8, 16)
    fn = _pre_norm_layers(rid)
    gm = make_fx(fn, tracing_mode="fake")(x, wa, wb)
    assert move_stamps_to_last_matmul(gm.graph) == 2
    gm.graph.lint()
    gm.recompile()
    stamps = _stamps(gm)
    assert [s.args[2] for s in stamps] == [LB0, LB1 | AFTER_MATMUL, LE1 | AFTER_MATMUL]
    # the first layer's begin follows no layer: it stays on the layer's input
    assert stamps[0].args[0].op == "placeholder"
    for s in stamps[1:]:
        assert s.args[0].target.overloadpacket is torch.ops.aten.mm, s.args[0]
        # nothing reads the matmul past its stamp: all of its work after it waits for the stamp
        assert list(s.args[0].users) == [s]
    # the same values, and the stamps taken in the same order, flagged
    ring.reset(0)
    assert torch.allclose(gm(x, wa, wb), fn(x, wa, wb))
    labels = ring.read(0)[0].tolist()
    assert labels[:3] == [LB0, LB1 | AFTER_MATMUL, LE1 | AFTER_MATMUL]


def test_a_post_norm_after_the_last_matmul_moves_with_it():
    """out = residual + norm(mlp(x)) (Gemma's post-norms): the reduction fuses, so the stamp moves."""
    _, rid = _ring()

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return STAMP(x + _rms(torch.relu(x @ w) @ w.t()), rid, LE1 | MOVE)

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(3, 8), torch.randn(8, 16))
    assert move_stamps_to_last_matmul(gm.graph) == 1
    (s,) = _stamps(gm)
    assert s.args[2] == LE1 | AFTER_MATMUL and s.args[0].target.overloadpacket is torch.ops.aten.mm


@pytest.mark.parametrize("case", ["parallel_branches", "scatter_after_matmul", "no_matmul", "sort_after_matmul"])
def test_a_stamp_stays_at_the_boundary_where_moving_it_would_change_what_it_times(case):
    _, rid = _ring()
    x, w = torch.randn(4, 8), torch.randn(8, 8)

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if case == "parallel_branches":  # attention and MLP side by side: neither matmul is last
            y = x + x @ w + torch.relu(x) @ w.t()
        elif case == "scatter_after_matmul":  # a MoE's combine: heavy work after the matmul
            y = x.index_add(0, torch.tensor([1, 0, 3, 2]), x @ w)
        elif case == "no_matmul":
            y = torch.relu(x) * 2
        else:  # work no compiler fuses, after the last matmul
            y = x + torch.sort(x @ w, dim=-1).values
        return STAMP(y, rid, LE1 | MOVE)

    gm = make_fx(fn, tracing_mode="fake")(x, w)
    assert move_stamps_to_last_matmul(gm.graph) == 0
    (s,) = _stamps(gm)
    assert s.args[2] == LE1 | MOVE  # unmoved: read back, the flag is stripped and nothing counted


def test_stamps_that_do_not_ask_to_move_stay_where_they_are():
    """Stamps at the boundaries (layer_marks="pair"/"shared") are left alone even with the pass on."""
    _, rid = _ring()
    gm = make_fx(_pre_norm_layers(rid, flag=0), tracing_mode="fake")(torch.randn(3, 8), torch.randn(8, 8),
                                                                      torch.randn(8, 16))
    assert move_stamps_to_last_matmul(gm.graph) == 0
    assert [s.args[2] for s in _stamps(gm)] == [LB0, LB1, LE1]


@pytest.mark.parametrize("lab", [label(Kind.LAYER_BEGIN, 0), label(Kind.DECODE_FORWARD), LE1, LE1 | AFTER_MATMUL])
def test_only_boundaries_between_layers_move_and_never_twice(lab):
    _, rid = _ring()

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return STAMP(x + x @ w, rid, lab)

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(2, 4), torch.randn(4, 4))
    assert move_stamps_to_last_matmul(gm.graph) == 0
    assert [s.args[2] for s in _stamps(gm)] == [lab]


def test_the_pass_slot_puts_back_what_was_there_and_refuses_a_slot_in_use():
    import torch._inductor.config as inductor_config

    def theirs(graph: torch.fx.Graph) -> None:
        pass

    with inductor_config.patch(post_grad_custom_pre_pass=None):  # (config modules: patch, not monkeypatch)
        slot = StampPassSlot()
        slot.place()
        assert isinstance(inductor_config.post_grad_custom_pre_pass, MoveStampsToLastMatmul)
        assert inductor_config.post_grad_custom_pre_pass.uuid()  # inductor's cache keys on it
        slot.remove()
        assert inductor_config.post_grad_custom_pre_pass is None
    with inductor_config.patch(post_grad_custom_pre_pass=theirs):
        case = tiny.build("llama")
        hooks = hook_state(case.model)
        with pytest.raises(TracingError, match="post_grad_custom_pre_pass"):
            stagetrace.trace(case.model, layer_detail="all", layer_marks="matmul").start()
        assert inductor_config.post_grad_custom_pre_pass is theirs and hook_state(case.model) == hooks
        stagetrace.trace(case.model, layer_detail="all", layer_marks="shared").start().stop()  # needs no pass
        assert inductor_config.post_grad_custom_pre_pass is theirs


def _post_grad_backend():
    """A dynamo backend that runs inductor's configured post-grad pass on the aten graph, then
    the graph itself (no code generation: fast, and the stamps' host twin stamps the ring)."""
    from torch._dynamo.backends.common import aot_autograd

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: object) -> torch.fx.GraphModule:
        import torch._inductor.config as inductor_config

        custom = inductor_config.post_grad_custom_pre_pass
        if custom is not None:
            custom(gm.graph)
            gm.recompile()
        return gm

    return aot_autograd(fw_compiler=compile_graph)


def test_matmul_layer_marks_in_compiled_decode_are_flagged_and_counted_in_the_record():
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from transformers import CompileConfig

    case = tiny.build("llama")
    static_compiled(case, "cpu")
    config = CompileConfig(backend=_post_grad_backend(), mode=None)
    config._compile_all_devices = True
    kw = gen_kwargs(case, 4, compile_config=config)
    torch._dynamo.reset()
    plain = tokens(case.model.generate(**kw))
    before = inductor_config.post_grad_custom_pre_pass
    # the same stamps at the boundaries first: their compiled graph must not serve the moved ones
    with pytest.warns(UserWarning, match="no longer fuse"), \
            stagetrace.trace(case.model, layer_detail="all", layer_marks="shared") as shared:
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert shared.records[0].layer_marks_after_matmul == 0 and not shared.records[0].error
    with pytest.warns(UserWarning, match="last matrix multiply"), \
            stagetrace.trace(case.model, layer_detail="all", layer_marks="matmul") as tracer:
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert inductor_config.post_grad_custom_pre_pass is before
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and not rec.error and rec.layer_marks == "matmul"
        # per decode step: layer 1's begin (the boundary after layer 0) and layer 1's end moved;
        # layer 0's begin stays; the prefill ran eagerly, at module boundaries
        assert rec.layer_marks_after_matmul == 2 * 3
        steps = [s for s in rec.spans if s.name.startswith("step ")]
        assert len(steps) == 3
        for step in steps:
            inside = [s for s in rec.spans if s.kind == "layer"
                      and step.start_ns <= s.start_ns and s.end_ns <= step.end_ns]
            assert [s.name for s in inside] == ["layer 0", "layer 1"]
            # each span says which of its ends sits after a matmul: layer 0 ends (and layer 1
            # starts) after layer 0's last matmul, layer 1 ends after its own
            assert [(s.starts_after_matmul, s.ends_after_matmul) for s in inside] == [(False, True), (True, True)]
        prefill_layers = [s for s in rec.spans if s.kind == "layer" and s.depth == 2]  # eager: at the boundaries
        assert prefill_layers and not any(s.starts_after_matmul or s.ends_after_matmul for s in prefill_layers)
        assert rec.to_dict()["layer_marks_after_matmul"] == 6
        assert list(parse_record_line(json.dumps(rec.to_dict(spans=True))).spans) == list(rec.spans)  # flags kept
        events = [e for e in chrome_trace([rec])["traceEvents"] if e.get("cat") == "layer"]
        assert sum(e["args"].get("ends") == "after this layer's last matmul" for e in events) == 2 * 3
        assert sum(e["args"].get("starts") == "after the previous layer's last matmul" for e in events) == 3


def test_matmul_layer_marks_inside_a_forward_compiled_by_hand():
    """The prefill runs compiled too: its stamps move as well, and the record counts them."""
    import torch._dynamo

    case = tiny.build("llama")
    generate = compile_forward_by_hand(case, "cpu", 4, cpu_backend=_post_grad_backend())
    torch._dynamo.reset()
    plain = generate()
    with pytest.warns(UserWarning, match="last matrix multiply"):
        tracer = stagetrace.trace(case.model, layer_detail="all", layer_marks="matmul").start()
    try:
        assert torch.equal(generate(), plain)
    finally:
        tracer.stop()
    (rec,) = tracer.records
    assert_partition(rec)
    assert not rec.error and rec.layer_marks_after_matmul == 2 * 4  # prefill and 3 steps: layer 1's begin, its end
    layers = [s for s in rec.spans if s.kind == "layer"]
    assert [(s.index, s.starts_after_matmul, s.ends_after_matmul) for s in layers] == [
        (0, False, True), (1, True, True)] * 4  # the compiled prefill's layers too


@pytest.mark.gpu
def test_matmul_layer_marks_under_inductor_and_cuda_graphs():
    """transformers' own compile (inductor, CUDA graphs): the pass runs in inductor, the moved
    stamps replay every step, tokens match the untraced run, and nothing recompiles."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    case = build_on("llama", "cuda")
    kw = gen_kwargs(case, 5, **static_compiled(case, "cuda"))
    torch._dynamo.reset()
    plain = tokens(case.model.generate(**kw))
    hooks = hook_state(case.model)
    before = inductor_config.post_grad_custom_pre_pass
    with stagetrace.trace(case.model, layer_detail="all", layer_marks="matmul") as tracer:
        with pytest.warns(UserWarning, match="last matrix multiply"):
            assert torch.equal(tokens(case.model.generate(**kw)), plain)  # fp32: the same tokens
        settled = dynamo_state()
        for _ in range(2):
            assert torch.equal(tokens(case.model.generate(**kw)), plain)
    assert dynamo_state() == settled, "the moved stamps recompiled after the first call"
    assert settled["graph_breaks"] == 0 and settled["cudagraph_skips"] == 0, settled
    assert hook_state(case.model) == hooks and inductor_config.post_grad_custom_pre_pass is before
    for rec in tracer.records:
        assert_partition(rec)
        assert rec.compiled_decode and not rec.error and len(rec.decode_step_ms) == 4
        assert rec.layer_marks_after_matmul == 2 * 4  # layer 1's begin and end, in each of 4 steps
        for step in [s for s in rec.spans if s.name.startswith("step ")]:
            inside = [s for s in rec.spans if s.name.startswith("layer")
                      and step.start_ns <= s.start_ns and s.end_ns <= step.end_ns]
            assert [s.name for s in inside] == ["layer 0", "layer 1"], (step, inside)
            assert inside[0].end_ns <= inside[1].start_ns
            assert [(s.starts_after_matmul, s.ends_after_matmul) for s in inside] == [(False, True), (True, True)]


def _text_config(family: str) -> object:
    import transformers as T

    small = dict(vocab_size=64, num_hidden_layers=3)
    attn = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return {
        "mixtral": lambda: T.MixtralConfig(**small, **attn, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**small, **attn, moe_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2, head_dim=8),
        "gemma2": lambda: T.Gemma2Config(**small, **attn, head_dim=8),
        "gptj": lambda: T.GPTJConfig(vocab_size=64, n_layer=3, n_embd=32, n_head=4, rotary_dim=4, bos_token_id=1,
                                     eos_token_id=2),
        "cohere": lambda: T.CohereConfig(**small, **attn, eos_token_id=2),
        "phi3": lambda: T.Phi3Config(**small, **attn, pad_token_id=0, eos_token_id=2),
        "qwen2": lambda: T.Qwen2Config(**small, **attn),
    }[family]()


@pytest.mark.parametrize("family, moved", [
    ("qwen2", 3), ("phi3", 3),    # pre-norm residual layers (Phi-3: one fused gate_up matmul)
    ("gemma2", 3),                # a post-norm after the last matmul: it fuses, the stamp moves
    ("mixtral", 0), ("qwen3_moe", 0),  # experts combined by a scatter after their matmuls: stays
    ("gptj", 0), ("cohere", 0),   # attention and MLP side by side: neither matmul is last
])
def test_the_pass_moves_by_structure_across_architectures(family, moved):
    """Real decoder stacks, stamped as the tracer stamps them under layer_marks="matmul": moved
    exactly where the layer ends in fusible work after one last matmul; same outputs."""
    import torch._dynamo
    import transformers
    from torch._dynamo.backends.common import aot_autograd

    from stagetrace.labels import layer_labels
    from stagetrace.layouts import resolve_layout
    from stagetrace.tracing.stamp_placement import movable_label

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_text_config(family)).eval()
    layers = [layer for _, layer in resolve_layout(model).layers]
    _, rid = _ring()
    labels = [tuple(lab | MOVE if lab is not None and movable_label(lab) else lab for lab in pair)
              for pair in layer_labels(len(layers), "matmul")]
    for layer, (begin, end) in zip(layers, labels):
        def forward(*a, _begin=begin, _end=end, _inner=layer.forward, **k):
            out = _inner(STAMP(a[0], rid, _begin), *a[1:], **k)
            if _end is None:
                return out
            return STAMP(out, rid, _end) if isinstance(out, torch.Tensor) else (STAMP(out[0], rid, _end), *out[1:])
        layer.forward = forward
    counts: list[int] = []

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: object) -> torch.fx.GraphModule:
        counts.append(move_stamps_to_last_matmul(gm.graph))
        gm.recompile()
        return gm

    ids = torch.randint(3, 60, (1, 7))
    torch._dynamo.reset()
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        out = torch.compile(lambda: model(input_ids=ids, use_cache=False).logits,
                            backend=aot_autograd(fw_compiler=compile_graph))()
    assert counts == [moved] and torch.allclose(out, reference, atol=1e-5)
