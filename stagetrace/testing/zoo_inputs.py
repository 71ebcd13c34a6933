"""Inputs for the zoo's tiny models: vision tensors by input style, and prompts with as many image
tokens as the model's own ``get_image_features`` makes of those tensors."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from .zoo_specs import Spec

BOS = 1
TEXT_LEN = 6
GRID = (4, 4)  # patches per side of an image given as patches
CROPS = 2  # crops per image given as crops


@dataclass
class Vision:
    inputs: dict[str, Any]
    modality: str = "image"  # which get_<modality>_features consumes them ("text": none, a text-only prompt)


def vcfg(model: Any, spec: Spec | None = None) -> Any:
    cfg = model.config
    name = spec.vision_config if spec is not None and spec.vision_config is not None else "vision_config"
    for part in filter(None, name.split(".")):
        cfg = getattr(cfg, part, None) if cfg is not None else None
    return cfg if cfg is not None else model.config


def first(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _size(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def channels(cfg: Any) -> int:
    return int(first(cfg, "num_channels", "in_channels", "in_chans", default=3))


def pixels(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """One image per row: ``pixel_values (B, C, H, W)`` at the vision config's image size."""
    cfg = vcfg(model, spec)
    size = spec.image_hw or (_size(first(cfg, "image_size", default=32)),) * 2
    pv = torch.randn(batch, channels(cfg), *size, generator=gen)
    inputs: dict[str, Any] = {"pixel_values": pv}
    if spec.with_image_sizes:
        inputs["image_sizes"] = torch.tensor([list(size)] * batch)
    return Vision(inputs)


