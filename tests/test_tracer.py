"""The stage tracer on real transformers architectures (tiny, random weights)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import stagetrace
from stagetrace.labels import Kind, kind_of
from stagetrace.testing import tiny
from stagetrace.tracing import TracingError

from helpers import (DEVICES, assert_partition, build_on, gen_kwargs, hook_state, stagetrace_leftovers, tokens, trace_once,
                     zoo_case)

FAMILIES = list(tiny.FAMILIES)
VLMS = [f for f in FAMILIES if f != "llama"]
HF = [f for f in FAMILIES if f != "molmo_like"]


def _check_family(family: str, device: str, new_tokens: int = 5, **build_kw) -> stagetrace.StageRecord:
    case = build_on(family, device, **build_kw)
    plain = tokens(case.model.generate(**gen_kwargs(case, new_tokens)))
    # after a first call: transformers installs hooks of its own (output capture) lazily
    before = hook_state(case.model)
    with stagetrace.trace(case.model) as tracer:
        traced = tokens(case.model.generate(**gen_kwargs(case, new_tokens)))
    assert torch.equal(plain, traced), "tracing changed the generated tokens"
    assert hook_state(case.model) == before, "hooks left behind"
    (rec,) = tracer.records
    assert_partition(rec)
    assert rec.output_tokens == new_tokens
    assert len(rec.decode_step_ms) == rec.output_tokens - 1
    assert rec.batch_size == case.inputs["input_ids"].shape[0]
    assert rec.prompt_tokens == case.prompt_len
    has_images = build_kw.get("images", True) and family != "llama"
    assert (rec.vision_ms is not None) == has_images
    if has_images:
        assert rec.vision_ms > 0
    assert rec.backend == ("cuda" if device == "cuda" else "cpu") and rec.device.startswith(device)
    if family != "molmo_like":  # its own generate loop never hands a forward back through generate()
        # every forward's return to generate() is marked, so every step has a lead at stage level
        returns = int(np.sum(kind_of(rec.marks.labels) == Kind.FORWARD_RETURN))
        assert returns == 1 + len(rec.decode_step_ms)
        assert None not in rec.decode_step_lead_us
        assert set(rec.decode_step_verdict) <= ({"n/a"} if device == "cpu" else {"host-bound", "gpu-bound", "mixed"})
    return rec


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
class TestEveryFamily:
    def test_stages_present_positive_and_exact_with_unchanged_tokens(self, family, device):
        _check_family(family, device)

    def test_batch_of_two_with_left_padding(self, family, device):
        _check_family(family, device, batch=2, left_pad=2)

    def test_a_single_new_token_has_no_decode_steps(self, family, device):
        rec = _check_family(family, device, new_tokens=1)
        assert rec.decode_ms == 0 and rec.decode_step_ms == [] and rec.ttft_ms == rec.total_ms

    def test_a_call_without_images_has_no_vision_stage(self, family, device):
        if family == "llama":
            pytest.skip("text-only")
        rec = _check_family(family, device, images=False)
        assert rec.vision_ms is None

    def test_beam_search_times_every_search_step(self, family, device):
        if family == "molmo_like":
            pytest.skip("Molmo's own generate loop is greedy only")
        case = build_on(family, device)
        rec = trace_once(case, gen_kwargs(case, 4, num_beams=2))
        assert rec.output_tokens == 4 and len(rec.decode_step_ms) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_several_calls_give_several_records(device):
    case = build_on("llava", device)
    with stagetrace.trace(case.model) as tracer:
        for n in (2, 3, 4):
            case.model.generate(**gen_kwargs(case, n))
    assert [r.call_index for r in tracer.records] == [0, 1, 2]
    assert [len(r.decode_step_ms) for r in tracer.records] == [1, 2, 3]


class _Sleep:
    """Forward post-hooks that pad stages with known host sleeps.

    Registered before the tracer, so they run before the tracer's end marks and fall
    inside the stage. On CUDA the GPU idles while the host sleeps, so the sleep shows
    on the GPU timeline too.
    """

    def __init__(self, model, vision_s: float, prefill_s: float, step_s: float):
        self.handles = [
            model.model.vision_tower.register_forward_hook(lambda m, a, o: time.sleep(vision_s)),
            model.model.language_model.register_forward_hook(
                lambda m, a, o, **k: time.sleep(prefill_s if o.last_hidden_state.shape[1] > 1 else step_s)),
        ]


class _HostRuns:
    """The host clock at the boundaries the tracer marks, taken by hooks of our own: each run's
    start of the vision tower, the language model and the top-level forward, each run's end
    of the projector and the lm_head. A stage and the host interval between the same
    boundaries then see the same scheduler stalls, so they can be compared tightly on a
    loaded 2-core box, where a bound on the padding alone cannot (a 30 ms sleep read 48 and
    229 ms under load: the stall, not the tracer)."""

    def __init__(self, model):
        self.ns: dict[str, list[int]] = {}
        now = time.perf_counter_ns
        pre = {"vision": model.model.vision_tower, "lm": model.model.language_model, "forward": model}
        post = {"projector": model.model.multi_modal_projector, "head": model.lm_head}
        for key, mod in pre.items():
            mod.register_forward_pre_hook(lambda m, a, key=key: self.ns.setdefault(key, []).append(now()))
        for key, mod in post.items():  # after every other post-hook (the sleeps'), before the tracer's wrapper returns
            mod.register_forward_hook(lambda m, a, o, key=key: self.ns.setdefault(key, []).append(now()))

    def ms(self, start: str, end: str, k: int = 0, k_end: int | None = None) -> float:
        return (self.ns[end][k if k_end is None else k_end] - self.ns[start][k]) / 1e6

    def clear(self) -> None:
        self.ns.clear()


@pytest.mark.parametrize("device", DEVICES)
def test_stages_padded_with_known_sleeps_measure_them(device):
    case = build_on("llava", device)
    vision_s, prefill_s, step_s = 0.030, 0.020, 0.008
    _Sleep(case.model, vision_s, prefill_s, step_s)
    runs = _HostRuns(case.model)
    case.model.generate(**gen_kwargs(case, 2))  # warm-up
    runs.clear()
    with stagetrace.trace(case.model) as tracer:
        case.model.generate(**gen_kwargs(case, 4))
    rec = tracer.records[0]
    assert_partition(rec)
    # each stage holds its padding: the sleeps lie between its marks
    assert rec.vision_ms >= vision_s * 1e3 and rec.prefill_ms >= prefill_s * 1e3
    assert all(step >= step_s * 1e3 for step in rec.decode_step_ms)
    # and is the host's own interval between the same boundaries, within what the marks and
    # the tiny model's glue between them take (the GPU may lag the host by a little on CUDA)
    tol_ms = 3.0
    assert abs(rec.vision_ms - runs.ms("vision", "projector")) <= tol_ms, (rec.vision_ms, runs.ns)
    assert abs(rec.prefill_ms - runs.ms("lm", "head")) <= tol_ms, (rec.prefill_ms, runs.ns)
    for k, step in enumerate(rec.decode_step_ms[:-1]):  # a step: from its forward's start to the next one's
        assert abs(step - runs.ms("forward", "forward", k + 1, k + 2)) <= tol_ms, (k, step, runs.ns)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_detail_adds_nested_layer_spans_without_changing_stages(device):
    case = build_on("llava", device)
    plain = tokens(case.model.generate(**gen_kwargs(case, 3)))
    before = hook_state(case.model)
    for detail, per_step in (("prefill", False), ("all", True)):
        with stagetrace.trace(case.model, layer_detail=detail) as tracer:
            assert torch.equal(tokens(case.model.generate(**gen_kwargs(case, 3))), plain)
        assert hook_state(case.model) == before, "layer wrappers left behind"
        rec = tracer.records[0]
        assert_partition(rec)
        layers = [s for s in rec.spans if s.name.startswith("layer")]
        n_layers = case.model.config.text_config.num_hidden_layers
        assert len(layers) == n_layers * (1 + (2 if per_step else 0))
        assert all(s.dur_ns >= 0 for s in layers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("every", [1, 3, 10])
def test_sampled_layer_detail_marks_the_prefill_and_every_nth_step_and_says_which(every, device):
    case = build_on("llava", device)
    plain = tokens(case.model.generate(**gen_kwargs(case, 8)))
    with stagetrace.trace(case.model, layer_detail="all", layer_every=every) as tracer:
        assert torch.equal(tokens(case.model.generate(**gen_kwargs(case, 8))), plain)
    (rec,) = tracer.records
    assert_partition(rec)
    n_layers = case.model.config.text_config.num_hidden_layers
    sampled = list(range(0, 7, every))  # 7 decode steps: 0, N, 2N, ...
    assert rec.layer_steps == sampled and rec.layer_every == every and not rec.warnings
    steps = [s for s in rec.spans if s.kind == "step"]
    for k, step in enumerate(steps):
        inside = [s for s in rec.spans if s.kind == "layer" and step.start_ns <= s.start_ns <= step.end_ns
                  and s.depth == 3]
        assert len(inside) == (n_layers if k in sampled else 0), (k, every)
    assert len([s for s in rec.spans if s.kind == "layer" and s.depth == 2]) == n_layers  # the prefill's, always
    back = stagetrace.StageRecord.from_dict(rec.to_dict())
    assert back.layer_steps == sampled and back.layer_every == every


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("every, layers", [(1, False), (3, False), (3, True), (10, False)])
def test_a_sampled_lead_marks_the_prefill_and_every_nth_steps_return_and_says_which(every, layers, device):
    """lead_every=N: the forward's return (the lead's mark at stage level) on the prefill and
    on decode steps 0, N, 2N, ...; the others have no lead at stage level and are unknown. With
    layer detail every step still has its layer marks' leads."""
    case = build_on("llava", device)
    plain = tokens(case.model.generate(**gen_kwargs(case, 8)))
    with stagetrace.trace(case.model, lead_every=every, layer_detail="all" if layers else "off") as tracer:
        assert torch.equal(tokens(case.model.generate(**gen_kwargs(case, 8))), plain)
    (rec,) = tracer.records
    assert_partition(rec)
    sampled = list(range(0, 7, every))  # 7 decode steps
    returns = int(np.sum(kind_of(rec.marks.labels) == Kind.FORWARD_RETURN))
    assert returns == 1 + len(sampled) and rec.lead_every == every and not rec.compiled_decode
    read = [k for k, lead in enumerate(rec.decode_step_lead_us) if lead is not None]
    assert read == (list(range(7)) if layers else sampled)
    assert rec.lead["decode"]["steps_read"] == len(read)
    unknown = "n/a" if device == "cpu" else "unknown"
    assert [v == unknown for v in rec.decode_step_verdict] == [
        device == "cpu" or k not in read for k in range(7)]
    back = stagetrace.StageRecord.from_dict(rec.to_dict())
    assert back.lead_every == every and back.lead == rec.lead


