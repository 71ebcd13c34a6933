"""Generative models whose encoder is NOT vision: what the tracer does with them, as it is today.

Every model type of the installed transformers' multimodal-LM and seq2seq-LM mappings that is in
neither the image-text-to-text nor the causal-LM mapping (``zoo_audio.model_types()``): audio and
speech LMs (an audio encoder, tokenizer or codec feeding a language model) and text
encoder–decoders. Each is built tiny with random weights (``stagetrace/testing/zoo_audio.py``),
generates greedily at batch 1 on the CPU, and is traced at stage level; the runs of its
non-vision encoder are timed with host-clock hooks (the CPU backend's clock) and placed in the
record's stages.

What holds everywhere: the same tokens traced and untraced, an exact partition, one decode step
per token after the first. An audio encoder has no stage: its runs are marked and the record says,
measured, in which stages that time is counted (or, where it ran unmarked, that it is unseparated).
What each test then asks is what the README promises; none is silently wrong today (two were,
fixed in session 10: Seamless M4T's text encoder taken for vision, FSMT's prefill ended at the
decoder's embedding).
"""
from __future__ import annotations


import pytest
import torch

from stagetrace.testing.zoo_audio import build, kind_of, model_types

from helpers import assert_partition, cached_cases, before_first_step, stage_of, tokens, traced_with_runs

TYPES = model_types()
AUDIO = [t for t in TYPES if kind_of(t) == "audio-lm"]
TEXT = [t for t in TYPES if kind_of(t) == "text-seq2seq"]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # the audio notes are RuntimeWarnings too: read here
              pytest.mark.filterwarnings("ignore:stagetrace. call .*(non-vision encoder|audio inputs):RuntimeWarning")]

# ------------------------------------------------------------------------------ the cases
_case = cached_cases(build)


# ------------------------------------------------------------------------------ the tests
def test_the_survey_is_the_mappings():
    """The types come from the mappings' structure, not from a hand list; every one is classified."""
    assert len(TYPES) == len(set(TYPES)) and set(AUDIO) | set(TEXT) == set(TYPES)
    from transformers.models.auto import modeling_auto as m

    for t in TYPES:
        assert t in m.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES or t in m.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        assert t not in m.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and t not in m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    assert {"t5", "qwen2_audio", "voxtral"} <= set(TYPES)


@pytest.mark.parametrize("model_type", TYPES)
def test_stages_are_exact(model_type):
    """Same tokens traced and untraced, an exact partition, one decode step per token after the
    first, no vision stage for a call that was given no image, and no warning but the audio note."""
    case = _case(model_type)
    plain = tokens(case.generate())
    rec, _, out, _ = traced_with_runs(case, [])
    assert torch.equal(plain, tokens(out)), "tracing changed the generated tokens"
    assert_partition(rec)
    assert rec.output_tokens == case.generated(out) == case.new_tokens
    assert len(rec.decode_step_ms) == rec.output_tokens - 1
    assert rec.vision_ms is None, f"a call given no image reports vision_ms={rec.vision_ms}"
    assert [w for w in rec.warnings if "audio" not in w] == []
    assert len(rec.warnings) == (case.kind == "audio-lm"), rec.warnings


@pytest.mark.parametrize("model_type", TYPES)
def test_encoder_time_is_where_the_record_says(model_type):
    """Text encoder–decoders: the encoder's run is the start of prefill (README: "an encoder that
    does not take the image starts prefill") and lies inside it. Audio LMs: the record says in which
    stages the audio encoder's runs before the first decode step are counted — exactly those where
    the hooks find them — or that it ran unmarked; never silently part of another stage."""
    case = _case(model_type)
    rec, runs, _, _ = traced_with_runs(case, case.encoder_modules)
    ran = before_first_step(rec, runs)
    assert ran, f"none of {case.encoder_modules} ran before the first decode step"
    where = {p: sorted({stage_of(rec, a, b) for a, b in r}) for p, r in ran.items()}
    if case.kind == "text-seq2seq":
        assert all(w == ["prefill"] for w in where.values()), where
        (prefill,) = rec.spans.of_kind("prefill")
        first = min(a for r in ran.values() for a, _ in r)
        # prefill starts at the encoder's start: only the hook's own call lies between the two
        assert 0 <= first - (rec.host_start_ns + prefill.start_ns) < 1_000_000
        return
    # every run, decode steps included (a streaming encoder runs in each step)
    stages = {stage_of(rec, a, b).split()[0].replace("step", "decode") for r in runs.values() for a, b in r}
    (said,) = [w for w in rec.warnings if "audio" in w]
    if "was marked" in said:  # encoded where stagetrace does not look (Kyutai's codec): said, not measured
        assert "no audio stage" in said and "unseparated" in said, said
        return
    named = {s for s in ("vision", "prefill", "decode", "other") if f"{s}_ms (" in said}
    assert named == stages, f"the record counts the audio encoder in {named}, its runs lie in {stages}: {said}"


@pytest.mark.parametrize("model_type", TYPES)
def test_prefill_holds_the_first_decoder_forward(model_type):
    """Prefill ends at lm_head's end in the first forward: the language model's (decoder's) first run
    lies inside prefill, and its later runs are decode steps."""
    case = _case(model_type)
    rec, runs, _, tracer = traced_with_runs(case, [case.decoder_module])
    (lm,) = runs.values()
    assert len(lm) == case.new_tokens, f"{case.decoder_module} ran {len(lm)} times for {case.new_tokens} tokens"
    (prefill,) = rec.spans.of_kind("prefill")
    p0, p1 = rec.host_start_ns + prefill.start_ns, rec.host_start_ns + prefill.end_ns
    a, b = lm[0]
    # a head inside the decoder (FSMT's output_projection) ends prefill before the decoder returns
    head_inside = tracer.layout.lm_head[0].startswith(case.decoder_module + ".")
    # where the timed module is the one whose start the tracer marks, its pre-hook fires a few µs
    # before that mark: its end, and nearly all of its run, must be inside prefill
    assert p0 <= b and (head_inside or b <= p1) and (min(b, p1) - max(a, p0)) >= 0.9 * (b - a), (
        f"its first run [{(a - p0) / 1e6:.3f}, {(b - p0) / 1e6:.3f}] ms is not inside prefill "
        f"[0, {(p1 - p0) / 1e6:.3f}] ms; it lies in {stage_of(rec, a, b)}")
    assert [stage_of(rec, a, b) for a, b in lm[1:]] == [f"step {i}" for i in range(len(lm) - 1)]


@pytest.mark.parametrize("model_type", TYPES)
def test_layer_detail_marks_decoder_layers(model_type):
    """layer_detail="all": the layers marked are the language model's (decoder's), and every decode
    step carries their spans. An omni model's are its thinker's, the inner model it generates with
    (before session 11 its talker's, which never runs for text, were taken)."""
    case = _case(model_type)
    rec, _, _, tracer = traced_with_runs(case, [], layer_detail="all")
    assert_partition(rec)
    assert not any("no decoder layer ran" in w for w in rec.warnings), rec.warnings
    outside = [p for p, _ in tracer.layout.layers if not p.startswith(case.decoder_module + ".")]
    assert not outside, f"layers marked as decoder layers lie outside {case.decoder_module}: {outside}"
    assert rec.layer_steps == list(range(len(rec.decode_step_ms))), (
        f"decode steps with layer spans: {rec.layer_steps} of {len(rec.decode_step_ms)}, and no warning")
