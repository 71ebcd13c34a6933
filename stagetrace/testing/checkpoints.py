"""Tiny checkpoints on disk (model + tokenizer + processor, for `stagetrace profile` tests and
examples) and a tiny model split over two devices (the `device_map` path)."""
from __future__ import annotations

from typing import Any

import torch

from .tiny import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID, VOCAB, build

__all__ = ["tiny_tokenizer", "save_tiny_checkpoint", "split_over_gpus"]



def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer with the tiny models' 128-token vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": 3}
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words += ["the", "a", "is", "what", "in", "this", "image", "describe", "picture", "color", "of", "?", ".", ","]
    for w in words:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < IMAGE_TOKEN_ID:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    vocab["<image>"] = IMAGE_TOKEN_ID
    while len(vocab) < VOCAB:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def save_tiny_checkpoint(path: str, family: str = "llava") -> str:
    """Saves a tiny random-weight model and a matching processor with ``save_pretrained``.

    ``family`` is "llava" (a VLM with an image processor) or "llama" (text only).
    """
    tok = tiny_tokenizer()
    case = build(family)
    case.model.generation_config.pad_token_id = PAD_ID
    case.model.save_pretrained(path)
    if family == "llama":
        tok.save_pretrained(path)
        return path
    from transformers import LlavaProcessor
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    size = case.model.config.vision_config.image_size
    improc = ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=case.model.config.vision_config.patch_size,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)
    proc.save_pretrained(path)
    return path


def split_over_gpus(model: torch.nn.Module, devices: tuple[str, str] = ("cuda:0", "cuda:1")) -> torch.nn.Module:
    """``accelerate.dispatch_model`` the way a ``device_map`` splits a model that does not fit one card.

    Vision, embeddings and the first half of the decoder layers on ``devices[0]``; the
    second half, the final norm and the lm_head on ``devices[1]``. Returns the model.
    """
    from accelerate import dispatch_model

    from ..layouts import get_module, resolve_layout

    lay = resolve_layout(model)
    names = [n for n, _ in lay.layers]
    second = set(names[len(names) // 2:]) | {lay.lm_head[0]}
    norm = f"{lay.language_model[0]}.norm"
    if get_module(model, norm) is not None:
        second.add(norm)
    device_map: dict[str, str] = {}

    def assign(path: str, module: torch.nn.Module) -> None:
        if path in second:
            device_map[path] = devices[1]
        elif not any(s.startswith(f"{path}.") or not path for s in second):
            device_map[path] = devices[0]
        else:  # holds modules of both halves: its own tensors on the first card, then each child
            for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                device_map[f"{path}.{n}" if path else n] = devices[0]
            for n, child in module.named_children():
                assign(f"{path}.{n}" if path else n, child)

    assign("", model)
    return dispatch_model(model, device_map=device_map)