def test_lead_every_is_checked():
    case = tiny.build("llama")
    for bad in (0, -2, 1.5, True, "8"):
        with pytest.raises(ValueError, match="lead_every"):
            stagetrace.trace(case.model, lead_every=bad)
    assert stagetrace.trace(case.model).lead_every is None  # eager: every step; compiled: every 8th


@pytest.mark.parametrize("detail, every, expect", [
    ("all", 3, [True] + [k % 3 == 0 for k in range(7)]),
    ("prefill", 1, [True] + [False] * 7),
    ("all", 1, [True] * 8),
])
def test_layer_wrappers_are_in_place_only_for_forwards_that_carry_layer_marks(detail, every, expect):
    """A step that layer detail skips runs the layers' own forward: it pays nothing for them."""
    case = build_on("llama", "cpu")
    layer0 = stagetrace.trace(case.model).layout.layers[0][1]
    own_forward = layer0.forward
    wrapped: list[bool] = []
    handle = layer0.register_forward_pre_hook(lambda m, a: wrapped.append("forward" in m.__dict__))
    try:
        with stagetrace.trace(case.model, layer_detail=detail, layer_every=every) as tracer:
            case.model.generate(**gen_kwargs(case, 8))
            case.model.generate(**gen_kwargs(case, 8))  # again: the first forward places them back
    finally:
        handle.remove()
    assert wrapped == expect * 2
    assert all(r.layer_steps == [k for k, on in enumerate(expect[1:]) if on] for r in tracer.records)
    assert "forward" not in layer0.__dict__ and layer0.forward == own_forward
    assert not stagetrace_leftovers(case.model)


