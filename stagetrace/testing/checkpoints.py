"""Tiny checkpoints on disk (model + tokenizer + processor, for `stagetrace profile` tests and
examples) and a tiny model split over two devices (the `device_map` path)."""
from __future__ import annotations

from typing import Any

import torch

from .tiny import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID, VOCAB, build

__all__ = ["tiny_tokenizer", "save_tiny_checkpoint", "split_over_gpus"]



def tiny_tokenizer(named: dict[int, str] | None = None) -> Any:
    """A word-level fast tokenizer with the tiny models' 128-token vocabulary, built offline.

    ``named`` gives some of the spare ids a name (a processor's own markers, ``<|vision_start|>``,
    ``<row_1_col_1>``): each is a special token, matched whole, at that id.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": 3}
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words += ["the", "a", "is", "what", "in", "this", "image", "describe", "picture", "color", "of", "?", ".", ","]
    for w in words:
        vocab.setdefault(w, len(vocab))
    named = dict(named or {})
    taken = [i for i in named if i < len(vocab) or i == IMAGE_TOKEN_ID or not 0 <= i < VOCAB]
    if taken or len(set(named.values())) < len(named) or set(named.values()) & set(vocab):
        raise ValueError(f"named tokens must take spare ids below {VOCAB}, other than {IMAGE_TOKEN_ID}, "
                         f"under new names: {named}")
    while len(vocab) < VOCAB:
        i = len(vocab)
        vocab[named.get(i, "<image>" if i == IMAGE_TOKEN_ID else f"<extra_{i}>")] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if named:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named.values()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def save_tiny_checkpoint(path: str, family: str = "llava") -> str:
    """Saves a tiny random-weight model and a matching processor with ``save_pretrained``.

    ``family`` is "llava" (a VLM with an image processor: every image becomes 16 tokens),
    "idefics3" (its image processor's pixel budget, ``size.longest_edge``, sets how many 32-pixel
    tiles, of 4 image tokens each, an image becomes: one tile when it fits one, else its grid of
    tiles and a downscaled whole) or "llama"
    (text only).
    """
    if family not in ("llava", "idefics3", "llama"):
        raise ValueError(f"save_tiny_checkpoint makes llava, idefics3 or llama checkpoints, not {family!r}")
    case = build(family)
    case.model.generation_config.pad_token_id = PAD_ID
    case.model.save_pretrained(path)
    if family == "idefics3":
        _idefics3_processor(case.model.config).save_pretrained(path)
        return path
    tok = tiny_tokenizer()
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


# Idefics3's markers around an image's tiles, on spare ids of the tiny vocabulary.
_IDEFICS3_MARKERS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                     *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]
# The tiny idefics3's pixel budget as saved (``size.longest_edge``) and its tile's side.
IDEFICS3_LONGEST_EDGE, IDEFICS3_TILE = 64, 32


def _idefics3_processor(config: Any) -> Any:
    from transformers import Idefics3Processor
    try:
        from transformers import Idefics3ImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import Idefics3ImageProcessor as ImageProcessor

    spare = [i for i in range(VOCAB) if i != IMAGE_TOKEN_ID][-len(_IDEFICS3_MARKERS):]  # 88..127 but 100
    tok = tiny_tokenizer(dict(zip(spare, _IDEFICS3_MARKERS)))
    vcfg = config.vision_config
    seq_len = (vcfg.image_size // vcfg.patch_size) ** 2 // (config.scale_factor ** 2)
    improc = ImageProcessor(size={"longest_edge": IDEFICS3_LONGEST_EDGE},
                            max_image_size={"longest_edge": vcfg.image_size})
    return Idefics3Processor(image_processor=improc, tokenizer=tok, image_seq_len=seq_len)


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
