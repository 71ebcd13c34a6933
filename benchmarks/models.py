"""Benchmark-scale random-weight models: the realistic sizes our GPU figures use.

CLIP-L/336 vision + a 22-layer 2048-wide Llama (LLaVA, LLaVA-NeXT tiles) and that Llama
alone, built directly on the device in bf16. Nothing is downloaded. Tests use the tiny
models of ``stagetrace.testing.tiny`` instead.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from stagetrace.testing.tiny import BOS_ID, EOS_ID, PAD_ID, TinyCase, count_image_tokens, finish, seeded

__all__ = ["llava_realistic", "llama_realistic", "llava_next_realistic", "llava_next_small", "llava_next_inputs",
           "REAL_IMAGE_TOKEN_ID"]


CLIP_L_336 = dict(model_type="clip_vision_model", image_size=336, patch_size=14, hidden_size=1024,
                  intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=8192,
                pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
REAL_IMAGE_TOKEN_ID = 32000 - 1
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@contextlib.contextmanager
def _build_on(device: str | torch.device, dtype: torch.dtype):
    """Construct (and randomly initialise) weights directly on the device, in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _real_ids(batch: int, n_image: int, text_len: int, seed: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(seed)
    rows = []
    for _ in range(batch):
        text = torch.randint(3, 31000, (text_len,), generator=g).tolist()
        rows.append([BOS_ID] + [REAL_IMAGE_TOKEN_ID] * n_image + text)
    ids = torch.tensor(rows, device=device)
    return ids, torch.ones_like(ids)


def llava_realistic(batch: int = 1, images: bool = True, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                    text_len: int = 32, seed: int = 0, num_hidden_layers: int | None = None) -> TinyCase:
    """Random-weight LLaVA of realistic size: CLIP-L/336 + 22-layer 2048-wide Llama (576 image tokens)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(LLAMA_1B, **({"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}))
    cfg = LlavaConfig(vision_config=dict(CLIP_L_336), text_config=dict(model_type="llama", **text),
                      image_token_index=REAL_IMAGE_TOKEN_ID, vision_feature_select_strategy="default")
    with _build_on(device, dtype):
        model = LlavaForConditionalGeneration(cfg)
    ids, mask = _real_ids(batch, 576 if images else 0, text_len, seed, device)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if images:
        inputs["pixel_values"] = torch.randn(batch, 3, 336, 336, generator=seeded(seed)).to(device, dtype)
    return finish("llava_realistic", model, inputs, REAL_IMAGE_TOKEN_ID)


def llama_realistic(batch: int = 1, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, text_len: int = 608,
                    seed: int = 0, **_: Any) -> TinyCase:
    """The text half of :func:`llava_realistic` alone, with a prompt as long as LLaVA's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with _build_on(device, dtype):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    ids, mask = _real_ids(batch, 0, text_len - 1, seed, device)
    return finish("llama_realistic", model, {"input_ids": ids, "attention_mask": mask}, None)


def llava_next_realistic(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                         num_hidden_layers: int | None = None) -> Any:
    """Random-weight LLaVA-NeXT (CLIP-L/336 tiles + the 22-layer Llama); returns the model only.

    Use :func:`llava_next_inputs` for one sample of a given image size (the tile count follows it).
    """
    text = dict(LLAMA_1B, **({"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}))
    return _llava_next(dict(CLIP_L_336), text, NEXT_PINPOINTS, device, dtype, seed)


def llava_next_small(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """:func:`llava_next_realistic` scaled down for CPU smoke runs: the same structure and tile
    geometry (pinpoints, 4x4 instead of 24x24 patches a tile, 56-pixel tiles), tiny widths; the
    same vocabulary, so :func:`llava_next_inputs` serves both."""
    scale = 56 / 336
    vision = dict(CLIP_L_336, image_size=56, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=32)
    text = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    pinpoints = [[round(h * scale), round(w * scale)] for h, w in NEXT_PINPOINTS]
    return _llava_next(vision, text, pinpoints, device, dtype, seed)


def _llava_next(vision: dict, text: dict, pinpoints: list, device: Any, dtype: torch.dtype, seed: int) -> Any:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=vision, text_config=dict(model_type="llama", **text),
                          image_token_index=REAL_IMAGE_TOKEN_ID, image_grid_pinpoints=pinpoints,
                          vision_feature_select_strategy="default")
    with _build_on(device, dtype):
        model = LlavaNextForConditionalGeneration(cfg)
    return model.eval()


def llava_next_inputs(model: Any, image_hw: tuple[int, int], text_len: int = 24, seed: int = 0) -> dict[str, Any]:
    """Inputs for one image of size `image_hw`: its tiles and exactly as many image tokens as they make."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    p = next(model.parameters())
    size = model.config.vision_config.image_size
    n_tiles = image_size_to_num_patches(image_hw, model.config.image_grid_pinpoints, size)
    pixel = torch.randn(1, n_tiles, 3, size, size, generator=seeded(seed)).to(p.device, p.dtype)
    image_sizes = torch.tensor([list(image_hw)], device=p.device)
    n_tok = count_image_tokens(model, pixel_values=pixel, image_sizes=image_sizes)[0]
    ids, mask = _real_ids(1, n_tok, text_len, seed, p.device)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel, "image_sizes": image_sizes}