def test_layer_every_is_checked_and_refused_where_stamps_run_in_every_forward():
    case = tiny.build("llama")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="layer_every"):
            stagetrace.trace(case.model, layer_detail="all", layer_every=bad)
    from stagetrace.tracing.compiled import compiled_decode_refusal

    # compiled decode takes any layer_every (stamps per step: test_graph_stamps), so it has no say in it
    assert compiled_decode_refusal([torch.device("cpu")], "all", None) is None
    assert compiled_decode_refusal([torch.device("cpu")], "prefill", None) is None
    from stagetrace.tracing.compiled import hand_compiled_refusal  # stamps inside the forward: every forward

    layout = stagetrace.trace(case.model).layout
    assert "layer_every=1" in hand_compiled_refusal(layout, [torch.device("cpu")], "all", layer_every=4)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_layer_marks_give_the_same_spans_with_half_the_marks(device):
    case = build_on("llama", device)
    kw = gen_kwargs(case, 3)
    with stagetrace.trace(case.model, layer_detail="all") as pair:
        case.model.generate(**kw)
    with stagetrace.trace(case.model, layer_detail="all", layer_marks="shared") as shared:
        case.model.generate(**kw)
    a, b = pair.records[0], shared.records[0]
    assert_partition(b)
    n_layers, calls_of_layers = case.model.config.num_hidden_layers, 3  # prefill + 2 steps
    assert a.n_marks - b.n_marks == (n_layers - 1) * calls_of_layers and b.layer_marks == "shared"
    names = lambda r: [(s.name, s.depth) for s in r.spans]  # noqa: E731
    assert names(a) == names(b)
    layers = [s for s in b.spans if s.name.startswith("layer")]
    for first, second in zip(layers[:n_layers - 1], layers[1:n_layers]):
        assert first.end_ns == second.start_ns  # one boundary mark between them
    with pytest.raises(ValueError, match="layer_marks must be one of"):
        stagetrace.trace(case.model, layer_marks="none")


