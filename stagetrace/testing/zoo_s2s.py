"""Tiny random-weight sequence-to-sequence models that no other survey builds: the conditional
generation class of every seq2seq-LM and speech-seq2seq type whose class the vision zoo
(:mod:`.zoo`: image-text-to-text and causal-LM classes) and the non-vision zoo (:mod:`.zoo_audio`)
leave out.

The types are read off the installed transformers' mappings (structure, not a hand list): a type of
``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`` or ``MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES``
whose class there is not a class the other surveys build — BART and its kin, which the causal-LM
survey built as decoders only (``BartForCausalLM``), the speech encoder–decoders (Whisper, Speech2Text,
Moonshine …), and the speech-to-text class of a type surveyed as text-to-text (Seamless M4T).

``build(model_type)`` is :func:`.zoo_audio.build_as` with this survey's class and kind: "text-seq2seq"
(the encoder takes a text prompt) or "audio-seq2seq" (the class's main input, ``generate()`` or forward
takes audio: mel features or a waveform, made by the family's own feature extractor where it builds offline,
else shaped by hand), with the few per-family overrides of ``SPECS``. ``whisper_forced(case)`` turns a
Whisper case into a call of Whisper's own ``generate()`` with its language and task tokens forced.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from .zoo import Unbuildable
from .zoo_audio import NEW_TOKENS, AudioCase, AudioSpec, build_as

__all__ = ["SPECS", "build", "model_types", "class_name", "kind_of", "whisper_forced"]


def _surveyed_elsewhere() -> set[str]:
    """Model classes the other surveys build: image-text-to-text and causal-LM classes (:mod:`.zoo`)
    and the non-vision zoo's (:mod:`.zoo_audio`)."""
    from transformers.models.auto import modeling_auto as m

    from . import zoo_audio

    return ({*m.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values(), *m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()}
            | {zoo_audio.class_name(t) for t in zoo_audio.model_types()})


def _classes_by_type() -> dict[str, str]:
    from transformers.models.auto import modeling_auto as m

    done = _surveyed_elsewhere()
    out: dict[str, str] = {}
    for names in (m.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, m.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES):
        out.update({t: c for t, c in names.items() if c not in done and t not in out})
    return out


def model_types() -> list[str]:
    """Types of the seq2seq-LM and speech-seq2seq mappings whose class there no other survey builds,
    in mapping order."""
    return list(_classes_by_type())


def class_name(model_type: str) -> str:
    return _classes_by_type()[model_type]


def _takes_audio(fn: Any) -> bool:
    from ..structure import AUDIO_ARGS

    try:
        return any(p in AUDIO_ARGS for p in inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False


def kind_of(model_type: str) -> str:
    """"audio-seq2seq" where the class's main input is audio, or its own ``generate()`` or its forward
    takes audio (Pop2Piano's generate() turns mel features into the encoder's embeddings; a
    SpeechEncoderDecoderModel's main input is ``inputs``, its forward takes ``input_values``), else
    "text-seq2seq"; read off the class without building it."""
    import transformers

    cls = getattr(transformers, class_name(model_type))
    if cls.main_input_name in ("input_features", "input_values") or _takes_audio(cls.generate) \
            or _takes_audio(cls.forward):
        return "audio-seq2seq"
    return "text-seq2seq"


# ---------------------------------------------------------------------------------------------
# Per-family facts the generic build cannot derive.

def _dia_start(model: Any) -> None:
    """Dia's decoder starts from its BOS on every channel (its processor's audio prompt, absent here;
    the pad id the generic build would pass is what Dia strips as padding, leaving no prompt)."""
    model.generation_config.decoder_start_token_id = model.config.decoder_config.bos_token_id


def _pop2piano_audio(model: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Pop2PianoFeatureExtractor's output, built by hand (the extractor needs essentia): log-mel frames of
    d_model bins (the checkpoint's n_mels is its width), about 1 s of them."""
    return {"input_features": torch.rand(1, 20, model.config.d_model, generator=gen)}


def _pop2piano_composers(model: Any) -> None:
    """generate() reads the composer tokens from the generation config (the checkpoint's
    generation_config.json): one per composer embedding; their values only index that embedding."""
    n = model.config.composer_vocab_size
    model.generation_config.composer_to_feature_token = {f"composer{i + 1}": 1000 + i for i in range(n)}


SPECS: dict[str, AudioSpec] = {
    # a Whisper-style encoder takes exactly 2 x max_source_positions frames: shrunk to 1 s (100 frames)
    # its generate() returns the tokens after the decoder prompt it chose (and drops a final EOS)
    "whisper": AudioSpec(over={"max_source_positions": 50}, output_prompt=0),
    "dia": AudioSpec(finish=_dia_start),
    "pop2piano": AudioSpec(audio=_pop2piano_audio, finish=_pop2piano_composers),
    # the config class has no num_key_value_heads, which its decoder layers read (a checkpoint's config sets it)
    # and no feature extractor in the auto mapping: its processor pads raw 16 kHz audio to whole 80-sample
    # frames, which Wav2Vec2's extractor (Moonshine's) gives for 1 s
    "moonshine_streaming": AudioSpec(over={"num_key_value_heads": 4}, extractor_class="Wav2Vec2FeatureExtractor"),
    # the TTS class: generate() samples each audio latent with a diffusers scheduler unless one is passed
    "vibevoice": AudioSpec(unbuildable="needs diffusers (not installed here): VibeVoice's generate() samples every "
                                       "speech latent with a diffusers noise scheduler, and its output is audio"),
}


def build(model_type: str, batch: int = 1, seed: int = 0, new_tokens: int = NEW_TOKENS) -> AudioCase:
    if model_type not in model_types():
        raise Unbuildable("not a seq2seq class left out by the other surveys in this transformers")
    return build_as(model_type, class_name(model_type), kind_of(model_type), SPECS.get(model_type, AudioSpec()),
                    batch, seed, new_tokens)


def whisper_forced(case: AudioCase) -> AudioCase:
    """The Whisper case as users call it: Whisper's own ``generate()`` picks the decoder prompt itself —
    start of transcript, language, task, no timestamps (four forced tokens, ids as a multilingual
    checkpoint's generation config names them, here at the top of the tiny vocabulary) — and returns
    the tokens after it."""
    g = case.model.generation_config
    top = case.model.config.vocab_size
    g.decoder_start_token_id = top - 1
    g.lang_to_id = {"<|en|>": top - 2, "<|de|>": top - 3}
    g.task_to_id = {"transcribe": top - 4, "translate": top - 5}
    g.no_timestamps_token_id = top - 6
    g.is_multilingual = True
    kw = {k: v for k, v in case.generate_kwargs.items() if k != "decoder_start_token_id"}
    # random weights may emit any of them: generated text never holds a forced token
    kw["suppress_tokens"] = sorted({*kw.get("suppress_tokens", ()), *range(top - 6, top)})
    kw.update(language="en", task="transcribe", return_timestamps=False)
    forced = AudioCase(**{**case.__dict__, "generate_kwargs": kw, "output_prompt_len": 0})
    forced.model_type = f"{case.model_type} (own generate, forced tokens)"
    return forced

