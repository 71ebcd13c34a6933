"""Tiny random-weight models of real transformers architectures, built from configs.

Used by the demo, the tests and the benchmarks: nothing is downloaded. Each builder
returns a :class:`TinyCase` whose ``inputs`` go straight into ``model.generate``.
The ``size`` knob scales the same architectures up for GPU benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["TinyCase", "FAMILIES", "build", "text_config", "IMAGE_TOKEN_ID"]

IMAGE_TOKEN_ID = 100
VOCAB = 128
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2


@dataclass
class TinyCase:
    family: str
    model: Any
    inputs: dict[str, Any]
    image_token_id: int | None
    # generate() kwargs every test of this family needs (e.g. suppress the image token).
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


def text_config(**over: Any) -> dict[str, Any]:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg.update(over)
    return cfg


def _ids(batch: int, n_image_tokens: int, text_len: int = 6, image_first: bool = False,
         left_pad: int = 0, generator: torch.Generator | None = None,
         frame: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids with one image's worth of image tokens per row, and the attention mask.

    Row r > 0 gets ``left_pad * r`` pad tokens on the left (and as many fewer text tokens),
    so batch tests see real left padding.
    """
    rows, masks = [], []
    for r in range(batch):
        pad = left_pad * r
        text = torch.randint(3, IMAGE_TOKEN_ID, (text_len - pad,), generator=generator).tolist()
        img = [IMAGE_TOKEN_ID] * n_image_tokens
        if frame and n_image_tokens:
            img = [frame[0]] + img + [frame[1]]
        body = (img + [BOS_ID] + text) if image_first else ([BOS_ID] + img + text)
        rows.append([PAD_ID] * pad + body)
        masks.append([0] * pad + [1] * len(body))
    return torch.tensor(rows), torch.tensor(masks)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def finish(family: str, model: Any, inputs: dict[str, Any], image_token_id: int | None) -> TinyCase:
    model.eval()
    gk: dict[str, Any] = {"pad_token_id": PAD_ID}
    if image_token_id is not None:
        # Random weights can emit the image token; it must never be generated.
        gk["suppress_tokens"] = [image_token_id]
    return TinyCase(family, model, inputs, image_token_id, gk)


def _clip_vision(image_size: int, patch: int, **over: Any) -> dict[str, Any]:
    cfg = dict(model_type="clip_vision_model", image_size=image_size, patch_size=patch, hidden_size=32,
               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    cfg.update(over)
    return cfg


def llama(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**text_config(**text)))
    ids, mask = _ids(batch, 0, text_len=8, left_pad=left_pad, generator=seeded(seed))
    return finish("llama", model, {"input_ids": ids, "attention_mask": mask}, None)


def llava(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0,
          vision: dict[str, Any] | None = None, **text: Any) -> TinyCase:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vcfg = _clip_vision(32, 8, **(vision or {}))
    cfg = LlavaConfig(vision_config=vcfg, text_config=dict(model_type="llama", **text_config(**text)),
                      image_token_index=IMAGE_TOKEN_ID, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg)
    n_tok = (vcfg["image_size"] // vcfg["patch_size"]) ** 2
    ids, mask = _ids(batch, n_tok if images else 0, left_pad=left_pad, generator=seeded(seed))
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if images:
        inputs["pixel_values"] = torch.randn(batch, 3, vcfg["image_size"], vcfg["image_size"], generator=seeded(seed))
    return finish("llava", model, inputs, IMAGE_TOKEN_ID)


def count_image_tokens(model: Any, **kw: Any) -> list[int]:
    with torch.no_grad():
        feats = model.model.get_image_features(**kw)
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, torch.Tensor):
        feats = list(feats) if feats.dim() == 3 else [feats]
    return [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in feats]