# ---------------------------------------------------------------- prefill/decode edge cases
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_is_one_prefill_stage(device):
    case = build_on("llama", device)
    rec = trace_once(case, gen_kwargs(case, 4, prefill_chunk_size=3))
    assert len(rec.decode_step_ms) == 3
    prefill_forwards = (rec.marks.labels & 0xFF == stagetrace.labels.Kind.PREFILL_FORWARD).sum()
    assert prefill_forwards == -(-case.prompt_len // 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llava", "molmo_like"])
def test_without_a_cache_every_later_forward_is_a_decode_step(family, device):
    case = build_on(family, device)
    rec = trace_once(case, gen_kwargs(case, 4, use_cache=False))
    assert len(rec.decode_step_ms) == 3 and rec.vision_ms > 0


@pytest.mark.parametrize("device", DEVICES)
def test_continuing_from_a_returned_cache_starts_with_a_prefill_of_the_new_tokens(device):
    case = build_on("llama", device)
    with stagetrace.trace(case.model) as tracer:
        first = case.model.generate(**gen_kwargs(case, 3), return_dict_in_generate=True)
        cache = first.past_key_values
        extra = torch.tensor([[5, 6, 7]], device=device)
        ids = torch.cat([first.sequences, extra], dim=1)
        mask = torch.ones_like(ids)
        second = case.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4,
                                     min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert second.shape[1] == ids.shape[1] + 4
    rec = tracer.records[1]
    assert_partition(rec)
    assert rec.output_tokens == 4 and len(rec.decode_step_ms) == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup"])
def test_assisted_decoding_steps_are_verification_forwards(mode, device):
    case = build_on("llama", device)
    extra = ({"assistant_model": build_on("llama", device, seed=1).model} if mode == "assistant"
             else {"prompt_lookup_num_tokens": 2})
    rec = trace_once(case, gen_kwargs(case, 6, **extra))
    assert 1 <= len(rec.decode_step_ms) <= rec.output_tokens - 1


def test_decode_forwards_whose_tokens_generate_drops_are_said_not_hidden():
    """transformers' deferred stopping check (5.24, on mps) runs one decode forward more and
    undoes its token: the record keeps that forward's time in decode and says so."""
    case = build_on("llama", "cpu")
    original = case.model.generate

    def generate_dropping_the_last_token(*args, **kwargs):
        return original(*args, **kwargs)[:, :-1]

    case.model.generate = generate_dropping_the_last_token
    with pytest.warns(RuntimeWarning, match="5 decode steps ran for 5 new tokens"):
        with stagetrace.trace(case.model) as tracer:
            case.model.generate(**gen_kwargs(case, 6))
    (rec,) = tracer.records
    assert_partition(rec)
    assert rec.output_tokens == 5 and len(rec.decode_step_ms) == 5
    assert any("did not return" in w for w in rec.warnings)
    del case.model.generate  # generate() as transformers wrote it: no such warning
    with stagetrace.trace(case.model) as tracer:
        case.model.generate(**gen_kwargs(case, 6))
    assert tracer.records[0].warnings == []


def test_an_output_that_is_no_token_sequences_is_not_counted_and_says_so(tmp_path):
    """MusicGen's generate() returns (batch, codebooks, frames) with its delay pattern undone, whose
    length is not the tokens it generated: its records said output_tokens 0 (or 3 of 4) with no word.
    Now output_tokens is None and the record says why; the stages stand, and the record round-trips."""
    from stagetrace.records import load_records

    case = zoo_case("musicgen")
    with pytest.warns(RuntimeWarning, match=r"not \(batch, tokens\).*output_tokens is None"):
        with stagetrace.trace(case.model, jsonl=tmp_path / "r.jsonl") as tracer:
            out = case.generate()
    (rec,) = tracer.records
    assert out.dim() == 3 and rec.output_tokens is None
    assert len(rec.decode_step_ms) == case.new_tokens - 1  # one decode forward per token after the first
    assert len(rec.warnings) == 1 and "cannot be counted" in rec.warnings[0]
    assert_partition(rec)
    (back,) = load_records(tmp_path / "r.jsonl")
    assert back.output_tokens is None and back.warnings == rec.warnings


@pytest.mark.parametrize("device", DEVICES)
def test_generate_from_inputs_embeds_only(device):
    case = build_on("llama", device)
    embeds = case.model.get_input_embeddings()(case.inputs["input_ids"])
    with stagetrace.trace(case.model) as tracer:
        out = case.model.generate(inputs_embeds=embeds, attention_mask=case.inputs["attention_mask"],
                                  max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    rec = tracer.records[0]
    assert_partition(rec)
    assert rec.output_tokens == out.shape[1] == 3 and len(rec.decode_step_ms) == 2


# ---------------------------------------------------------------- API and lifecycle
def test_start_stop_and_attach_trace_every_call_until_stopped():
    case = tiny.build("llama")
    before = hook_state(case.model)
    tracer = stagetrace.attach(case.model)
    assert tracer.active and hook_state(case.model) != before
    case.model.generate(**gen_kwargs(case, 2))
    case.model.generate(**gen_kwargs(case, 2))
    tracer.stop()
    case.model.generate(**gen_kwargs(case, 2))
    assert len(tracer.records) == 2 and hook_state(case.model) == before
    tracer.start()
    case.model.generate(**gen_kwargs(case, 2))
    tracer.stop()
    assert len(tracer.records) == 3


def test_the_tracer_works_as_a_decorator_and_tags_samples():
    case = tiny.build("llama")
    tracer = stagetrace.trace(case.model)

    @tracer
    def run():
        with tracer.sample("img-7"):
            case.model.generate(**gen_kwargs(case, 2))
        case.model.generate(**gen_kwargs(case, 2))

    run()
    assert not tracer.active
    assert [r.sample_id for r in tracer.records] == ["img-7", None]
    d = tracer.records[0].to_dict()
    assert d["sample_id"] == "img-7" and d["vision_ms"] is None and "marks" not in d
    assert d["model_class"] == "LlamaForCausalLM" and set(d["versions"]) == {"stagetrace", "torch", "transformers"}


def test_an_exception_inside_generate_records_nothing_and_leaves_the_tracer_usable():
    case = tiny.build("llava")
    fail = {"on": False}

    def boom(m, a, o):
        if fail["on"]:
            raise RuntimeError("boom in the projector")

    handle = case.model.model.multi_modal_projector.register_forward_hook(boom)
    case.model.generate(**gen_kwargs(case, 2))  # transformers adds its own hooks on a first call
    before = hook_state(case.model)
    fail["on"] = True
    tracer = stagetrace.trace(case.model)
    with pytest.raises(RuntimeError, match="boom"):
        with tracer:
            case.model.generate(**gen_kwargs(case, 3))
    assert tracer.records == [] and not tracer.active
    assert hook_state(case.model) == before, "an exception must still remove every hook"

    with tracer:  # usable again, also when the exception is caught inside the block
        with pytest.raises(RuntimeError):
            case.model.generate(**gen_kwargs(case, 3))
        fail["on"] = False
        case.model.generate(**gen_kwargs(case, 3))
    handle.remove()
    (rec,) = tracer.records
    assert_partition(rec)
    assert len(rec.decode_step_ms) == 2


def test_nested_tracing_of_one_model_is_a_clear_error():
    case = tiny.build("llama")
    with stagetrace.trace(case.model):
        with pytest.raises(TracingError, match="already being traced"):
            stagetrace.trace(case.model).start()


def test_a_generate_that_returns_new_tokens_alone_is_not_counted_as_prompt_and_says_so():
    """A model's own generate() that returns its new tokens alone would read as ``length - prompt``
    (here 3 - 6 < 0): the output does not begin with the prompt, so output_tokens is None, said."""
    case = tiny.build("llama")
    original = case.model.generate
    n_prompt = case.inputs["input_ids"].shape[1]
    case.model.generate = lambda **k: original(**k)[:, n_prompt:]
    with pytest.warns(RuntimeWarning, match="do not all begin with the"):
        with stagetrace.trace(case.model) as tracer:
            out = case.model.generate(**gen_kwargs(case, 3))
    (rec,) = tracer.records
    assert out.shape[1] == 3 and rec.output_tokens is None and len(rec.decode_step_ms) == 2
    assert_partition(rec)
    assert any(f"{n_prompt}-token prompt" in w and "output_tokens is None" in w for w in rec.warnings), rec.warnings


def test_a_user_patched_generate_is_restored():
    case = tiny.build("llama")
    calls = []
    original = case.model.generate

    def mine(*a, **k):
        calls.append(1)
        return original(*a, **k)

    case.model.generate = mine
    with stagetrace.trace(case.model) as tracer:
        case.model.generate(**gen_kwargs(case, 2))
    assert case.model.generate is mine and calls == [1] and len(tracer.records) == 1


def test_a_model_split_over_devices_other_than_gpus_is_refused():
    case = tiny.build("llama")
    case.model.lm_head.to("meta")  # parameters on two devices, as with a device_map that offloads
    with pytest.raises(TracingError, match=r"spread over \['cpu', 'meta'\].*not one offloaded to the CPU"):
        stagetrace.trace(case.model).start()
    assert "generate" not in case.model.__dict__


# ---------------------------------------------------------------- streams (GPU)
@pytest.mark.gpu
def test_generate_under_a_user_stream_marks_that_stream():
    case = build_on("llava", "cuda")
    plain = tokens(case.model.generate(**gen_kwargs(case, 3)))
    stream = torch.cuda.Stream()
    with stagetrace.trace(case.model) as tracer, torch.cuda.stream(stream):
        traced = tokens(case.model.generate(**gen_kwargs(case, 3)))
    assert torch.equal(plain, traced)
    rec = tracer.records[0]
    assert_partition(rec)
    assert rec.stream == stream.cuda_stream and set(rec.marks.streams.tolist()) == {stream.cuda_stream}


@pytest.mark.gpu
def test_the_raw_stream_handle_is_the_current_streams():
    """The call's set-up reads the current stream's raw handle (no torch.cuda.Stream object made):
    the same handle torch's own Stream gives, on the default stream, under a user's stream, and for a
    device given without an index."""
    from stagetrace.tracing.devices import current_stream_handle

    dev = torch.device("cuda", torch.cuda.current_device())
    assert current_stream_handle(dev) == torch.cuda.current_stream(dev).cuda_stream
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        assert current_stream_handle(dev) == current_stream_handle(torch.device("cuda")) == stream.cuda_stream
    assert current_stream_handle(dev) != stream.cuda_stream


@pytest.mark.gpu
def test_side_stream_work_the_model_waits_for_stays_in_its_stage():
    from stagetrace.testing.reference import spin_cycles_per_us

    case = build_on("llava", "cuda")
    cycles_per_ms = spin_cycles_per_us() * 1e3

    def side_work(module, args, output):  # 3 ms of GPU work on a side stream, waited for
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            torch.cuda._sleep(int(3 * cycles_per_ms))
        main.wait_stream(side)

    handle = case.model.model.vision_tower.register_forward_hook(side_work)
    with stagetrace.trace(case.model) as tracer:
        case.model.generate(**gen_kwargs(case, 3))
    handle.remove()
    rec = tracer.records[0]
    assert_partition(rec)
    # at least the 3 ms the main stream waited for; the rest is the tiny vision tower itself
    assert 3.0 <= rec.vision_ms <= 3.0 + 4.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("images", [True, False])
def test_molmo2_is_found_and_traced(images, device):
    try:
        case = build_on("molmo2", device, images=images)
    except ImportError as exc:
        pytest.skip(str(exc))
    except (TypeError, ValueError) as exc:  # another transformers' Molmo2Config
        pytest.skip(f"this transformers' Molmo2 differs: {exc}")
    found = stagetrace.trace(case.model).layout.describe()
    assert "model.get_image_features" in found["vision"]  # its own vision entry: encoder + projector
    assert (found["language_model"], found["lm_head"], found["layers"]) == ("model.language_model", "lm_head", 2)
    rec = trace_once(case, gen_kwargs(case, 4))
    assert (rec.vision_ms is not None) == images and len(rec.decode_step_ms) == 3


def test_a_wrapper_kept_past_stop_runs_untraced():
    case = tiny.build("llama")
    with stagetrace.trace(case.model) as tracer:
        kept = case.model.generate
    kept(**gen_kwargs(case, 2))
    assert tracer.records == []


def test_a_refused_start_leaves_a_user_patched_generate_alone():
    case = tiny.build("llava")

    def mine(*a, **k):
        return None

    case.model.generate = mine
    case.model.forward = torch.compile(case.model.forward)  # refused: a VLM with a compiled forward
    with pytest.raises(TracingError):
        stagetrace.trace(case.model).start()
    assert case.model.generate is mine


@pytest.mark.parametrize("how", ["positional", "inputs", "input_ids"])
def test_the_prompt_is_read_however_generate_is_given_it(how):
    case = tiny.build("llama")
    ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
    kw = dict(attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with stagetrace.trace(case.model) as tracer:
        if how == "positional":
            case.model.generate(ids, **kw)
        else:
            case.model.generate(**{how: ids}, **kw)
    rec = tracer.records[0]
    assert rec.prompt_tokens == ids.shape[1] and rec.output_tokens == 3 and len(rec.decode_step_ms) == 2


def test_a_second_threads_call_while_one_is_traced_is_refused_not_mixed():
    import functools
    import threading

    case = tiny.build("llava")
    kw = gen_kwargs(case, 4)
    inner = case.model.generate
    entered, release, errors = threading.Event(), threading.Event(), []

    with stagetrace.trace(case.model) as tracer:
        traced = case.model.generate
        original_prepare = case.model.prepare_inputs_for_generation

        @functools.wraps(original_prepare)  # generate() reads its signature
        def slow_prepare(*a, **k):  # holds the first call inside generate()
            entered.set()
            release.wait(10)
            return original_prepare(*a, **k)

        case.model.prepare_inputs_for_generation = slow_prepare
        first = threading.Thread(target=lambda: traced(**kw))
        first.start()
        assert entered.wait(10)

        def second() -> None:
            try:
                traced(**kw)
            except TracingError as exc:
                errors.append(str(exc))

        t2 = threading.Thread(target=second)
        t2.start()
        t2.join(10)
        release.set()
        first.join(10)
        case.model.prepare_inputs_for_generation = original_prepare
        traced(**kw)  # and the tracer is usable again
    assert errors and "second thread" in errors[0]
    assert len(tracer.records) == 2 and all(r.error is None for r in tracer.records)
    assert [len(r.decode_step_ms) for r in tracer.records] == [3, 3]
    assert case.model.generate == inner


def test_resolve_ms_covers_the_work_after_generate_returns():
    case = tiny.build("llava")
    with stagetrace.trace(case.model, layer_detail="all") as tracer:
        case.model.generate(**gen_kwargs(case, 8))
    (rec,) = tracer.records
    assert rec.resolve_ms > 0 and rec.build_ms > 0 and len(rec.host_spans) == len(rec.spans) > 8


@pytest.mark.parametrize("device", DEVICES)
def test_a_record_is_built_when_first_read_from_what_its_call_left(device):
    """The call hands back after its sync and host copies; the record is built on first read,
    and says what the call was given even if the caller reuses its buffers meanwhile."""
    case = build_on("llava", device)
    kw = gen_kwargs(case, 4)
    with stagetrace.trace(case.model, sample_id="a") as tracer:
        case.model.generate(**kw)
        assert len(tracer._unbuilt) == 1 and not tracer._records  # nothing built inside the call
        image_tokens = int((kw["input_ids"] == case.image_token_id).sum())
        kw["input_ids"].fill_(case.image_token_id)  # static-input serving: the next sample's prompt
        kw["attention_mask"].zero_()
        tracer.sample_id = "b"
        (rec,) = tracer.records
        assert not tracer._unbuilt and rec.build_ms > 0
    assert rec.image_tokens == image_tokens > 0 and rec.text_tokens == case.prompt_len - image_tokens
    assert rec.sample_id == "a" and rec.call_index == 0  # fixed when the call ended


def test_records_left_unread_are_built_at_stop_in_call_order_with_their_warnings():
    case = tiny.build("llava")
    kw = gen_kwargs(case, 3)
    with pytest.warns(RuntimeWarning, match="no vision stage was marked"):
        with stagetrace.trace(case.model, vision=[]) as tracer:
            for _ in range(3):
                case.model.generate(**kw)
            assert len(tracer._unbuilt) == 3
        assert not tracer._unbuilt  # stop() built them
    assert [r.call_index for r in tracer._records] == [0, 1, 2]
    with stagetrace.trace(case.model) as tracer:
        case.model.generate(**kw)
        tracer.clear()  # forgets records not built yet too
        case.model.generate(**kw)
    assert [r.call_index for r in tracer.records] == [0]


def test_unread_calls_are_built_in_batches_so_what_they_hold_stays_bounded(monkeypatch):
    from stagetrace.tracing import tracer as tracer_mod

    monkeypatch.setattr(tracer_mod, "UNBUILT_AT_MOST", 3)
    case = tiny.build("llava")
    kw = gen_kwargs(case, 2)
    with stagetrace.trace(case.model) as tracer:
        for n in (1, 2, 0, 1):  # the third call builds all three before it hands back
            case.model.generate(**kw)
            assert len(tracer._unbuilt) == n
    assert [r.call_index for r in tracer.records] == [0, 1, 2, 3]


def test_records_streamed_to_a_file_are_written_before_generate_hands_back(tmp_path):
    case = tiny.build("llava")
    path = tmp_path / "calls.jsonl"
    with stagetrace.trace(case.model, jsonl=path) as tracer:
        case.model.generate(**gen_kwargs(case, 3))
        assert len(path.read_text().splitlines()) == 1 and not tracer._unbuilt
    assert stagetrace.load_records(path)[0].build_ms > 0


def test_a_build_that_fails_leaves_the_call_to_be_built_again(monkeypatch):
    from stagetrace.tracing import tracer as tracer_mod

    case = tiny.build("llava")
    real = tracer_mod.build_record
    with stagetrace.trace(case.model) as tracer:
        case.model.generate(**gen_kwargs(case, 3))
        monkeypatch.setattr(tracer_mod, "build_record", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            tracer.records  # noqa: B018
        assert len(tracer._unbuilt) == 1
        monkeypatch.setattr(tracer_mod, "build_record", real)
        assert len(tracer.records) == 1 and tracer.records[0].error is None
