"""What a call was given, as features for latency models: images, their sizes in pixels, the
image tokens fed to the language model, the text tokens.

Read without disturbing the run: nothing is computed on the device before or during the call
(a kernel queued ahead of the call's first mark delayed it and, under generate()'s compiled
decode, made its first CUDA-graph step re-record). After the call's one sync the tensors to
count are copied where they are (:meth:`PendingFeatures.hold`: the caller may reuse its input
buffers for the next call, as static-input serving does), and brought to the host and
counted when the record is built. Shapes are metadata. A feature the inputs do not tell is
``None``, never a guess. (A model whose generate() rewrites ``input_ids`` in place is counted
as rewritten.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PendingFeatures", "HeldFeatures", "queue_features"]

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


@dataclass(frozen=True)
class PendingFeatures:
    """What a call was given to count, held from its entry (device tensors untouched)."""

    images: int | None
    image_sizes: Any           # tensor (read after the call), list, or None
    input_ids: Any             # the prompt's ids
    placeholder_ids: list[int]
    attention_mask: Any

    def hold(self) -> "HeldFeatures":
        """After the call's sync, before generate() hands back: copies of what a count reads,
        where they are (only those read). A device tensor's copy is one device-to-device
        copy queued after the call's work, with no sync (a copy to the host here cost the call
        about 50 µs a tensor on an H200 host); it reaches the host when the record is built."""
        ids, mask = self.input_ids, self.attention_mask
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        sizes = self.image_sizes
        return HeldFeatures(
            images=self.images, image_sizes=_copy(sizes) if isinstance(sizes, torch.Tensor) else sizes,
            ids_shape=shape, placeholder_ids=self.placeholder_ids,
            ids=_copy(ids) if shape is not None and self.placeholder_ids else None,
            mask=_copy(mask) if shape is not None and isinstance(mask, torch.Tensor)
            and tuple(mask.shape) == shape else None)


@dataclass(frozen=True)
class HeldFeatures:
    """A call's features, copies its caller cannot change, counted when its record is built."""

    images: int | None
    image_sizes: Any                   # tensor copy, list, or None
    ids_shape: tuple[int, ...] | None  # the prompt's (batch, length); None: no 2-d input_ids
    placeholder_ids: list[int]
    ids: torch.Tensor | None           # the prompt's ids where placeholder tokens are counted
    mask: torch.Tensor | None          # its attention mask, where it has the ids' shape

    def resolve(self) -> dict[str, Any]:
        """Plain numbers, counted on the host (one copy there per tensor)."""
        sizes = self.image_sizes.tolist() if isinstance(self.image_sizes, torch.Tensor) else self.image_sizes
        image_tokens = attended = None
        if self.ids_shape is not None:
            if self.ids is not None:
                ids = self.ids.numpy(force=True)
                image_tokens = sum(int(np.count_nonzero(ids == i)) for i in self.placeholder_ids)
            attended = int(self.mask.numpy(force=True).sum()) if self.mask is not None else int(np.prod(self.ids_shape))
        text = attended - image_tokens if attended is not None and image_tokens is not None else attended
        return {"images": self.images, "image_sizes": [list(map(int, s)) for s in sizes] if sizes else [],
                "image_tokens": image_tokens, "text_tokens": text}


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy on ``t``'s device, stream-ordered after the call's work: later writes to ``t`` (the
    caller's next inputs) cannot reach it."""
    return t.detach().clone()


def queue_features(kwargs: dict[str, Any], input_ids: Any, config: Any) -> PendingFeatures:
    """Called at the call's entry: holds what to count, touches no device."""
    images, sizes = _images(kwargs)
    return PendingFeatures(images, sizes, input_ids, _placeholder_ids(config), kwargs.get("attention_mask"))
