"""Tiny random-weight generative models whose encoder is NOT vision: audio/speech LMs and text
encoder–decoders.

The types are read off the installed transformers' mappings (structure, not a hand list): every
model type of the multimodal-LM and seq2seq-LM mappings that is in neither the image-text-to-text
mapping (the vision zoo, :mod:`.zoo`) nor the causal-LM mapping (text-only decoders).

``build(model_type)`` takes the family's own config class with its defaults, shrinks it with the
vision zoo's generic :func:`.zoo.shrink` / :func:`.zoo.remap_tokens`, applies the few per-family
overrides of ``SPECS`` below, builds the model in float32 on the CPU and makes inputs that reach
its encoder: random audio of the shape the family's own feature extractor produces (the feature
extractor itself runs where it can be instantiated offline; else the shape is built by hand and
the spec says so), placeholder audio tokens in ``input_ids`` as many as the model's own
``get_audio_features`` returns rows for that audio; a text prompt for text encoder–decoders. A
type that cannot be built or generated here raises :class:`.zoo.Unbuildable` with the reason.

``AudioCase.encoder_modules`` names the modules whose runs are the non-vision encoder's (the audio
tower and its projector, or the text encoder): the tests time them with host-clock hooks and find
which stage span holds them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .zoo import SPECIAL_BASE, VOCAB, Unbuildable, ZooCase, fit_mrope, remap_tokens, set_path, shrink, special_ids
from .zoo import _generate_kwargs as zoo_generate_kwargs

__all__ = ["AudioCase", "AudioSpec", "SPECS", "build", "build_as", "model_types", "kind_of", "NEW_TOKENS"]

NEW_TOKENS = 4
MAX_PARAMS = 12_000_000
TEXT_LEN = 6
SECONDS = 1.0  # of random audio per sample


def _mappings() -> tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, str]]:
    from transformers.models.auto import modeling_auto as m

    return (m.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES, m.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            m.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_types() -> list[str]:
    """Types of the multimodal-LM and seq2seq-LM mappings in neither the image-text-to-text nor
    the causal-LM mapping, in mapping order."""
    multimodal, seq2seq, image_text, causal = _mappings()
    out: list[str] = []
    for names in (multimodal, seq2seq):
        out += [t for t in names if t not in image_text and t not in causal and t not in out]
    return out


def class_name(model_type: str) -> str:
    multimodal, seq2seq, _, _ = _mappings()
    return multimodal.get(model_type) or seq2seq[model_type]


def kind_of(model_type: str) -> str:
    """"text-seq2seq" (an encoder–decoder whose config names no audio part) or "audio-lm" (an
    audio encoder, tokenizer or codec feeding a language model: decoder-only, or an omni model's
    thinker), from the config's structure."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg_cls = CONFIG_MAPPING[model_type]
    subs = " ".join(getattr(cfg_cls, "sub_configs", {}) or {})
    audio = any(w in subs for w in ("audio", "speech", "codec", "acoustic", "thinker"))
    return "text-seq2seq" if _is_encoder_decoder(cfg_cls, subs) and not audio else "audio-lm"


def _is_encoder_decoder(cfg_cls: Any, subs: str) -> bool:
    """From a default config where one can be made; a composite config that must be given its
    parts (``encoder-decoder`` on transformers 5.17 refuses a default) is one when it is made
    of an encoder and a decoder."""
    try:
        return bool(getattr(cfg_cls(), "is_encoder_decoder", False))
    except (ValueError, TypeError):
        return {"encoder", "decoder"} <= set(subs.split())


# ---------------------------------------------------------------------------------------------


@dataclass
class AudioSpec:
    over: dict[str, Any] = field(default_factory=dict)  # dotted config paths set after shrinking
    fix: Callable[[dict[str, Any]], None] | None = None
    unbuildable: str | None = None
    # the feature extractor's settings for 1 s of audio at the shrunk config (None: no extractor run)
    extractor: dict[str, Any] | None = field(default_factory=dict)
    extractor_class: str | None = None  # where the feature-extractor mapping has no entry for the type
    audio: Callable[[Any, torch.Generator], dict[str, torch.Tensor]] | None = None  # hand-built audio inputs
    seconds: float = SECONDS
    pad_frames_to: int = 1  # frames padded on the right to a multiple of this (what the processor does)
    mask_name: str | None = None  # what the extractor's attention_mask is called by the model's forward
    count: Callable[[Any, dict[str, torch.Tensor]], int] | None = None  # audio tokens, where not counted
    # the prompt where the audio is not placeholders in it (streaming models): input_ids of one row
    prompt: Callable[[Any], list[int]] | None = None
    encoder: tuple[str, ...] = ()  # the encoder's module paths, where not found by name
    generate: dict[str, Any] = field(default_factory=dict)  # extra generate() arguments
    finish: Callable[[Any], None] | None = None  # last edits of the built model
    # leading tokens of generate()'s output that are not new, where not the decoder's start (an
    # encoder–decoder's own generate() may return only the tokens after its decoder prompt: Whisper's)
    output_prompt: int | None = None


