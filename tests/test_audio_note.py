"""A non-vision (audio) encoder has no stage: its runs are marked (AUDIO_BEGIN / AUDIO_END, which
the stage math ignores) and the record says, measured, in which stages that time is counted; audio
that reaches generate() and runs unmarked is said too. Never silently part of another stage."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import stagetrace
from stagetrace.labels import Kind, label
from stagetrace.spans import KIND_CODE, SpanTable
from stagetrace.stages import stages_from_marks
from stagetrace.tracing.record import audio_note, audio_runs

from helpers import assert_partition, tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AB, AE = label(Kind.AUDIO_BEGIN), label(Kind.AUDIO_END)
CB, CE, PF, DF = (label(k) for k in (Kind.CALL_BEGIN, Kind.CALL_END, Kind.PREFILL_FORWARD, Kind.DECODE_FORWARD))
LM, HE = label(Kind.LM_BEGIN), label(Kind.LM_HEAD_END)


def test_runs_pair_outermost_marks():
    """An entry calling another (the top model's get_audio_features calling its base model's) is one
    run; a stray end is ignored."""
    labels = np.array([CB, AE, AB, AB, AE, AE, PF, AB, AE, CE])
    t = np.arange(len(labels)) * 10
    assert audio_runs(labels, t) == [(20, 50), (70, 80)]


def test_stage_math_ignores_audio_marks():
    base = [CB, PF, LM, HE, DF, CE]
    with_audio = [CB, PF, LM, AB, AB, AE, AE, HE, DF, AB, AE, CE]
    t0, t1 = [0, 10, 20, 90, 100, 200], [0, 10, 20, 30, 31, 60, 61, 90, 100, 150, 170, 200]
    a, b = stages_from_marks(np.array(base), np.array(t0)), stages_from_marks(np.array(with_audio), np.array(t1))
    assert (a.total_ns, a.prefill_ns, a.decode_ns, a.other_ns, a.vision_ns) == \
        (b.total_ns, b.prefill_ns, b.decode_ns, b.other_ns, b.vision_ns)


def _spans(rows):
    kind, start, end = zip(*rows)
    return SpanTable([KIND_CODE[k] for k in kind], [-1] * len(rows), list(start), list(end), [1] * len(rows))


def test_note_splits_a_run_over_the_stages_it_crosses():
    """Measured per stage: 1 ms in other before prefill, 2 ms in prefill, 3 ms in decode step 1."""
    spans = _spans([("call", 0, 20_000_000), ("prefill", 5_000_000, 10_000_000), ("step", 12_000_000, 14_000_000),
                    ("step", 14_000_000, 20_000_000)])
    note = audio_note([(4_000_000, 7_000_000), (15_000_000, 18_000_000)], spans, ["model.audio_tower"])
    assert "(audio: model.audio_tower) ran 2 time(s) for 6.000 ms" in note
    assert note.endswith("counted in prefill_ms (2.000 ms), decode_ms (3.000 ms), other_ms (1.000 ms)"), note


def _traced(case, one_step_per_token=True):
    plain = tokens(case.generate())
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with stagetrace.trace(case.model) as tracer:
            out = case.generate()
        (rec,) = tracer.records
    assert torch.equal(plain, tokens(out)), "tracing changed the generated tokens"
    assert_partition(rec)
    if one_step_per_token:
        assert len(rec.decode_step_ms) == rec.output_tokens - 1
    assert [str(w.message).split(": ", 2)[-1] for w in said if "stagetrace" in str(w.message)] == rec.warnings
    return tracer, rec


@pytest.mark.parametrize("model_type, parts", [
    ("voxtral", ["get_audio_features", "model.get_audio_features"]),  # the model's own audio entries
    ("qwen2_audio", ["model.audio_tower"]),  # no entry: the module named like audio
    ("qwen3_omni_moe", ["thinker.get_audio_features", "thinker.model.get_audio_features"]),  # an inner generator's
])
def test_audio_lm_says_prefill_holds_its_audio_encoder(model_type, parts):
    from stagetrace.testing.zoo_audio import build

    tracer, rec = _traced(build(model_type))
    assert tracer.layout.describe()["audio"] == parts
    (note,) = rec.warnings
    ms = sum(float(x) for x in note.split("prefill_ms (")[1].split(" ms")[:1])
    assert f"(audio: {', '.join(parts)}) ran 1 time(s)" in note and "no audio stage" in note
    assert note.endswith(f"counted in prefill_ms ({ms:.3f} ms)"), note  # all of it, and nowhere else
    assert 0 < ms < rec.prefill_ms


def test_streaming_encoder_is_counted_in_prefill_and_every_step():
    from stagetrace.testing.zoo_audio import build

    _, rec = _traced(build("voxtral_realtime"))
    (note,) = rec.warnings
    assert f"ran {rec.output_tokens} time(s)" in note and "prefill_ms (" in note and "decode_ms (" in note


def test_a_streaming_encoder_under_a_compiled_decode_says_its_steps_runs_are_not_marked():
    """The hooks come off for compiled steps: the encoder's runs inside them are not marked, and
    the note says decode may hold more of its time instead of reading as prefill only."""
    from transformers import CompileConfig

    from stagetrace.testing.zoo_audio import build

    case = build("voxtral_realtime")
    case.model.generation_config.cache_implementation = "static"
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True  # what a CUDA device gets by default
    case.generate_kwargs["compile_config"] = config
    _, rec = _traced(case)
    (note,) = rec.warnings
    assert rec.compiled_decode and "ran 1 time(s)" in note and "prefill_ms (" in note
    assert note.endswith("the decode steps were compiled, and runs inside them are not marked, so decode_ms may "
                         "hold more of it"), note


def test_audio_encoded_outside_any_mark_is_said():
    """Kyutai's codec encodes inside generate()'s input preparation (codec_model.encode, not a forward)."""
    from stagetrace.testing.zoo_audio import build

    _, rec = _traced(build("kyutai_speech_to_text"))
    (note,) = rec.warnings
    assert note.startswith("audio inputs (input_values) reached generate() but no run of an audio encoder was marked")
    assert "unseparated" in note


def test_an_encoder_that_takes_audio_starts_prefill_and_is_said():
    """Whisper (speech seq2seq): its encoder starts prefill, as any encoder–decoder's that does not
    take the image; its whole run is in prefill, and the record says so."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from stagetrace.testing.zoo_audio import AudioCase

    cfg = WhisperConfig(vocab_size=512, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=50, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
                        eos_token_id=2, bos_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    case = AudioCase("whisper", model, {"input_features": torch.randn(1, 80, 100)},
                     dict(max_new_tokens=4, min_new_tokens=4, do_sample=False), "encoder-decoder", 0)
    # Whisper's generate() returns the tokens after its decoder prompt: all 4 are new, one step each
    tracer, rec = _traced(case)
    assert rec.output_tokens == 4
    assert tracer.layout.describe()["audio"] == ["model.encoder"] == [tracer.layout.describe()["prefill_encoder"]]
    notes = [w for w in rec.warnings if "audio" in w]
    assert len(notes) == 1 and notes[0].endswith(" ms)") and "counted in prefill_ms (" in notes[0]
    assert "other_ms" not in notes[0], notes[0]


def test_text_models_say_nothing_about_audio():
    from stagetrace.testing.zoo_audio import build

    tracer, rec = _traced(build("t5"))
    assert tracer.layout.describe()["audio"] == [] and rec.warnings == []