def _llava_next_like(family: str, batch: int, images: bool, left_pad: int, seed: int, tiles_hw: tuple[int, int],
                     **text: Any) -> TinyCase:
    import transformers

    cls_cfg, cls_model = {
        "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
        "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
    }[family]
    torch.manual_seed(seed)
    size = 32
    vcfg = _clip_vision(size, 8)
    extra: dict[str, Any] = {}
    strategy = "default"
    if family == "llava_onevision":
        vcfg = dict(model_type="siglip_vision_model", image_size=size, patch_size=8, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        extra["vision_aspect_ratio"] = "anyres_max_9"
        strategy = "full"  # SigLIP has no CLS token to drop
    cfg = getattr(transformers, cls_cfg)(
        vision_config=vcfg, text_config=dict(model_type="qwen2" if family == "llava_onevision" else "llama",
                                             **text_config(**text)),
        image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        vision_feature_select_strategy=strategy, **extra)
    model = getattr(transformers, cls_model)(cfg)
    h, w = tiles_hw
    n_tiles = 1 + (h // size) * (w // size)
    pixel = torch.randn(batch, n_tiles, 3, size, size, generator=seeded(seed))
    image_sizes = torch.tensor([[h, w]] * batch)
    n_tok = count_image_tokens(model, pixel_values=pixel, image_sizes=image_sizes)[0] if images else 0
    ids, mask = _ids(batch, n_tok, left_pad=left_pad, generator=seeded(seed))
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if images:
        inputs.update(pixel_values=pixel, image_sizes=image_sizes)
    return finish(family, model, inputs, IMAGE_TOKEN_ID)


def llava_next(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0,
               tiles_hw: tuple[int, int] = (64, 32), **text: Any) -> TinyCase:
    return _llava_next_like("llava_next", batch, images, left_pad, seed, tiles_hw, **text)


def llava_onevision(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0,
                    tiles_hw: tuple[int, int] = (64, 32), **text: Any) -> TinyCase:
    return _llava_next_like("llava_onevision", batch, images, left_pad, seed, tiles_hw, **text)


def _qwen_vl(family: str, batch: int, images: bool, left_pad: int, seed: int, **text: Any) -> TinyCase:
    import transformers

    names = {
        "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "qwen2_vl_text"),
        "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl_text"),
        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "qwen3_vl_text"),
    }[family]
    torch.manual_seed(seed)
    patch, merge, tp = 4, 2, 2
    tcfg = dict(model_type=names[2], **text_config(**text))
    tcfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [1, 1, 2] if family != "qwen3_vl" else [2, 1, 1]}
    if family == "qwen3_vl":
        tcfg["head_dim"] = 8
        vcfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=patch,
                    spatial_merge_size=merge, temporal_patch_size=tp, out_hidden_size=32, in_channels=3,
                    num_position_embeddings=64, deepstack_visual_indexes=[1])
    elif family == "qwen2_5_vl":
        vcfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=patch,
                    spatial_merge_size=merge, temporal_patch_size=tp, out_hidden_size=32, in_chans=3,
                    window_size=16, fullatt_block_indexes=[1])
    else:
        vcfg = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, patch_size=patch,
                    spatial_merge_size=merge, temporal_patch_size=tp, in_channels=3)
    cfg = getattr(transformers, names[0])(text_config=tcfg, vision_config=vcfg, image_token_id=IMAGE_TOKEN_ID,
                                          video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)
    model = getattr(transformers, names[1])(cfg)
    gh, gw = 4, 4  # patches per side, before merging
    n_tok = gh * gw // (merge * merge) if images else 0
    # Qwen counts images by their vision-start tokens (beam search expands inputs per image).
    ids, mask = _ids(batch, n_tok, left_pad=left_pad, generator=seeded(seed), frame=(102, 103))
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                              "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).long()}
    if images:
        inputs["pixel_values"] = torch.randn(batch * gh * gw, 3 * tp * patch * patch, generator=seeded(seed))
        inputs["image_grid_thw"] = torch.tensor([[1, gh, gw]] * batch)
    return finish(family, model, inputs, IMAGE_TOKEN_ID)


