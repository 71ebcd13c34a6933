"""Sequence-to-sequence classes no other survey builds: what the tracer does with them, as it is today.

Every type of the installed transformers' seq2seq-LM and speech-seq2seq mappings whose class there is
neither an image-text-to-text or causal-LM class (:mod:`stagetrace.testing.zoo`) nor one of the
non-vision zoo's (:mod:`stagetrace.testing.zoo_audio`): the encoder–decoder classes of BART and its
kin (surveyed until now only as ``*ForCausalLM`` decoders), the speech encoder–decoders (Whisper,
Speech2Text, Moonshine, SpeechT5 …) and Seamless M4T's speech-to-text class
(``stagetrace/testing/zoo_s2s.py``). Plus Whisper as users call it: its own ``generate()`` choosing
the decoder prompt (start of transcript, language, task, no timestamps).

Each is built tiny with random weights, generates greedily at batch 1 on the CPU and is traced; the
runs of its encoder and decoder are timed with host-clock hooks (the CPU backend's clock) and placed
in the record's stages. Asked everywhere: the same tokens traced and untraced, an exact partition,
``output_tokens`` the new tokens generate() really returned, one decode step per token after the
first, ``prompt_tokens`` and ``batch_size`` what the call was given; a text encoder's run starts and
lies in prefill; an audio encoder's run is marked and the record says, measured, where it is counted
(or that it ran unmarked); layer detail marks the decoder's layers in every step. None is silently
wrong today (four were, fixed in session 10: Whisper's output_tokens, audio given as ``inputs=``,
Whisper's language detection taken for prefill, repeated decoding loops unsaid).
"""
from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import stagetrace
from stagetrace.layouts import LayoutError
from stagetrace.testing.zoo_s2s import build, class_name, kind_of, model_types, whisper_forced

from helpers import assert_partition, cached_cases, before_first_step, stage_of, tokens, traced_with_runs

WHISPER_FORCED = "whisper+forced"  # Whisper's own generate() with its language and task tokens
TYPES = model_types()
CASES = TYPES + [WHISPER_FORCED]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # the notes are RuntimeWarnings too: read here
              pytest.mark.filterwarnings("ignore:stagetrace. call .*(non-vision encoder|audio inputs|outside generate|"
                                         "decoding loop):RuntimeWarning")]

# Types whose head transformers' accessors do not name (get_output_embeddings() is None): trace()
# refuses them with a LayoutError that says which path to pass; traced with that override here.
OVERRIDES = {"dia": {"lm_head": "logits_dense"}}
# Types whose generate() returns no (batch, tokens) sequences: output_tokens None, and the record says why.
REFUSED = {"dia": r"returned sequences of shape \(1, \d+, 9\), not \(batch, tokens\)"}

# ------------------------------------------------------------------------------ the cases
_case = cached_cases(lambda case_id: whisper_forced(build("whisper")) if case_id == WHISPER_FORCED
                      else build(case_id))


def _type(case_id: str) -> str:
    return "whisper" if case_id == WHISPER_FORCED else case_id


def _traced(case_id: str, paths: list[str], **trace_kw: Any) -> tuple[Any, dict[str, list[list[int]]], Any, Any]:
    return traced_with_runs(_case(case_id), paths, **OVERRIDES.get(_type(case_id), {}), **trace_kw)


# ------------------------------------------------------------------------------ the tests
def test_the_survey_is_the_mappings():
    """The classes come from the mappings' structure, not from a hand list: none is one another survey
    builds, and the causal-LM types' encoder–decoder classes and the speech encoder–decoders are in."""
    from transformers.models.auto import modeling_auto as m

    from stagetrace.testing import zoo_audio

    elsewhere = ({*m.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values(), *m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()}
                 | {zoo_audio.class_name(t) for t in zoo_audio.model_types()})
    for t in TYPES:
        assert class_name(t) in (m.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(t),
                                 m.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.get(t))
        assert class_name(t) not in elsewhere
    assert {"bart", "marian", "prophetnet", "whisper", "speech_to_text", "seamless_m4t"} <= set(TYPES)
    assert kind_of("bart") == "text-seq2seq"
    assert kind_of("whisper") == kind_of("speech-encoder-decoder") == kind_of("pop2piano") == "audio-seq2seq"


@pytest.mark.parametrize("case_id", CASES)
def test_stages_are_exact(case_id):
    """Same tokens traced and untraced, an exact partition, output_tokens the new tokens returned and
    one decode step per token after the first, prompt_tokens and batch_size what the call was given,
    no vision stage, and no warning but the audio note."""
    case = _case(case_id)
    plain = tokens(case.generate())
    rec, _, out, _ = _traced(case_id, [])
    assert torch.equal(plain, tokens(out)), "tracing changed the generated tokens"
    assert_partition(rec)
    assert len(rec.decode_step_ms) == case.new_tokens - 1  # one decode forward per token after the first
    assert rec.vision_ms is None, f"a call given no image reports vision_ms={rec.vision_ms}"
    assert (rec.prompt_tokens, rec.batch_size) == (case.prompt_len, 1)
    assert rec.text_tokens == (case.prompt_len or None)  # an audio-only call has no text to count
    others = [w for w in rec.warnings if "audio" not in w]
    refused = REFUSED.get(_type(case_id))
    if refused:
        assert rec.output_tokens is None
        assert len(others) == 1 and re.search(refused, others[0]), others
    else:
        assert others == []
        assert rec.output_tokens == case.generated(out) == case.new_tokens
    assert len(rec.warnings) - len(others) == (case.kind == "audio-seq2seq"), rec.warnings


