"""A zoo of tiny random-weight models: one per model type of transformers' image-text-to-text mapping
(``model_types()``) and one per text-only causal LM type (``lm_types()``: the causal-LM mapping less
the image-text-to-text one).

``build(model_type)`` takes the family's own config class with its defaults, gives back as unset
what the config derives itself (so it derives it again from the shrunk sizes), shrinks every text
and vision sub-config generically (layers, widths, heads, experts, vocabulary), applies the few
per-family overrides of :mod:`.zoo_specs`, builds the model in float32 on the CPU and makes inputs
that reach its vision path, or a text prompt alone for a text-only LM (:mod:`.zoo_inputs`). A type
that cannot be built or generated offline raises :class:`Unbuildable` with the reason.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .zoo_inputs import STYLES, count_features, prompt_ids
from .zoo_specs import SPECS, TEXT, Spec

__all__ = ["ZooCase", "Unbuildable", "build", "model_types", "lm_types", "spec_of", "SHAPES", "NEW_TOKENS"]

# The transformers release whose configs the specs below were written and checked against
# (the CPU machine's and CI's). Elsewhere a tiny model may not build or run; callers then
# say so instead of blaming the tracer.
WRITTEN_FOR = "5.24.0"

SHAPES = ("decoder-only", "encoder-decoder", "delegating", "vision-as-tokens")
NEW_TOKENS = 4
VOCAB = 512
SPECIAL_BASE = VOCAB - 64  # special token ids above the text vocabulary are remapped into [448, 512)
MAX_PARAMS = 12_000_000  # a shrink that leaves a big model is a bug, not a slow test


class Unbuildable(Exception):
    """This model type cannot be built or generated here; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ZooCase:
    model_type: str
    model: Any
    inputs: dict[str, Any]
    generate_kwargs: dict[str, Any]
    shape: str
    prompt_len: int
    image_token_ids: list[int] = field(default_factory=list)
    new_tokens: int = NEW_TOKENS
    output_prompt_len: int = 0  # leading tokens of generate()'s output that are not new (decoder start, prompt)

    def generated(self, out: Any) -> int:
        """New tokens in an output of ``generate()`` (counted on the decoder output for encoder-decoder)."""
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        return int(seq.shape[-1]) - self.output_prompt_len

    def generate(self, **over: Any) -> Any:
        """``model.generate`` on copies of the inputs (BLIP's generate() writes into ``input_ids``)."""
        inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        with torch.no_grad():
            return self.model.generate(**inputs, **{**self.generate_kwargs, **over})


def model_types() -> list[str]:
    """Every model type of the installed transformers' image-text-to-text mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return list(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def lm_types() -> list[str]:
    """Every text-only causal LM type of the installed transformers: its causal-LM mapping less the
    image-text-to-text one (a type in both is a vision-language model, built and tested as one)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    return [t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES]


# ---------------------------------------------------------------------------------------------
# Generic shrinking of a config dict (sub-configs are nested dicts).

_SIZES: dict[int, str] = {  # the size each config key is capped at, by groups
    2: "num_hidden_layers num_layers depth encoder_layers decoder_layers num_decoder_layers layers n_layers n_layer "
       "conf_num_hidden_layers num_global_layers num_experts_per_tok num_experts_per_token moe_k moe_topk "
       "n_group num_expert_group topk_group linear_num_key_heads",  # expert groups: at most the 4 experts
    4: "num_attention_heads num_heads n_head n_heads attention_heads encoder_attention_heads decoder_attention_heads "
       "num_sliding_attention_heads index_n_heads linear_num_heads linear_num_value_heads num_query_tokens "
       "n_routed_experts num_experts num_local_experts moe_num_experts zero_expert_num qk_rope_head_dim "
       "qk_nope_head_dim mamba_n_heads cross_num_attention_heads cross_num_key_value_heads",
    8: "head_dim d_kv d_head rotary_dim v_head_dim qk_head_dim index_head_dim linear_head_dim linear_key_head_dim "
       "linear_value_head_dim hc_lowrank hidden_size_per_layer_input cross_head_dim",
    16: "kv_lora_rank q_lora_rank",
    32: "hidden_size d_model n_embd emb_dim embed_dim out_hidden_size text_hidden_size projector_hidden_size "
        "vision_hidden_size projection_dim word_embed_proj_dim encoder_hidden_size output_dim moe_intermediate_size "
        "shared_expert_intermediate_size shared_intermediate_size shared_experts_intermediate_size moe_hidden_size "
        "share_expert_dim projection_hidden_size adapter_in_dim adapter_out_dim adapter_input_size "
        "vision_output_dim projector_input_dim projector_output_dim image_token_embed_dim base_channels "
        "latent_channels mm_embed_dim output_proj_dims pooler_output_size shape_embed_dim pronunciation_embed_dim "
        "hidden_size_global cross_hidden_size",
    64: "intermediate_size d_ff dff n_inner ffn_hidden_size ffn_dim encoder_ffn_dim decoder_ffn_dim mlp_dim "
        "intermediate_size_mlp dense_intermediate_size projection_intermediate_size expert_ffn_hidden_size "
        "speech_encoder_intermediate_size",
}
SIZES = {key: size for size, keys in _SIZES.items() for key in keys.split()}
LIST_SIZES = {"hidden_sizes": 32, "depths": 1}
_TOKEN_KEY = re.compile(r"(token_id|token_index|token_ids|_id)$")


