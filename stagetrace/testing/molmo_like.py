"""A small model that mimics the Molmo / MolmoE remote-code layout and calling pattern.

The published remote code does not run on transformers 5.x, but users still profile
it, so stagetrace must handle its shape. What this mimics, and what must stay true:

* vision runs *inside the first (prefill) forward* only: images are passed only while
  ``past_key_values is None``;
* LLM blocks live at ``model.transformer.blocks`` (a ModuleList, no forward of its own),
  final norm ``model.transformer.ln_f``, head ``model.transformer.ff_out``;
* blocks return an ``(x, cache)`` tuple, and the cache is a legacy list of
  ``(key, value)`` tuples;
* ``generate()`` is the model's own loop, not transformers' GenerationMixin.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

__all__ = ["MolmoLikeForCausalLM", "build"]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(d)
        self.att_proj = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ff_norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, layer_past: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        q, k, v = self.att_proj(self.attn_norm(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if layer_past is not None:
            k = torch.cat([layer_past[0], k], dim=2)
            v = torch.cat([layer_past[1], v], dim=2)
        past_len = k.shape[2] - t
        causal = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past_len)
        mask = causal if attention_bias is None else causal & attention_bias[:, None, None, :]
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        x = x + self.ff(self.ff_norm(x))
        return x, (k, v)


class _VisionBackbone(nn.Module):
    def __init__(self, d: int, patch_dim: int):
        super().__init__()
        self.image_vit = nn.Sequential(nn.Linear(patch_dim, d), nn.GELU(), nn.Linear(d, d))
        self.image_pooling_2d = nn.Linear(d, d)
        self.image_projector = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # images: (B, crops, patches, patch_dim) -> features (B, crops * patches, d), cls (B, d)
        b = images.shape[0]
        x = self.image_vit(images)
        cls = x.mean(dim=(1, 2))
        x = self.image_pooling_2d(x)
        x = self.image_projector(x)
        return x.reshape(b, -1, x.shape[-1]), cls


class _Molmo(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, patch_dim: int):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d),
            blocks=nn.ModuleList([_Block(d, heads) for _ in range(layers)]),
            ln_f=nn.LayerNorm(d),
            ff_out=nn.Linear(d, vocab, bias=False),
        ))
        self.vision_backbone = _VisionBackbone(d, patch_dim)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                image_masks: torch.Tensor | None = None, image_input_idx: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                use_cache: bool = True) -> SimpleNamespace:
        x = self.transformer.wte(input_ids)
        if images is not None:
            feats, _ = self.vision_backbone(images, image_masks)
            # Scatter image features onto their token positions (Molmo adds them).
            for b in range(x.shape[0]):
                x[b, image_input_idx[b]] = x[b, image_input_idx[b]] + feats[b, : image_input_idx.shape[1]]
        bias = attention_mask.bool() if attention_mask is not None else None
        presents: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(self.transformer.blocks):
            x, cache = block(x, None if past_key_values is None else past_key_values[i], bias)
            presents.append(cache)
        logits = self.transformer.ff_out(self.transformer.ln_f(x))
        return SimpleNamespace(logits=logits, attn_key_values=presents if use_cache else None)


class MolmoLikeForCausalLM(nn.Module):
    """Top-level wrapper with Molmo's own greedy ``generate`` loop."""

    def __init__(self, vocab: int = 128, d: int = 32, layers: int = 2, heads: int = 4, patch_dim: int = 48):
        super().__init__()
        self.config = SimpleNamespace(model_type="molmo_like", _name_or_path="molmo-like-tiny",
                                      num_hidden_layers=layers, hidden_size=d, vocab_size=vocab)
        self.model = _Molmo(vocab, d, layers, heads, patch_dim)

    def forward(self, input_ids: torch.Tensor, **kw: Any) -> SimpleNamespace:
        return self.model(input_ids, **kw)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 images: torch.Tensor | None = None, image_masks: torch.Tensor | None = None,
                 image_input_idx: torch.Tensor | None = None, max_new_tokens: int = 8,
                 use_cache: bool = True, **_: Any) -> torch.Tensor:
        seq = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        past = None
        for _step in range(max_new_tokens):
            if past is None:
                out = self(seq, images=images, image_masks=image_masks, image_input_idx=image_input_idx,
                           attention_mask=mask, past_key_values=None, use_cache=use_cache)
            else:
                out = self(seq[:, -1:], attention_mask=mask, past_key_values=past, use_cache=use_cache)
            # Without a cache Molmo re-reads the whole sequence, images included.
            past = out.attn_key_values if use_cache else None
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        return seq


def build(batch: int = 1, images: bool = True, left_pad: int = 0, seed: int = 0,
          hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 4,
          **_: Any) -> tuple[MolmoLikeForCausalLM, dict[str, Any]]:
    torch.manual_seed(seed)
    crops, patches, patch_dim = 2, 4, 48
    model = MolmoLikeForCausalLM(d=hidden_size, layers=num_hidden_layers, heads=num_attention_heads,
                                 patch_dim=patch_dim)
    n_img = crops * patches if images else 0
    gen = torch.Generator().manual_seed(seed)
    rows, masks, idx = [], [], []
    for r in range(batch):
        pad = left_pad * r
        body = [1] + [100] * n_img + torch.randint(3, 100, (6 - pad,), generator=gen).tolist()
        rows.append([0] * pad + body)
        masks.append([0] * pad + [1] * len(body))
        idx.append(list(range(pad + 1, pad + 1 + n_img)))
    inputs: dict[str, Any] = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
    if images:
        inputs["images"] = torch.randn(batch, crops, patches, patch_dim, generator=gen)
        inputs["image_masks"] = torch.ones(batch, crops, patches)
        inputs["image_input_idx"] = torch.tensor(idx)
    return model, inputs