@pytest.mark.parametrize("model_type, how", [("speech_to_text", "input_features="), ("whisper", "positional"),
                                             ("speech-encoder-decoder", "inputs=")])
def test_an_audio_call_is_read_as_the_model_names_its_input(model_type, how):
    """Audio alone, at batch 2, given the three ways users give it: by its name, positionally (Whisper's
    docs: generate(input_features)), as generate()'s ``inputs``. The record counts batch 2, no prompt
    token and no text (positional mel features read as 80 prompt tokens, a waveform as 16000 prompt and
    text tokens, and the keyword call as batch 1, before), and says where the audio encoder ran."""
    case = build(model_type, batch=2)
    (name, audio), = [(k, v) for k, v in case.inputs.items() if v.is_floating_point()]
    rest = {k: v for k, v in case.inputs.items() if k != name}
    call = {"positional": ((audio,), rest)}.get(how, ((), {("inputs" if how == "inputs=" else name): audio, **rest}))
    with stagetrace.trace(case.model) as tracer:
        with torch.no_grad():
            case.model.generate(*call[0], **call[1], **case.generate_kwargs)
    (rec,) = tracer.records
    assert (rec.batch_size, rec.prompt_tokens, rec.text_tokens) == (2, 0, None)
    assert len(rec.decode_step_ms) == case.new_tokens - 1
    assert any("counted in prefill_ms" in w for w in rec.warnings), rec.warnings


@pytest.mark.parametrize("case_id", CASES)
def test_encoder_time_is_where_the_record_says(case_id):
    """The encoder generate() runs first starts prefill and lies inside it. An audio encoder's run is
    also marked, and the record says its time is counted in prefill_ms — or, where the audio reached
    the encoder as embeddings no audio mark sees (Pop2Piano), that it ran unmarked."""
    case = _case(case_id)
    rec, runs, _, _ = _traced(case_id, case.encoder_modules)
    ran = before_first_step(rec, runs)
    assert ran, f"none of {case.encoder_modules} ran before the first decode step"
    assert all(len(r) == 1 for r in runs.values()), f"the encoder ran more than once: {runs}"
    where = {p: sorted({stage_of(rec, a, b) for a, b in r}) for p, r in ran.items()}
    assert all(w == ["prefill"] for w in where.values()), where
    (prefill,) = rec.spans.of_kind("prefill")
    first = min(a for r in ran.values() for a, _ in r)
    # prefill starts at the encoder's start: only the hook's own call lies between the two
    assert 0 <= first - (rec.host_start_ns + prefill.start_ns) < 1_000_000
    notes = [w for w in rec.warnings if "audio" in w]
    if case.kind == "text-seq2seq":
        assert notes == []
        return
    (said,) = notes
    if "was marked" in said:
        assert "no audio stage" in said and "unseparated" in said, said
        return
    assert re.search(r"counted in prefill_ms \([\d.]+ ms\)$", said), said  # prefill alone, measured


@pytest.mark.parametrize("case_id", CASES)
def test_prefill_holds_the_first_decoder_forward(case_id):
    """Prefill ends at lm_head's end in the first forward: the decoder's first run lies inside
    prefill, and its later runs are decode steps."""
    case = _case(case_id)
    rec, runs, _, tracer = _traced(case_id, [case.decoder_module])
    (dec,) = runs.values()
    assert len(dec) == case.new_tokens, f"{case.decoder_module} ran {len(dec)} times for {case.new_tokens} tokens"
    (prefill,) = rec.spans.of_kind("prefill")
    p0, p1 = rec.host_start_ns + prefill.start_ns, rec.host_start_ns + prefill.end_ns
    a, b = dec[0]
    head_inside = tracer.layout.lm_head[0].startswith(case.decoder_module + ".")  # a decoder with its own head
    assert p0 <= a and (head_inside or b <= p1), (
        f"its first run [{(a - p0) / 1e6:.3f}, {(b - p0) / 1e6:.3f}] ms is not inside prefill "
        f"[0, {(p1 - p0) / 1e6:.3f}] ms; it lies in {stage_of(rec, a, b)}")
    assert [stage_of(rec, a, b) for a, b in dec[1:]] == [f"step {i}" for i in range(len(dec) - 1)]