def _is_config(key: str, value: Any) -> bool:
    return isinstance(value, dict) and ("model_type" in value or key.endswith("config"))


def shrink(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of config dict ``d`` with every size that costs time made tiny, sub-configs included."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if _is_config(key, value):
            out[key] = shrink(value)
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = min(value, SIZES[key])
        elif key in SIZES and isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            out[key] = [min(v, SIZES[key]) for v in value]  # one per layer (Gemma 3n's MLP widths)
        elif key in LIST_SIZES and isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            out[key] = [min(v, LIST_SIZES[key]) for v in value]  # per-stage widths and depths
        else:
            out[key] = copy.deepcopy(value)
    heads = next((k for k in ("num_attention_heads", "num_heads", "n_head") if isinstance(d.get(k), int)), None)
    if heads and isinstance(d.get("num_key_value_heads"), int):
        out["num_key_value_heads"] = out[heads] if d["num_key_value_heads"] == d[heads] else 2
    if isinstance(d.get("qk_rope_head_dim"), int) and d.get("head_dim") == d["qk_rope_head_dim"]:
        out["qk_rope_head_dim"] = out["head_dim"]  # MLA: the rotary embedding is made for the rotary part of a head
    if heads and "num_key_value_heads" in d and d["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out[heads]  # unset: multi-head attention (what most configs derive)
    if heads and "head_dim" in d and d["head_dim"] is None:
        out["head_dim"] = SIZES["head_dim"]
    for key, value in out.items():  # every vocabulary: text, per-layer inputs, a decoder's, hashed bytes ...
        if (key.endswith(("vocab_size", "_vocab")) or key.startswith("vocab_size")) and isinstance(value, int) \
                and not isinstance(value, bool) and value > VOCAB:
            out[key] = VOCAB
    if out.get("sliding_window", 0) is None and "sliding_attention" in (out.get("layer_types") or ()):
        out["sliding_window"] = 16
    n = out.get("num_hidden_layers")
    if isinstance(n, int):
        for key, value in list(out.items()):
            if isinstance(value, (list, tuple)) and len(value) == d["num_hidden_layers"] and len(value) > n:
                out[key] = _layers_subset(list(value), n)  # layer_types, mlp_layer_types, kv sources ...
            elif key == "per_layer_config" and isinstance(value, dict):
                out[key] = {k: v for k, v in value.items() if int(k) < n}
    return out


def underive(d: dict[str, Any], config_cls: Any) -> dict[str, Any]:
    """Default config dict ``d`` of ``config_cls`` with what the config derives itself given back as
    unset, so that it derives it again from the shrunk sizes (a head dim from the width, a layer
    count from the stacks ...): a key that is no field of the class (``config_cls()`` got no
    arguments, so the class set it) is dropped, a scalar field whose default is None or "auto" is
    reset to it. Aliases of fields (``attribute_map``), per-layer lists (``shrink`` keeps them
    hybrid) and sub-configs' ``model_type`` stay."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not dataclasses.is_dataclass(config_cls):
        return d
    fields = {f.name: f.default for f in dataclasses.fields(config_cls)}
    keep = {"model_type", *getattr(config_cls, "attribute_map", {}).values()}
    subs = getattr(config_cls, "sub_configs", {})
    out: dict[str, Any] = {}
    for key, value in d.items():
        if _is_config(key, value):
            sub = subs.get(key)
            if sub is None or sub is AutoConfig:
                sub = CONFIG_MAPPING.get(value.get("model_type")) if value.get("model_type") else None
            out[key] = underive(value, sub) if sub is not None else value
        elif key not in fields:
            if key in keep:
                out[key] = value
        elif fields[key] in (None, "auto") and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out[key] = fields[key]
        else:
            out[key] = value
    return out


def fit_mrope(d: dict[str, Any], add: bool) -> None:
    """M-RoPE sections (temporal, height, width) must add up to half the rotary dimension; ``add``
    sets them where the config leaves them to the modeling code's full-size default."""
    for key, value in d.items():
        if _is_config(key, value):
            fit_mrope(value, add and key == "text_config")
    rope = d.get("rope_parameters")
    if not isinstance(rope, dict) or not isinstance(d.get("hidden_size"), int):
        return
    head_dim = d.get("head_dim") or d["hidden_size"] // d.get("num_attention_heads", 1)
    nested = [v for v in rope.values() if isinstance(v, dict)]
    for params in nested or [rope]:
        if isinstance(params.get("mrope_section"), list) or add:
            factor = params.get("partial_rotary_factor", d.get("partial_rotary_factor")) or 1.0
            half = int(head_dim * factor) // 2
            if sum(params.get("mrope_section") or []) != half:
                params["mrope_section"] = [half - 2, 1, 1]


def _layers_subset(values: list[Any], n: int) -> list[Any]:
    """``n`` entries of a per-layer list: the first ``n`` for indices, else keeping every kind of layer
    (the first of each kind, in order), so that a hybrid model stays hybrid."""
    if all(isinstance(v, int) for v in values):
        return values[:n]
    # kinds compared by their repr: a layer's entry may be a list (Moonshine Streaming's sliding windows)
    firsts = sorted({repr(v): i for i, v in reversed(list(enumerate(values)))}.values())[:n]
    rest = [i for i in range(len(values)) if i not in firsts]
    return [values[i] for i in sorted(firsts + rest[: n - len(firsts)])]


def _token_items(d: dict[str, Any], path: str = ""):
    for key, value in d.items():
        if _is_config(key, value):
            yield from _token_items(value, f"{path}{key}.")
        elif _TOKEN_KEY.search(key) and not isinstance(value, bool) and (
                isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value))):
            yield d, key, value


