"""What a model's own structure says about its stages (transformers 5.x), before any table.

* **Vision entries**: ``get_image_features`` / ``get_video_features`` (encoder and
  projector together) and ``get_image_tokens`` (a VQ tokenizer: images become tokens),
  defined on the top model or on its ``base_model``. ``generate()`` calls them itself
  before the first forward (``_prepare_multimodal_encoder_kwargs_for_generation``); a
  forward called directly calls them from inside. Their run is the vision stage.
* **The encoder** of an encoder–decoder model (``config.is_encoder_decoder``), which
  ``generate()`` runs once before the first decoder forward: the vision stage when it
  takes the image, else the start of prefill.
* **Inner generators**: submodules with a ``generate()`` of their own. A ``generate()``
  that delegates to one (BLIP-2, InstructBLIP, Kosmos-2 …) never calls the top forward:
  the inner model's forwards are then the call's prefill and decode steps.
* **Decoder layers**: the block list inside the language model, found by shape.
* **Audio entries**: ``get_audio_features`` (an audio encoder and its projector in one call) on
  the top model, its ``base_model`` and its inner generators (an omni model's thinker); where
  a model has none, its top-most modules named like an audio part. stagetrace has no audio
  stage: their runs are marked only so that the record can say in which stage that time is
  counted.

Every probe here only reads the model; none runs it.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from torch import nn

__all__ = ["VISION_ENTRIES", "PIXEL_ARGS", "VISION_WORDS", "takes_images", "vision_entries", "encoder_of",
           "encoder_takes_images", "inner_generators", "find_layers", "path_of", "probe_accessors",
           "AUDIO_ENTRIES", "AUDIO_ARGS", "AUDIO_WORDS", "audio_entries", "audio_modules", "encoder_takes_audio"]

VISION_ENTRIES = ("get_image_features", "get_video_features", "get_image_tokens")
# Arguments that carry pixels (fuyu's image_patches, pix2struct's flattened_patches, ...), to a
# forward or to generate(): a call given one of these should have a vision stage.
PIXEL_ARGS = ("pixel_values", "pixel_values_images", "pixel_values_videos", "pixel_values_video", "image_patches",
              "flattened_patches", "images", "image")
# Module names that say "vision part".
VISION_WORDS = re.compile(r"(vision|visual|image|img|vit|pixel|patch)", re.I)
_LAYER_NAMES = ("layers", "layer", "blocks", "block", "h")
AUDIO_ENTRIES = ("get_audio_features",)
# Arguments that carry audio (mel features, waveforms), to a forward or to generate().
AUDIO_ARGS = ("input_features", "input_values", "audio_values", "input_audio_embeds")
# Module names that say "audio part".
AUDIO_WORDS = re.compile(r"(audio|speech|acoustic|codec|whisper)", re.I)


def takes_images(model: nn.Module) -> bool | None:
    """Whether the model's forward takes an argument named like an image (``pixel_values``,
    ``image_pixel_values``, ``flattened_patches``, remote code's ``images`` ...); None where its
    signature does not say (only ``*args``/``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return any(VISION_WORDS.search(n) for n in named) if named else None


def path_of(root: nn.Module, target: Any) -> str | None:
    if not isinstance(target, nn.Module):
        return None
    for name, mod in root.named_modules():
        if mod is target:
            return name
    return None


def vision_entries(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(dotted path of the method, its owner, its name) for each vision entry the model defines."""
    owners: list[tuple[str, nn.Module]] = [("", model)]
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        owners.append((path_of(model, base) or "", base))
    found = []
    for prefix, owner in owners:
        for name in VISION_ENTRIES:
            if callable(getattr(type(owner), name, None)):
                found.append((f"{prefix}.{name}" if prefix else name, owner, name))
    return found


def audio_entries(model: nn.Module,
                  inner: list[tuple[str, nn.Module]] | None = None) -> list[tuple[str, nn.Module, str]]:
    """(dotted path of the method, its owner, its name) for each audio entry of the model, its
    base model and its inner generators (``inner``: :func:`inner_generators`) and theirs."""
    owners: list[tuple[str, nn.Module]] = []
    for prefix, top in [("", model), *(inner or [])]:
        owners.append((prefix, top))
        base = getattr(top, "base_model", None)
        if isinstance(base, nn.Module) and base is not top:
            sub = path_of(top, base) or ""
            owners.append((".".join(p for p in (prefix, sub) if p), base))
    found, seen = [], set()
    for prefix, owner in owners:
        for name in AUDIO_ENTRIES:
            if callable(getattr(type(owner), name, None)) and (id(owner), name) not in seen:
                seen.add((id(owner), name))
                found.append((f"{prefix}.{name}" if prefix else name, owner, name))
    return found


def audio_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-most modules named like an audio part (outside any vision part), with parameters."""
    found: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        parts = name.split(".") if name else []
        if (parts and AUDIO_WORDS.search(parts[-1]) and not any(VISION_WORDS.search(p) for p in parts)
                and not any(name.startswith(p + ".") for p, _ in found)
                and next(sub.parameters(), None) is not None):
            found.append((name, sub))
    return found


def _forward_takes(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether the module's forward names one of ``names`` as a parameter."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(p in params for p in names)


def encoder_takes_audio(encoder: nn.Module) -> bool:
    return _forward_takes(encoder, AUDIO_ARGS)


def encoder_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The encoder generate() runs first, for an encoder–decoder model (else None)."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    try:
        enc = model.get_encoder()
    except Exception:  # noqa: BLE001 - an accessor that fails is an absent one
        return None
    path = path_of(model, enc)
    return (path, enc) if path else None


def encoder_takes_images(encoder: nn.Module) -> bool:
    return _forward_takes(encoder, PIXEL_ARGS)


def inner_generators(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules with a generate() of their own (outermost only)."""
    found: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if not name or any(name.startswith(p + ".") for p, _ in found):
            continue
        can = getattr(sub, "can_generate", None)
        if callable(getattr(sub, "generate", None)) and callable(can) and can():
            found.append((name, sub))
    return found


def find_layers(model: nn.Module, lm_path: str) -> str | None:
    """The decoder layer list inside the language model: a ModuleList of blocks, preferring
    (in order) one outside any vision or audio part (an audio LM's audio tower has layers of its
    own, inside what the causal-lm row calls the language model), outside an encoder (BERT-style decoders keep
    theirs under ``bert.encoder``, so that only lowers the rank), the shallowest, of one
    block type (mllama interleaves two), named like a layer list, under a decoder."""
    lm = model.get_submodule(lm_path) if lm_path else model
    candidates = []
    for name, sub in lm.named_modules():
        if not isinstance(sub, nn.ModuleList) or not len(sub):
            continue
        parts = name.split(".") if name else []
        candidates.append((any(VISION_WORDS.search(p) or AUDIO_WORDS.search(p) for p in parts), "encoder" in parts,
                           len(parts),
                           len({type(k) for k in sub.children()}) > 1, bool(parts) and parts[-1] not in _LAYER_NAMES,
                           "decoder" not in name, name))
    if not candidates:
        return None
    best = min(candidates)
    if best[0]:
        return None  # only vision or audio lists: no decoder layers here
    return ".".join(p for p in (lm_path, best[-1]) if p)


def _image_encoder(model: nn.Module) -> nn.Module | None:
    """``get_encoder(modality="image")``, unless it is the model's text encoder: an override that
    ignores the modality (Seamless M4T's) returns that, and a text-only call would then be timed
    as vision. An encoder that takes pixels stays (t5gemma2's one encoder reads both)."""
    enc = model.get_encoder(modality="image")
    if enc is model.get_encoder() and not encoder_takes_images(enc):
        return None
    return enc


def _output_head(model: nn.Module) -> nn.Module | None:
    """``get_output_embeddings()``, unless that is an embedding: FSMT's returns the decoder's
    ``embed_tokens`` (its ``output_projection`` is declared tied to it, though not tied by
    default) — an embedding's forward is the lookup at the start of the decoder, not the
    projection that ends the forward. The head is then the ``nn.Linear`` that shares its
    weight, else the one ``nn.Linear`` of its shape transposed (hidden → vocabulary); None
    where there is not exactly one."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Embedding):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for same in (lambda m: m.weight is head.weight,
                 lambda m: (m.out_features, m.in_features) == (head.num_embeddings, head.embedding_dim)):
        found = [m for m in linears if same(m)]
        if found:
            return found[0] if len(found) == 1 else None
    return None


def probe_accessors(model: nn.Module) -> dict[str, str | None]:
    """Paths of what transformers' own accessors return (None where absent or failing)."""
    found: dict[str, str | None] = {}
    for key, call in (("vision", lambda: _image_encoder(model)),
                      ("language_model", lambda: model.get_decoder()),
                      ("lm_head", lambda: _output_head(model))):
        try:
            found[key] = path_of(model, call())
        except Exception:  # noqa: BLE001 - accessors differ across models; absence is the answer
            found[key] = None
    if found["vision"] in ("", found["language_model"]):
        found["vision"] = None
    return found
