"""What a call was given, as features for latency models: images, their sizes in pixels, the
image tokens fed to the language model, the text tokens.

Read without disturbing the run: nothing is computed on the device before or during the call
(a kernel queued ahead of the call's first mark delayed it and, under generate()'s compiled
decode, made its first CUDA-graph step re-record); the tensors are held and counted after the
call's one sync. Shapes are metadata. A feature the inputs do not tell is ``None``, never a
guess. (A model whose generate() rewrites ``input_ids`` in place is counted as rewritten.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PendingFeatures", "queue_features"]

# Config attributes naming the placeholder tokens a processor puts where an image's (or a
# video's) features go.
_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def _placeholder_ids(config: Any) -> list[int]:
    ids = []
    for cfg in (config, getattr(config, "text_config", None)):
        for attr in _TOKEN_ATTRS:
            v = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)
    return ids


def _images(kwargs: dict[str, Any]) -> tuple[int | None, Any]:
    """(number of images, their (height, width) in pixels — a tensor to read later, or a list).

    From the processor's own per-image rows where it gives them (``image_grid_thw``,
    ``image_sizes``: the images as given), else from ``pixel_values`` of one image per row
    (N, C, H, W: the size the model sees). A 5-d ``pixel_values`` (batch, crops or images,
    C, H, W — Idefics3, SmolVLM pad images and split them into crops) does not say how many
    images there were nor their size: None and no sizes, never the batch or a crop's size."""
    for key in ("image_grid_thw", "image_sizes"):
        v = kwargs.get(key)
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            return int(v.shape[0]), (v if key == "image_sizes" else None)
    pv = kwargs.get("pixel_values")
    if isinstance(pv, torch.Tensor) and pv.dim() == 4:
        return int(pv.shape[0]), [[int(pv.shape[-2]), int(pv.shape[-1])]] * int(pv.shape[0])
    return None, None


@dataclass
class PendingFeatures:
    images: int | None
    image_sizes: Any           # tensor (read after the call), list, or None
    input_ids: Any             # the prompt's ids, counted after the call
    placeholder_ids: list[int]
    attention_mask: Any

    def resolve(self) -> dict[str, Any]:
        """After the call's sync: plain numbers, counted on the host (one copy per tensor: a
        count on the GPU is a kernel and a sync each, and this runs inside the traced call)."""
        sizes = self.image_sizes.tolist() if isinstance(self.image_sizes, torch.Tensor) else self.image_sizes
        ids = self.input_ids
        image_tokens = attended = None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            host_ids = ids.numpy(force=True)  # detached, on the host: one copy
            if self.placeholder_ids:
                image_tokens = sum(int(np.count_nonzero(host_ids == i)) for i in self.placeholder_ids)
            mask = self.attention_mask
            attended = (int(mask.numpy(force=True).sum()) if isinstance(mask, torch.Tensor)
                        and mask.shape == ids.shape else ids.numel())
        text = attended - image_tokens if attended is not None and image_tokens is not None else attended
        return {"images": self.images, "image_sizes": [list(map(int, s)) for s in sizes] if sizes else [],
                "image_tokens": image_tokens, "text_tokens": text}


def queue_features(kwargs: dict[str, Any], input_ids: Any, config: Any) -> PendingFeatures:
    """Called at the call's entry: holds what to count, touches no device."""
    images, sizes = _images(kwargs)
    return PendingFeatures(images, sizes, input_ids, _placeholder_ids(config), kwargs.get("attention_mask"))