def qwen2_vl(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    return _qwen_vl("qwen2_vl", batch, images, left_pad, seed, **text)


def qwen2_5_vl(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    return _qwen_vl("qwen2_5_vl", batch, images, left_pad, seed, **text)


def qwen3_vl(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    return _qwen_vl("qwen3_vl", batch, images, left_pad, seed, **text)


def _idefics3_like(family: str, batch: int, images: bool, left_pad: int, seed: int, **text: Any) -> TinyCase:
    import transformers

    cls_cfg, cls_model, vtype = {
        "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration", "idefics3_vision"),
        "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration", "smolvlm_vision"),
    }[family]
    torch.manual_seed(seed)
    size, patch, scale = 32, 8, 2
    vcfg = dict(model_type=vtype, image_size=size, patch_size=patch, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4)
    cfg = getattr(transformers, cls_cfg)(vision_config=vcfg, text_config=dict(model_type="llama", **text_config(**text)),
                                         image_token_id=IMAGE_TOKEN_ID, scale_factor=scale)
    model = getattr(transformers, cls_model)(cfg)
    crops = 2
    n_tok = crops * ((size // patch) ** 2) // (scale * scale) if images else 0
    ids, mask = _ids(batch, n_tok, left_pad=left_pad, generator=seeded(seed))
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if images:
        inputs["pixel_values"] = torch.randn(batch, crops, 3, size, size, generator=seeded(seed))
        inputs["pixel_attention_mask"] = torch.ones(batch, crops, size, size, dtype=torch.bool)
    return finish(family, model, inputs, IMAGE_TOKEN_ID)


def idefics3(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    return _idefics3_like("idefics3", batch, images, left_pad, seed, **text)


def smolvlm(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    return _idefics3_like("smolvlm", batch, images, left_pad, seed, **text)


def paligemma(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    vcfg = dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    tcfg = dict(model_type="gemma", head_dim=8, **text_config(**text))
    cfg = PaliGemmaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=IMAGE_TOKEN_ID,
                          vocab_size=VOCAB, projection_dim=32, hidden_size=32)
    model = PaliGemmaForConditionalGeneration(cfg)
    n_tok = 16 if images else 0
    ids, mask = _ids(batch, n_tok, image_first=True, left_pad=left_pad, generator=seeded(seed))
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if images:
        inputs["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=seeded(seed))
    return finish("paligemma", model, inputs, IMAGE_TOKEN_ID)


def gemma3(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    vcfg = dict(model_type="siglip_vision_model", image_size=32, patch_size=4, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    tcfg = dict(model_type="gemma3_text", head_dim=8, sliding_window=8, **text_config(**text))
    mm_tokens = 4
    cfg = Gemma3Config(vision_config=vcfg, text_config=tcfg, mm_tokens_per_image=mm_tokens,
                       boi_token_index=104, eoi_token_index=105, image_token_index=IMAGE_TOKEN_ID)
    model = Gemma3ForConditionalGeneration(cfg)
    gen = seeded(seed)
    rows, masks = [], []
    for r in range(batch):
        pad = left_pad * r
        img = [104] + [IMAGE_TOKEN_ID] * mm_tokens + [105] if images else []
        body = [BOS_ID] + img + torch.randint(3, IMAGE_TOKEN_ID, (6 - pad,), generator=gen).tolist()
        rows.append([PAD_ID] * pad + body)
        masks.append([0] * pad + [1] * len(body))
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                              "token_type_ids": (ids == IMAGE_TOKEN_ID).long()}
    if images:
        inputs["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=gen)
    return finish("gemma3", model, inputs, IMAGE_TOKEN_ID)


def molmo_like(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0, **text: Any) -> TinyCase:
    from .molmo_like import build as build_molmo

    model, inputs = build_molmo(batch=batch, images=images, left_pad=left_pad, seed=seed, **text)
    case = TinyCase("molmo_like", model, inputs, IMAGE_TOKEN_ID, {})
    model.eval()
    return case


def molmo2(images: bool = True, seed: int = 0, **text: Any) -> TinyCase:
    """Molmo2 (native in recent transformers): one 28x28 image, 4 patches pooled into 2 tokens.

    Not in :data:`FAMILIES`: its image inputs come from a processor that needs torchvision,
    so they are built by hand here for batch 1 only.
    """
    import transformers

    if not hasattr(transformers, "Molmo2ForConditionalGeneration"):
        raise ImportError(f"transformers {transformers.__version__} has no Molmo2")
    torch.manual_seed(seed)
    tc = text_config(**text)
    cfg = transformers.Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, image_size=[28, 28], patch_size=14),
        adapter_config=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                            intermediate_size=64, text_hidden_size=tc["hidden_size"], vision_feature_layer=[-1]),
        text_config=dict(hidden_size=tc["hidden_size"], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         vocab_size=VOCAB, additional_vocab_size=0, num_hidden_layers=tc["num_hidden_layers"],
                         intermediate_size=tc["intermediate_size"]),
        image_start_token_id=101, low_res_image_start_token_id=102, image_end_token_id=103,
        image_patch_id=IMAGE_TOKEN_ID, frame_start_token_id=104, frame_end_token_id=105)
    model = transformers.Molmo2ForConditionalGeneration(cfg)
    g = seeded(seed)
    text_ids = torch.randint(3, IMAGE_TOKEN_ID, (5,), generator=g).tolist()
    body = [BOS_ID] + ([101, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 103] if images else []) + text_ids
    ids = torch.tensor([body])
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if images:
        inputs.update(pixel_values=torch.randn(1, 1, 4, 14 * 14 * 3, generator=g),
                      image_token_pooling=torch.tensor([[0, 1], [2, 3]]), image_grids=torch.tensor([[1, 2, 0, 0]]),
                      image_num_crops=torch.tensor([1]))
    return finish("molmo2", model, inputs, IMAGE_TOKEN_ID)


FAMILIES: dict[str, Callable[..., TinyCase]] = {
    "llama": llama,
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "paligemma": paligemma,
    "gemma3": gemma3,
    "molmo_like": molmo_like,
}


# Families built only on request (batch 1, inputs made by hand): not in the every-family tests.
EXTRA_FAMILIES: dict[str, Callable[..., TinyCase]] = {"molmo2": molmo2}


def build(family: str, **kw: Any) -> TinyCase:
    fn = FAMILIES.get(family) or EXTRA_FAMILIES.get(family)
    if fn is None:
        raise ValueError(f"unknown tiny family {family!r}; known: {sorted(FAMILIES) + sorted(EXTRA_FAMILIES)}")
    return fn(**kw)