def _whisper(positions: int = 50) -> dict[str, Any]:
    """A Whisper-style encoder takes exactly 2 x max_source_positions frames: shrunk to 1 s (100 frames)."""
    return {"audio_config.max_source_positions": positions}


def _qwen2_audio_tokens(model: Any, inputs: dict[str, torch.Tensor]) -> int:
    """Qwen2-Audio has no get_audio_features: its forward counts the tower's output lengths."""
    _, out = model.model.audio_tower._get_feat_extract_output_lengths(inputs["feature_attention_mask"].sum(-1))
    return int(out[0])


def _post_lengths(model: Any, inputs: dict[str, torch.Tensor]) -> int:
    """The audio tower's own output length for the mask (its get_audio_features reads the
    placeholders themselves, so it cannot count them)."""
    _, out = model.base_model.audio_tower._get_feat_extract_output_lengths(inputs["input_features_mask"].sum(-1))
    return int(out[0])


def _granite_audio(model: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """GraniteSpeechFeatureExtractor's output for 1 s at 16 kHz, built by hand (the extractor needs
    torchaudio): 101 log-mel frames of 80 bins, the odd one dropped, stacked in pairs -> (1, 50, 160);
    the mask covers the projector's windows: ceil(50 / window) x (window // downsample) rows."""
    cfg = model.config
    frames = 16000 // 160 + 1
    frames -= frames % 2
    feats = torch.rand(1, frames // 2, cfg.encoder_config.input_dim, generator=gen)
    rows = -(-(frames // 2) // cfg.window_size) * (cfg.window_size // cfg.downsample_rate)
    return {"input_features": feats, "input_features_mask": torch.ones(1, rows, dtype=torch.bool)}


def _fun_asr_audio(model: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """FunAsrNanoFeatureExtractor's output for 1 s at 16 kHz, built by hand (the extractor needs
    torchaudio): 98 Kaldi fbank frames (25 ms windows, 10 ms shift), stacked 7 at a time with
    stride 6 (low frame rate) -> (1, 17, 7 x mel bins), all valid."""
    a = model.config.audio_config
    rows = -(-(1 + (16000 - 400) // 160) // 6)
    feats = torch.rand(1, rows, a.num_mel_bins * a.num_stacked_frames, generator=gen)
    return {"input_features": feats, "input_features_mask": torch.ones(1, rows, dtype=torch.long)}


def _quarter_text_width(d: dict[str, Any]) -> None:
    d["adaptor_config"]["intermediate_size"] = d["text_config"]["hidden_size"] // 4  # the config's own rule


def _nemo_fix(d: dict[str, Any]) -> None:
    """The diarization head reads the diarization encoder's width; the Nemotron-H text model's
    Mamba and shared-expert sizes are keys of its own; one layer of each kind."""
    diar = d["audio_config"]["diarization_config"]
    diar["head_config"]["audio_hidden_size"] = diar["audio_config"]["hidden_size"]
    text = d["text_config"]
    text.update(mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=16, moe_shared_expert_intermediate_size=32,
                n_groups=1, layers_block_type=list(dict.fromkeys(text["layers_block_type"])))


def _kyutai_fix(d: dict[str, Any]) -> None:
    """Mimi codec: its upsampling groups are its width; codebooks and quantizers in step."""
    codec = d["codec_config"]
    codec.update(upsample_groups=codec["hidden_size"], codebook_dim=32, vector_quantization_hidden_dimension=32,
                 num_quantizers=4, num_filters=8)
    d["num_codebooks"] = 4


def _no_speakers(model: Any) -> None:
    model.speaker_map.setdefault("Chelsie", {})  # text only: the speaker is never used


SPECS: dict[str, AudioSpec] = {
    "qwen2_audio": AudioSpec(over=_whisper(), mask_name="feature_attention_mask", count=_qwen2_audio_tokens),
    # the config leaves the placeholder unset (the processor's tokenizer knows it)
    "voxtral": AudioSpec(over={**_whisper(), "audio_token_id": SPECIAL_BASE - 8}),
    "glmasr": AudioSpec(mask_name="input_features_mask"),
    "audioflamingo3": AudioSpec(over=_whisper(), mask_name="input_features_mask"),
    # its processor subclasses AudioFlamingo3's, whose extractor is Whisper's
    "musicflamingo": AudioSpec(over=_whisper(), mask_name="input_features_mask",
                               extractor_class="WhisperFeatureExtractor", count=_post_lengths),
    # the conformer's width and head size are keys of its own (hidden_dim, dim_head)
    "granite_speech": AudioSpec(over={"encoder_config.hidden_dim": 32, "encoder_config.dim_head": 8},
                                audio=_granite_audio),
    "granite_speech_plus": AudioSpec(over={"encoder_config.hidden_dim": 32, "encoder_config.dim_head": 8},
                                     audio=_granite_audio),
    "nemo_speechlm": AudioSpec(fix=_nemo_fix, mask_name="input_features_mask", pad_frames_to=8),
    # streaming: the codec encodes the audio inside generate()'s input preparation, and every
    # forward takes one audio frame's codes beside one text token; the prompt is the BOS alone
    "kyutai_speech_to_text": AudioSpec(fix=_kyutai_fix, prompt=lambda model: [model.config.bos_token_id],
                                       encoder=("codec_model:encode",)),
    # streaming: the audio is added to the token embeddings frame by frame (no placeholders), the
    # encoder runs in every forward on its slice; the prompt is BOS, left padding and the delay
    # tokens (the processor's), and the audio bounds the tokens made: 2 s for 25
    "voxtral_realtime": AudioSpec(seconds=2.0, prompt=lambda model: [1] * (model.config.default_num_delay_tokens + 2)),
    # text out only (generation_mode="text"): the talker and token-to-wave model are shrunk but must
    # exist (generate() reads the talker's pad id even for text); generate() checks for a speaker
    # (the checkpoint's spk_dict) even for text, and passes only thinker_-prefixed lengths on
    "qwen2_5_omni": AudioSpec(over={"thinker_config.audio_config.max_source_positions": 50,
                                    "talker_config.embedding_size": 32, "token2wav_config.dit_config.emb_dim": 32,
                                    "token2wav_config.dit_config.num_embeds": 512,
                                    "token2wav_config.bigvgan_config.upsample_initial_channel": 64,
                                    "thinker_config.vision_start_token_id": 500,
                                    # M-RoPE sections the modeling code defaults to full size: half the shrunk head
                                    "thinker_config.text_config.rope_parameters.mrope_section": [2, 1, 1],
                                    "talker_config.rope_parameters.mrope_section": [2, 1, 1]},
                              mask_name="feature_attention_mask", finish=_no_speakers,
                              generate={"generation_mode": "text", "thinker_max_new_tokens": NEW_TOKENS,
                                        "thinker_min_new_tokens": NEW_TOKENS}),
    # a released checkpoint's thinker config carries vision_start_token_id (its M-RoPE reads it);
    # the config class leaves it out. Speech output off: text only
    "qwen3_omni_moe": AudioSpec(over={"enable_audio_output": False, "thinker_config.vision_start_token_id": 500,
                                      "thinker_config.audio_config.downsample_hidden_size": 32},
                                mask_name="feature_attention_mask",
                                generate={"return_audio": False, "thinker_max_new_tokens": NEW_TOKENS,
                                          "thinker_min_new_tokens": NEW_TOKENS}),
    # the tokenizers' conv stacks double their filters per stage: start at 1; the acoustic
    # tokenizer samples its latent by default (tokens would differ run to run): its mean
    "vibevoice_asr": AudioSpec(over={"acoustic_tokenizer_encoder_config.num_filters": 1,
                                     "semantic_tokenizer_encoder_config.num_filters": 1},
                               generate={"sample": False}),
    "fun_asr_nano": AudioSpec(fix=_quarter_text_width, audio=_fun_asr_audio),
    "qwen3_asr": AudioSpec(over={"audio_config.downsample_hidden_size": 32}, mask_name="input_features_mask"),
}


@dataclass
class AudioCase(ZooCase):
    kind: str = "audio-lm"
    encoder_modules: list[str] = field(default_factory=list)  # "path" (its forward) or "path:method"
    decoder_module: str = ""  # the language model / decoder whose first forward belongs to prefill
    audio_token_ids: list[int] = field(default_factory=list)


def _classes(model_type: str, name: str | None = None) -> tuple[Any, Any]:
    """The type's config class and model class (``name``: another class of the type than this survey's)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    name = name or class_name(model_type)
    try:
        return CONFIG_MAPPING[model_type], getattr(transformers, name)
    except (ImportError, AttributeError, KeyError) as e:
        raise Unbuildable(f"cannot import {name}: {e}".split("\n")[0]) from e


def make_config(model_type: str, spec: AudioSpec, name: str | None = None) -> Any:
    config_cls, _ = _classes(model_type, name)
    d = shrink(config_cls().to_dict())
    remap_tokens(d)
    for path, value in spec.over.items():
        set_path(d, path, value)
    if spec.fix is not None:
        spec.fix(d)
    fit_mrope(d, False)  # M-RoPE sections that add up to the shrunk rotary dimension
    d.pop("transformers_version", None)
    return config_cls(**d)


def inner_lm(model: Any) -> Any:
    """The module that takes the audio: an omni model's thinker (its generate() delegates to it), else the model."""
    thinker = getattr(model, "thinker", None)
    return thinker if isinstance(thinker, torch.nn.Module) else model


def _audio_sub(config: Any) -> Any:
    """The audio encoder's config: a sub-config, else the model's own where its encoder's sizes are
    keys of it (Whisper's ``num_mel_bins``, ``max_source_positions``)."""
    for name in ("audio_config", "encoder_config"):
        sub = getattr(config, name, None)
        if sub is not None:
            return sub
    return config if getattr(config, "is_encoder_decoder", False) else None


def _mels(config: Any) -> int | None:
    """Mel bins the audio encoder takes (its own config's, or the first nested encoder config's)."""
    sub = _audio_sub(config)
    todo = [sub] if sub is not None else []
    while todo:
        c = todo.pop(0)
        for name in ("num_mel_bins", "input_dim", "feature_size"):
            v = getattr(c, name, None)
            if isinstance(v, int):
                return v
        todo += [getattr(c, k) for k in getattr(c, "sub_configs", {}) or {} if getattr(c, k, None) is not None]
    return None


def extracted_audio(model_type: str, model: Any, spec: AudioSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The family's own feature extractor on random audio (1 s), at the shrunk config's mel bins."""
    import transformers
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES

    # a composite (SpeechEncoderDecoderModel) has none of its own: its encoder's
    encoder_type = getattr(getattr(model.config, "encoder", None), "model_type", None)
    name = (spec.extractor_class or FEATURE_EXTRACTOR_MAPPING_NAMES.get(model_type)
            or FEATURE_EXTRACTOR_MAPPING_NAMES.get(encoder_type or ""))
    if name is None:
        raise Unbuildable("no feature extractor is named for this type")
    try:
        fe_cls = getattr(transformers, name)
        kw = dict(spec.extractor or {})
        mels = _mels(inner_lm(model).config)
        if mels is not None and "feature_size" in inspect.signature(fe_cls.__init__).parameters:
            kw.setdefault("feature_size", mels)
        fe = fe_cls(**kw)
    except ImportError as e:
        raise Unbuildable(f"its feature extractor {name} needs a package not installed here: "
                          f"{str(e).strip().splitlines()[0]}") from e
    sr = int(getattr(fe, "sampling_rate", 16000))
    wav = (torch.randn(int(sr * spec.seconds), generator=gen) * 0.1).numpy().astype(np.float32)
    call_kw: dict[str, Any] = dict(sampling_rate=sr, return_tensors="pt")
    if "return_attention_mask" in inspect.signature(fe.__call__).parameters:
        call_kw["return_attention_mask"] = True
    out = fe(wav, **call_kw)
    # a Whisper-style encoder's fixed length: 2 x max_source_positions frames
    positions = getattr(_audio_sub(inner_lm(model).config), "max_source_positions", None)
    feats = dict(out)
    if "input_features" in feats and isinstance(positions, int) and getattr(fe, "nb_max_frames", None):
        frames = 2 * positions
        f = feats["input_features"]
        feats["input_features"] = f[..., :frames] if f.shape[-1] >= frames else torch.nn.functional.pad(
            f, (0, frames - f.shape[-1]))
        if "attention_mask" in feats:
            m = feats["attention_mask"]
            feats["attention_mask"] = m[..., :frames] if m.shape[-1] >= frames else torch.nn.functional.pad(
                m, (0, frames - m.shape[-1]))
    if "attention_mask" not in feats and "input_features" in feats:
        feats["attention_mask"] = torch.ones(feats["input_features"].shape[0], feats["input_features"].shape[-1],
                                             dtype=torch.long)
    if spec.pad_frames_to > 1 and "attention_mask" in feats:
        m = feats["attention_mask"]
        n = m.shape[-1]
        extra = -n % spec.pad_frames_to
        axis = [i for i, size in enumerate(feats["input_features"].shape) if size == n][-1]
        f = feats["input_features"]
        pad = [0, 0] * (f.dim() - 1 - axis) + [0, extra]
        feats["input_features"] = torch.nn.functional.pad(f, pad)
        feats["attention_mask"] = torch.nn.functional.pad(m, (0, extra))
    if spec.mask_name and "attention_mask" in feats:
        feats[spec.mask_name] = feats.pop("attention_mask")
    lm = inner_lm(model)
    params = {**inspect.signature(lm.forward).parameters,  # a streaming model's audio goes to its input preparation
              **inspect.signature(lm.prepare_inputs_for_generation).parameters}
    return {k: (v.float() if v.is_floating_point() else v) for k, v in feats.items()
            if isinstance(v, torch.Tensor) and k in params}


def _audio_token_id(config: Any) -> int:
    for name in ("audio_token_id", "audio_token_index"):
        v = getattr(config, name, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"no audio token id in {type(config).__name__}")


def count_audio_tokens(model: Any, audio: dict[str, torch.Tensor], ids_hint: torch.Tensor | None = None) -> int:
    """Audio tokens one prompt row needs: rows of the model's own ``get_audio_features`` output."""
    fn = getattr(model, "get_audio_features", None)
    if fn is None:
        raise TypeError(f"{type(model).__name__} has no get_audio_features")
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        params = inspect.signature(model.base_model.get_audio_features).parameters
    kw = {k: v for k, v in audio.items() if k in params}
    if "input_ids" in params and ids_hint is not None:
        kw["input_ids"] = ids_hint
    with torch.no_grad():
        out = fn(**kw)
    feats = getattr(out, "pooler_output", None)
    if feats is None:
        feats = out.last_hidden_state
    hidden = model.config.get_text_config().hidden_size
    return int(feats.numel() // hidden)


def build(model_type: str, batch: int = 1, seed: int = 0, new_tokens: int = NEW_TOKENS) -> AudioCase:
    if model_type not in model_types():
        raise Unbuildable("not a non-vision generative type of this transformers")
    return build_as(model_type, class_name(model_type), kind_of(model_type), SPECS.get(model_type, AudioSpec()),
                    batch, seed, new_tokens)


def build_as(model_type: str, name: str, kind: str, spec: AudioSpec, batch: int = 1, seed: int = 0,
             new_tokens: int = NEW_TOKENS) -> AudioCase:
    """Model class ``name`` of ``model_type``, tiny, and inputs for its ``kind``: "text-seq2seq" (a text
    prompt to the encoder), "audio-seq2seq" (audio to the encoder, the decoder started by generate()),
    "audio-lm" (audio and a prompt with its placeholders)."""
    if spec.unbuildable:
        raise Unbuildable(spec.unbuildable)
    _, model_cls = _classes(model_type, name)
    try:
        config = make_config(model_type, spec, name)
    except Exception as e:  # noqa: BLE001 - a shrink the config's own validation refuses
        raise Unbuildable(f"the shrunk config does not validate: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1][:200]}") from e
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in model_cls(config).parameters())
        if n > MAX_PARAMS:
            raise Unbuildable(f"the shrunk model still has {n / 1e6:.1f}M parameters")
        torch.manual_seed(seed)
        model = model_cls(config).float().eval()
        if spec.finish is not None:
            spec.finish(model)
    except ImportError as e:
        raise Unbuildable(f"needs a package not installed here: {str(e).strip().splitlines()[0]}") from e
    gen = torch.Generator().manual_seed(seed)
    reserved = set(special_ids(model.config)) | {0, 1, 2}
    pool = torch.tensor([i for i in range(3, 256) if i not in reserved])
    text = lambda: pool[torch.randint(len(pool), (TEXT_LEN,), generator=gen)].tolist()  # noqa: E731
    audio_ids: list[int] = []
    if kind == "text-seq2seq":
        ids = torch.tensor([text() + [2] for _ in range(batch)])
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        encoder = [p for p in [_path(model, model.get_encoder())] if p]
        dec = model.get_decoder()
        inner = getattr(dec, "base_model", dec)  # a decoder with its own lm head (EncoderDecoderModel's): its body
        decoder = _path(model, inner if isinstance(inner, torch.nn.Module) else dec) or ""
    else:
        audio = spec.audio(model, gen) if spec.audio else extracted_audio(model_type, model, spec, gen)
        if batch > 1:
            audio = {k: v.expand(batch, *v.shape[1:]).clone() for k, v in audio.items()}
        if kind == "audio-seq2seq":  # the audio is the encoder's whole input; generate() starts the decoder
            inputs = dict(audio)
            if model.main_input_name == "inputs":  # a composite (SpeechEncoderDecoderModel): generate(inputs=...)
                (key,) = [k for k in inputs if k in ("input_values", "input_features")]
                inputs["inputs"] = inputs.pop(key)
            encoder = list(spec.encoder) or [p for p in [_path(model, model.get_encoder())] if p]
            return AudioCase(model_type=model_type, model=model, inputs=inputs,
                             generate_kwargs=_generate_kwargs(model, new_tokens, spec), shape=kind, prompt_len=0,
                             image_token_ids=[], new_tokens=new_tokens,  # no text prompt; the decoder's start token
                             output_prompt_len=1 if spec.output_prompt is None else spec.output_prompt, kind=kind,
                             encoder_modules=encoder, decoder_module=_path(model, model.get_decoder()) or "")
        if spec.prompt is not None:
            ids = torch.tensor([spec.prompt(model) for _ in range(batch)])
        else:
            tok = _audio_token_id(inner_lm(model).config)
            n_audio = spec.count(model, audio) if spec.count else None
            if n_audio is None:
                hint = torch.tensor([[1] + [tok] * 4096])  # only where get_audio_features reads the placeholders
                n_audio = count_audio_tokens(inner_lm(model), {k: v[:1] for k, v in audio.items()}, hint)
            ids = torch.tensor([[1] + text()[:2] + [tok] * n_audio + text() for _ in range(batch)])
            audio_ids = [tok]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **audio}
        encoder = list(spec.encoder) or _audio_modules(model, inner_lm(model))
        base = inner_lm(model).base_model
        decoder = _path(model, getattr(base, "language_model", None) or base) or ""
    prompt_len = int(inputs["input_ids"].shape[-1])
    out_prompt = 1 if kind == "text-seq2seq" else prompt_len
    return AudioCase(model_type=model_type, model=model, inputs=inputs,
                     generate_kwargs=_generate_kwargs(model, new_tokens, spec), shape=kind, prompt_len=prompt_len,
                     image_token_ids=[], new_tokens=new_tokens, output_prompt_len=out_prompt, kind=kind,
                     encoder_modules=encoder, decoder_module=decoder, audio_token_ids=audio_ids)


def _path(model: Any, target: Any) -> str | None:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


_AUDIO_WORDS = ("audio", "speech", "acoustic", "semantic_tokenizer", "encoder", "projector", "adaptor", "adapter")


def _audio_modules(model: Any, lm: Any) -> list[str]:
    """The outermost modules of the base model besides its language model: the audio tower and the
    projector (anything that is not the language model, its embeddings, lm_head, or a vision tower)."""
    base = lm.base_model
    prefix = _path(model, base) or ""
    lm = getattr(base, "language_model", None)
    out = []  # paths from the top model
    for name, child in base.named_children():
        if child is lm or name in ("embed_tokens", "lm_head", "visual", "vision_tower"):
            continue
        if sum(p.numel() for p in child.parameters()) == 0:
            continue
        out.append(f"{prefix}.{name}" if prefix else name)
    return out


def _generate_kwargs(model: Any, new_tokens: int, spec: AudioSpec) -> dict[str, Any]:
    """The vision zoo's greedy kwargs; special ids past the capped vocabulary are not suppressed
    (an audio model's may lie outside it), and an encoder–decoder without a start token starts
    from its pad id."""
    kw = zoo_generate_kwargs(model, new_tokens)
    kw["suppress_tokens"] = [i for i in kw["suppress_tokens"] if i < VOCAB]
    if getattr(model.config, "is_encoder_decoder", False) and getattr(model.generation_config,
                                                                     "decoder_start_token_id", None) is None:
        kw["decoder_start_token_id"] = kw["pad_token_id"]  # what T5-style checkpoints set (their pad id)
    kw.update(spec.generate)
    return kw