def remap_tokens(d: dict[str, Any], limit: int = VOCAB) -> None:
    """Special token ids past the tiny vocabulary move into its top 64 ids, the same id everywhere."""
    new: dict[int, int] = {}

    def one(v: int) -> int:
        if v < limit:
            return v
        if v not in new:
            new[v] = SPECIAL_BASE + len(new)
        return new[v]

    for holder, key, value in list(_token_items(d)):
        holder[key] = [one(v) for v in value] if isinstance(value, list) else one(value)


def special_ids(config: Any) -> list[int]:
    """Every token id named in the config (image, video, frame, bos ... tokens), sub-configs included."""
    ids: set[int] = set()
    for _, _, value in _token_items(config.to_dict()):
        ids.update(v for v in (value if isinstance(value, list) else [value]) if v >= 0)
    return sorted(ids)


def set_path(d: dict[str, Any], path: str, value: Any) -> None:
    *heads, last = path.split(".")
    for h in heads:
        d = d.setdefault(h, {})
    d[last] = value


# ---------------------------------------------------------------------------------------------


def _classes(model_type: str) -> tuple[Any, Any]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    # a type in both mappings is a vision-language model: its image-text-to-text class
    names = {**MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
    if model_type not in names:
        raise Unbuildable(f"not in transformers {transformers.__version__}")
    try:
        config_cls, model_cls = CONFIG_MAPPING[model_type], getattr(transformers, names[model_type])
    except (ImportError, AttributeError, KeyError) as e:  # a family whose import needs a missing package
        raise Unbuildable(f"cannot import {names[model_type]}: {e}".split("\n")[0]) from e
    if model_cls.config_class in getattr(config_cls, "sub_configs", {}).values():
        config_cls = model_cls.config_class  # a composite's decoder (MusicGen's): the causal LM is built from it
    return config_cls, model_cls


def make_config(model_type: str, spec: Spec) -> Any:
    config_cls, _ = _classes(model_type)
    d = config_cls().to_dict()
    for key, sub in getattr(config_cls, "sub_configs", {}).items():  # a vision tower the defaults leave out
        if key == "vision_config" and d.get(key) is None and sub.__name__ != "AutoConfig":
            d[key] = sub().to_dict()
    d = shrink(underive(d, config_cls))
    if "is_decoder" in d and model_type in lm_types():  # a causal LM decodes: BERT-style families default to encoders
        d["is_decoder"] = True
    remap_tokens(d)
    vision: Any = d
    for part in filter(None, (spec.vision_config if spec.vision_config is not None else "vision_config").split(".")):
        vision = vision.get(part) if isinstance(vision, dict) else None
    if spec.image and isinstance(vision, dict):  # pixel styles: a 32x32 image of 8x8 patches unless told
        for key, value in zip(("image_size", "patch_size"), spec.image):
            if key in vision:
                vision[key] = value
    for i, key in enumerate(("image_token_id", "video_token_id", "image_token_index", "video_token_index")):
        if key in d and d[key] is None:  # placeholders the config leaves unset
            d[key] = SPECIAL_BASE - 8 + i % 2
    for path, value in spec.over.items():
        set_path(d, path, value)
    if spec.fix is not None:
        spec.fix(d)
    fit_mrope(d, spec.mrope)
    d.pop("transformers_version", None)
    return config_cls(**d)


def _check_size(model_cls: Any, config: Any, model_type: str) -> None:
    with torch.device("meta"):
        n = sum(p.numel() for p in model_cls(config).parameters())
    if n > MAX_PARAMS:
        raise RuntimeError(f"{model_type}: the shrunk model still has {n / 1e6:.1f}M parameters")


def build(model_type: str, batch: int = 1, seed: int = 0, new_tokens: int = NEW_TOKENS) -> ZooCase:
    """A tiny random-weight ``model_type`` model and inputs for ``generate()`` that reach its vision path
    (a text-only LM: a prompt)."""
    spec = spec_of(model_type)
    _, model_cls = _classes(model_type)
    reason = spec.unbuildable or (spec.broken() if spec.broken else None)
    if reason:
        raise Unbuildable(reason)
    config = make_config(model_type, spec)
    try:
        _check_size(model_cls, config, model_type)
        torch.manual_seed(seed)
        model = model_cls(config).float().eval()
    except ImportError as e:  # a backbone from a package not installed here (timm ...)
        raise Unbuildable(f"needs {_missing(e)} (not installed here): "
                          f"{str(e).strip().split(' but ')[0]}") from e
    gen = torch.Generator().manual_seed(seed)
    vision = STYLES[spec.style](model, batch, gen, spec)
    if not spec.text:
        n_tokens, ids = 0, {}
    else:
        n_tokens = (0 if not vision.inputs else  # a text-only prompt
                    spec.image_tokens(model, vision) if spec.image_tokens else count_features(model, vision, batch))
        ids, token_id = prompt_ids(model, batch, n_tokens, gen, spec, vision.modality)
    inputs = {**ids, **vision.inputs}
    if spec.finish is not None:
        spec.finish(model, inputs)
    shape = _shape(model, spec)
    prompt_len = int(inputs["input_ids"].shape[-1]) if "input_ids" in inputs else 0
    start = inputs.get("decoder_input_ids")
    out_prompt = (1 if start is None else int(start.shape[-1])) if shape == "encoder-decoder" else prompt_len
    gen_kw = {**_generate_kwargs(model, new_tokens), **spec.generate}
    if not spec.token_ids:
        gen_kw = {k: v for k, v in gen_kw.items() if k not in ("pad_token_id", "eos_token_id")}
    return ZooCase(model_type, model, inputs, gen_kw, shape, prompt_len,
                   [token_id] if n_tokens else [], new_tokens, out_prompt + spec.prompt_offset)


def spec_of(model_type: str) -> Spec:
    """The family's spec; by default pixels for a vision-language type, a text prompt for a text-only LM."""
    return SPECS.get(model_type) or (TEXT if model_type in lm_types() else Spec())


def _missing(e: ImportError) -> str:
    found = re.search(r"requires the (\S+) library", str(e))
    return found.group(1) if found else (getattr(e, "name", None) or "a missing package")


def _generate_kwargs(model: Any, new_tokens: int) -> dict[str, Any]:
    cfg = model.config
    text = cfg.get_text_config(decoder=True)
    pad = getattr(text, "pad_token_id", None)
    if pad is None:
        pad = getattr(cfg, "pad_token_id", None)
    eos = getattr(model.generation_config, "eos_token_id", None)
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=0 if pad is None else pad)
    if eos is None:
        kw["eos_token_id"] = 2
    # Random weights can emit an image, video or frame token: none of them may ever be generated.
    kw["suppress_tokens"] = [i for i in special_ids(cfg) if i not in (kw.get("eos_token_id"), eos)]
    return kw


def _shape(model: Any, spec: Spec) -> str:
    if spec.shape:
        return spec.shape
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if any(callable(getattr(m, "get_image_tokens", None)) for m in (model, getattr(model, "model", None))):
        return "vision-as-tokens"  # a VQ tokenizer turns the image into vocabulary ids
    return "decoder-only"