def tiles(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """LLaVA-NeXT style any-resolution: a base tile plus the tiles of a 2x1 grid, ``image_sizes``."""
    cfg = vcfg(model, spec)
    size = _size(first(cfg, "image_size"))
    h, w = 2 * size, size
    n = 1 + (h // size) * (w // size)
    pv = torch.randn(batch, n, channels(cfg), size, size, generator=gen)
    return Vision({"pixel_values": pv, "image_sizes": torch.tensor([[h, w]] * batch)})


def grid(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Qwen2-VL style patches ``(B*t*h*w, C*tp*p*p)`` (or unflattened, ``(.., C, p, p)``), ``image_grid_thw``."""
    cfg = vcfg(model, spec)
    p = _size(first(cfg, "patch_size", "spatial_patch_size"))
    tp = int(first(cfg, "temporal_patch_size", "patch_temporal", default=1))
    gh, gw = GRID
    patch = (channels(cfg), *((tp,) if tp > 1 else ()), p, p)
    shape = patch if spec.patch_layout == "chw" else (math.prod(patch),)
    pv = torch.randn(batch * gh * gw, *shape, generator=gen)
    return Vision({"pixel_values": pv, "image_grid_thw": torch.tensor([[1, gh, gw]] * batch)})


def crops(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Idefics2/3 style 5-D ``pixel_values (B, crops, C, H, W)`` and ``pixel_attention_mask``."""
    cfg = vcfg(model, spec)
    size = _size(first(cfg, "image_size"))
    n = CROPS
    pv = torch.randn(batch, n, channels(cfg), size, size, generator=gen)
    mask = torch.ones(batch, n, *(() if spec.tile_mask else (size, size)), dtype=torch.bool)
    return Vision({"pixel_values": pv, "pixel_attention_mask": mask})


def text(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """No vision input: a text-only causal LM gets its prompt alone."""
    return Vision({}, modality="text")


STYLES: dict[str, Callable[..., Vision]] = {"pixels": pixels, "tiles": tiles, "grid": grid, "crops": crops,
                                            "text": text}


def register(fn: Callable[..., Vision]) -> Callable[..., Vision]:
    STYLES[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------------------------------------


def feature_fn(model: Any, modality: str = "image") -> Callable[..., Any] | None:
    """The ``get_<modality>_features`` that ``generate()`` itself calls (on the base model)."""
    name = f"get_{modality}_features"
    return getattr(model.base_model, name, None) or getattr(model, name, None)


def feature_rows(out: Any) -> int:
    """Rows of features an image-features output holds (pooler output, else last hidden state)."""
    if not isinstance(out, (torch.Tensor, list, tuple)):
        feats = getattr(out, "pooler_output", None)
        out = feats if feats is not None else out.last_hidden_state
    if isinstance(out, torch.Tensor):
        return int(out.reshape(-1, out.shape[-1]).shape[0])
    return sum(feature_rows(o) for o in out)


def count_features(model: Any, vision: Vision, batch: int, rows_of: Callable[[Any], Any] = lambda out: out) -> int:
    """Image tokens one prompt row needs: the model's own features of these inputs, divided by rows."""
    rows = feature_rows(rows_of(call_features(model, vision)))
    if rows % batch:
        raise ValueError(f"{rows} feature rows for a batch of {batch}")
    return rows // batch


def call_features(model: Any, vision: Vision) -> Any:
    """The model's own ``get_<modality>_features`` on these inputs (what generate() calls)."""
    fn = feature_fn(model, vision.modality)
    if fn is None:
        raise TypeError(f"{type(model).__name__} has no get_{vision.modality}_features")
    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in vision.inputs.items() if k in params}
    if "pixel_values" not in kw and "pixel_values" in params:  # e.g. pixel_values_images / _videos
        kw["pixel_values"] = next(v for k, v in vision.inputs.items() if k.startswith("pixel_values"))
    with torch.no_grad():
        return fn(**kw)


def image_token_id(model: Any, spec: Spec, modality: str = "image") -> int:
    if spec.image_token is not None:
        return int(getattr(model.config, spec.image_token)) if isinstance(spec.image_token, str) else spec.image_token
    for cfg in (model.config, model.config.get_text_config()):
        for name in (f"{modality}_token_id", f"{modality}_token_index", f"{modality}_token", f"{modality}_pad_id"):
            v = getattr(cfg, name, None)
            if isinstance(v, int):
                return v
    raise ValueError(f"no {modality} token id in {type(model.config).__name__}")


def _frame(model: Any) -> tuple[list[int], list[int]]:
    """The tokens the config names around an image (vision start/end, begin/end of image)."""
    cfg = model.config
    for a, b in (("vision_start_token_id", "vision_end_token_id"), ("boi_token_index", "eoi_token_index"),
                 ("boi_token_id", "eoi_token_id"), ("image_start_token_id", "image_end_token_id")):
        s, e = getattr(cfg, a, None), getattr(cfg, b, None)
        if isinstance(s, int) and isinstance(e, int):
            return [s], [e]
    return [], []


def prompt_ids(model: Any, batch: int, n_tokens: int, gen: torch.Generator, spec: Spec,
               modality: str = "image") -> tuple[dict[str, torch.Tensor], int]:
    """``[BOS] + frame_start + n image tokens + frame_end + text`` per row, its mask and token types."""
    from .zoo import special_ids

    img = image_token_id(model, spec, modality) if n_tokens else -1
    start, end = _frame(model) if n_tokens else ([], [])
    reserved = set(special_ids(model.config)) | {0, 1, 2}
    pool = torch.tensor([i for i in range(3, 256) if i not in reserved])  # 256.. : VQ codes, special ids
    rows = []
    for _ in range(batch):
        text = pool[torch.randint(len(pool), (TEXT_LEN,), generator=gen)].tolist()
        rows.append([BOS] + start + [img] * n_tokens + end + text)
    ids = torch.tensor(rows)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    params = inspect.signature(model.forward).parameters
    if modality == "text":  # token types mark image tokens: a text-only prompt has none (XLNet's would go stale)
        return out, img
    if "token_type_ids" in params:
        out["token_type_ids"] = (ids == img).long()
    if "mm_token_type_ids" in params:
        out["mm_token_type_ids"] = (ids == img).long() * (2 if modality == "video" else 1)
    return out, img


# ---------------------------------------------------------------------------------------------
# Family-specific vision inputs.


def _patches(model: Any, spec: Spec) -> tuple[Any, int, int, int]:
    cfg = vcfg(model, spec)
    return cfg, channels(cfg), _size(first(cfg, "patch_size")), _size(first(cfg, "image_size", default=32))


@register
def navit(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """MiniCPM-V: every image's patches packed side by side, ``(1, C, p, B*h*w*p)``, ``target_sizes``."""
    _, c, p, size = _patches(model, spec)
    side = size // p
    pv = torch.randn(1, c, p, batch * side * side * p, generator=gen)
    return Vision({"pixel_values": pv, "target_sizes": torch.tensor([[side, side]] * batch, dtype=torch.int32)})


@register
def siglip2(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """NaFlex (SigLIP2) patches ``(B, h*w, C*p*p)``, ``spatial_shapes`` and ``pixel_attention_mask``."""
    _, c, p, size = _patches(model, spec)
    side = size // p
    pv = torch.randn(batch, side * side, c * p * p, generator=gen)
    return Vision({"pixel_values": pv, "spatial_shapes": torch.tensor([[side, side]] * batch),
                   "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long)})


@register
def grid_hw(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Flattened patches ``(B*h*w, C*p*p)`` and ``image_grid_hw``."""
    _, c, p, _ = _patches(model, spec)
    gh, gw = GRID
    return Vision({"pixel_values": torch.randn(batch * gh * gw, c * p * p, generator=gen),
                   "image_grid_hw": torch.tensor([[gh, gw]] * batch)})


@register
def merged_blocks(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Inkling2: one ``(m*p, m*p, C)`` block per merged token, ``image_grid_thw`` in merged units."""
    cfg, c, p, _ = _patches(model, spec)
    m = int(first(cfg, "spatial_merge_size", "merge_size", default=2))
    gh, gw = GRID[0] // m, GRID[1] // m
    pv = torch.randn(batch * gh * gw, m * p, m * p, c, generator=gen)
    return Vision({"pixel_values": pv, "image_grid_thw": torch.tensor([[1, gh, gw]] * batch)})


@register
def grid_merge_sizes(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """VideoLLaMA3: grid patches plus the spatial merge size of every image."""
    vision = grid(model, batch, gen, spec)
    merge = int(first(vcfg(model, spec), "spatial_merge_size", "merge_size", default=2))
    vision.inputs["image_merge_sizes"] = torch.tensor([merge] * batch)
    return vision


@register
def patches_xy(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Gemma 4: patches ``(B, n, C*p*p)`` of a grid ``pooling_kernel_size`` x 2 a side, (x, y) positions."""
    cfg, c, p, _ = _patches(model, spec)
    side = 2 * int(first(cfg, "pooling_kernel_size", default=1))
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], -1)
    return Vision({"pixel_values": torch.rand(batch, side * side, c * p * p, generator=gen),
                   "image_position_ids": pos.expand(batch, -1, -1).clone()})


@register
def merged_patches_xy(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Gemma 4 unified (encoder-free): one raw ``(p*k)^2 * C`` patch per image token, 2 x 2 of them."""
    cfg, c, p, _ = _patches(model, spec)
    side = p * int(first(cfg, "pooling_kernel_size", default=1))
    pos = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])
    return Vision({"pixel_values": torch.rand(batch, 4, c * side * side, generator=gen),
                   "image_position_ids": pos.expand(batch, -1, -1).clone()})


def _qformer_text(model: Any, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, 4), generator=gen)
    return {"qformer_input_ids": ids, "qformer_attention_mask": torch.ones_like(ids)}


@register
def pixels_qformer(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """InstructBLIP: the image and the instruction the Q-Former reads."""
    vision = pixels(model, batch, gen, spec)
    vision.inputs.update(_qformer_text(model, batch, gen))
    return vision


@register
def frames_qformer(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """InstructBLIP-Video: 4 frames ``(B, 4, C, H, W)`` (its generate() assumes 4) and the instruction."""
    cfg = vcfg(model, spec)
    size = _size(first(cfg, "image_size"))
    inputs = {"pixel_values": torch.randn(batch, 4, channels(cfg), size, size, generator=gen)}
    inputs.update(_qformer_text(model, batch, gen))
    return Vision(inputs, modality="video")


@register
def flat_patches(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Fuyu: the image as a row of raw patches ``(B, 16, C*p*p)``, straight into a linear embedding."""
    _, c, p, _ = _patches(model, spec)
    return Vision({"pixel_values": torch.randn(batch, 16, c * p * p, generator=gen)})


@register
def tiles_cross(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Mllama: one image of ``max_num_tiles`` tiles ``(B, 1, T, C, H, W)``, its aspect ratio id and mask."""
    cfg = vcfg(model, spec)
    size, tiles = _size(first(cfg, "image_size")), int(first(cfg, "max_num_tiles", default=1))
    pv = torch.randn(batch, 1, tiles, channels(cfg), size, size, generator=gen)
    return Vision({"pixel_values": pv, "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),
                   "aspect_ratio_mask": torch.ones(batch, 1, tiles, dtype=torch.long)})


@register
def images_5d(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """IDEFICS (1): one image per row, ``(B, 1, C, H, W)``; the text's image attention mask comes later."""
    cfg = vcfg(model, spec)
    size = _size(first(cfg, "image_size"))
    return Vision({"pixel_values": torch.randn(batch, 1, channels(cfg), size, size, generator=gen)})


@register
def flattened_patches(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Pix2Struct / Kosmos-2.5: 4 x 4 patches ``(B, 16, 2 + C*p*p)``, 1-based row and column first."""
    cfg = vcfg(model, spec)
    rows, cols = torch.meshgrid(torch.arange(1, 5), torch.arange(1, 5), indexing="ij")
    ids = torch.stack([rows.flatten(), cols.flatten()], -1).float().expand(batch, -1, -1)
    pixels = torch.randn(batch, 16, int(cfg.patch_embed_hidden_size), generator=gen)
    return Vision({"flattened_patches": torch.cat([ids, pixels], -1)})


@register
def patch_cubes(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Inkling: 4 patches per image, each a ``(tp, p, p, C)`` cube folded to one token by an MLP stack."""
    cfg, c, p, _ = _patches(model, spec)
    tp = int(first(cfg, "temporal_patch_size", default=1))
    return Vision({"pixel_values": torch.randn(batch * 4, tp, p, p, c, generator=gen)})


@register
def two_resolutions(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """DeepSeek-VL hybrid: the low-resolution image and the same image at the high-resolution tower's size."""
    vision = pixels(model, batch, gen, spec)
    cfg = model.config.high_res_vision_config
    size = _size(cfg.image_size)
    vision.inputs["high_res_pixel_values"] = torch.randn(batch, channels(cfg), size, size, generator=gen)
    return vision


@register
def pooled_crops(model: Any, batch: int, gen: torch.Generator, spec: Spec) -> Vision:
    """Molmo2: one crop of 2 x 2 patches per image ``(B, 1, 4, p*p*C)``, pooled pairwise into 2 tokens."""
    cfg, c, p, _ = _patches(model, spec)
    pooling = torch.tensor([[0, 1], [2, 3]])
    return Vision({"pixel_values": torch.randn(batch, 1, 4, p * p * c, generator=gen),
                   "image_token_pooling": torch.cat([pooling + 4 * b for b in range(batch)]),
                   "image_grids": torch.tensor([[1, 2, 0, 0]] * batch), "image_num_crops": torch.ones(batch).long()})