@pytest.mark.parametrize("case_id", CASES)
def test_layer_detail_marks_decoder_layers(case_id):
    """layer_detail="all": the layers marked are the decoder's, in the prefill and in every step."""
    case = _case(case_id)
    rec, _, _, tracer = _traced(case_id, [], layer_detail="all")
    assert_partition(rec)
    outside = [p for p, _ in tracer.layout.layers if not p.startswith(case.decoder_module + ".")]
    assert tracer.layout.layers and not outside, (
        f"layers marked as decoder layers lie outside {case.decoder_module}: {outside}")
    assert not any("no decoder layer ran" in w for w in rec.warnings), rec.warnings
    prefill_layers = [s for s in rec.spans.of_kind("layer") if s.depth == 2]
    assert len(prefill_layers) == len(tracer.layout.layers)
    assert rec.layer_steps == list(range(len(rec.decode_step_ms)))


def test_whispers_language_detection_is_no_prefill_and_is_said():
    """Whisper's own generate() with no language given (a multilingual checkpoint's usual call) first
    runs one forward of the whole model to detect it, then its decoding loop. That forward was taken
    for the prefill, the loop's real prefill for decode step 0 (4 steps for 4 tokens, with a false
    'tokens dropped' warning) and the loop's encoder run for other. Now: a forward the loop did not
    prepare is none of its steps, marked and said, measured; prefill is the loop's encoder and first
    decoder forward."""
    case = whisper_forced(build("whisper"))
    del case.generate_kwargs["language"]
    plain = tokens(case.generate())
    rec, runs, out, tracer = traced_with_runs(case, ["model.encoder", "model.decoder"], layer_detail="all")
    assert torch.equal(plain, tokens(out))
    assert_partition(rec)
    assert rec.output_tokens == case.generated(out) == 4 and len(rec.decode_step_ms) == 3
    encoder, decoder = ([stage_of(rec, a, b) for a, b in runs[p]] for p in ("model.encoder", "model.decoder"))
    assert encoder == ["other", "prefill"] and decoder == ["other", "prefill", "step 0", "step 1", "step 2"]
    (prefill,) = rec.spans.of_kind("prefill")  # it starts at the loop's encoder run
    assert 0 <= runs["model.encoder"][1][0] - (rec.host_start_ns + prefill.start_ns) < 1_000_000
    assert rec.layer_steps == [0, 1, 2]
    assert len([s for s in rec.spans.of_kind("layer") if s.depth == 2]) == len(tracer.layout.layers)
    audio, aux = rec.warnings
    assert "ran 2 time(s)" in audio and "prefill_ms (" in audio and "other_ms (" in audio, audio
    assert aux.startswith("1 forward(s) of the model ran outside generate()'s decoding loop"), aux
    assert re.search(r"counted in other_ms \([\d.]+ ms\)$", aux), aux


@pytest.mark.parametrize("how", ["temperature fallback", "long-form"])
def test_whisper_running_its_loop_again_is_said(how):
    """Whisper's own generate() starts its decoding loop over: at the next temperature when a result
    fails its thresholds, and per 30 s segment of long-form audio (here 100 frames a segment). Each
    later loop's encoder run and prefill forward are counted in decode: said, with the loops counted
    (long-form had one step per token returned, and nothing but the audio note said so)."""
    case = whisper_forced(build("whisper"))
    if how == "long-form":  # 2.5 segments; timestamps are what long-form transcription runs on
        case.inputs = {"input_features": torch.randn(1, 80, 250, generator=torch.Generator().manual_seed(0)),
                       "attention_mask": torch.ones(1, 250, dtype=torch.long)}
        case.generate_kwargs.update(return_timestamps=True)
        case.model.generation_config.max_initial_timestamp_index = 5
    else:  # an unreachable log-probability threshold: the greedy result always falls back to sampling
        case.generate_kwargs.update(temperature=(0.0, 0.2), logprob_threshold=1e9)
    loops = 3 if how == "long-form" else 2
    rec, runs, out, _ = traced_with_runs(case, ["model.encoder", "model.decoder"])
    assert_partition(rec)
    assert len(runs["model.decoder"]) == loops * case.new_tokens == len(rec.decode_step_ms) + 1
    assert [stage_of(rec, a, b) for a, b in runs["model.encoder"]][0] == "prefill"
    said = [w for w in rec.warnings if w.startswith("generate() ran its decoding loop")]
    assert said == [f"generate() ran its decoding loop {loops} times (a model's own generate() starting over: "
                    "Whisper's temperature fallback, long-form segments): each later loop's prefill forward, and "
                    "the encoder run before it, are counted in decode, so decode_step_ms has "
                    f"{len(rec.decode_step_ms)} steps for the {rec.output_tokens} new tokens returned"], rec.warnings
    assert rec.output_tokens == case.generated(out)


@pytest.mark.parametrize("model_type", sorted(OVERRIDES))
def test_a_head_no_accessor_names_is_refused_with_the_override_to_pass(model_type):
    """Dia's head (``logits_dense``, channels x vocabulary) is not what get_output_embeddings() returns
    (None): trace() refuses before any call, naming the decoder it found and what to add."""
    case = _case(model_type)
    with pytest.raises(LayoutError, match=r"lm_head None") as refused:
        stagetrace.trace(case.model)
    assert "adding lm_head" in str(refused.value) and "logits_dense" in str(refused.value)
