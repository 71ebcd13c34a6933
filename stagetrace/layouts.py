"""Where the stages live in a model: a small table of layouts, plus the user's override.

Adding a model family is adding a row to :data:`LAYOUTS`, not a branch in the tracer.
A layout names dotted module paths relative to the model ``generate()`` is called on:

* ``vision``: modules whose span (first start to last end) is the vision stage
  (encoder and projector together); empty for text-only models;
* ``language_model``: the module whose forward start is the start of prefill (a
  ModuleList of blocks means its first block);
* ``lm_head``: the module whose forward end is the end of prefill;
* ``layers``: the ModuleList of decoder layers (for layer detail; optional).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

__all__ = ["Layout", "ResolvedLayout", "LayoutError", "LAYOUTS", "resolve_layout", "get_module"]


class LayoutError(ValueError):
    """The stages of a model could not be found; the message says what was found and how to override."""


@dataclass(frozen=True)
class Layout:
    name: str
    vision: tuple[str, ...]
    language_model: str
    lm_head: str
    layers: str | None = None


LAYOUTS: list[Layout] = [
    # LLaVA, LLaVA-NeXT, LLaVA-OneVision, PaliGemma, Gemma3, Molmo2
    Layout("llava-style", ("model.vision_tower", "model.multi_modal_projector"), "model.language_model",
           "lm_head", "model.language_model.layers"),
    # Qwen2-VL, Qwen2.5-VL, Qwen3-VL (the merger lives inside model.visual)
    Layout("qwen-vl", ("model.visual",), "model.language_model", "lm_head", "model.language_model.layers"),
    # Idefics3, SmolVLM
    Layout("idefics3", ("model.vision_model", "model.connector"), "model.text_model", "lm_head",
           "model.text_model.layers"),
    # Molmo / MolmoE remote code: vision runs inside the first forward
    Layout("molmo", ("model.vision_backbone",), "model.transformer.blocks", "model.transformer.ff_out",
           "model.transformer.blocks"),
    # Text-only causal LMs: Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...
    Layout("causal-lm", (), "model", "lm_head", "model.layers"),
    # GPT-2 style text-only LMs
    Layout("gpt2-style", (), "transformer", "lm_head", "transformer.h"),
]

_VISION_WORDS = re.compile(r"(vision|visual|image|img|vit|pixel)", re.I)


@dataclass
class ResolvedLayout:
    name: str
    vision: list[tuple[str, nn.Module]]
    language_model: tuple[str, nn.Module]
    lm_head: tuple[str, nn.Module]
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"layout": self.name, "vision": [p for p, _ in self.vision],
                "language_model": self.language_model[0], "lm_head": self.lm_head[0],
                "layers": len(self.layers)}


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    mod: Any = root
    for part in path.split("."):
        if part == "":
            continue
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            i = int(part)
            if i >= len(mod):
                return None
            mod = mod[i]
        elif isinstance(mod, nn.Module) and part in mod._modules:
            mod = mod._modules[part]
        else:
            return None
    return mod if isinstance(mod, nn.Module) else None


def _forward_entry(path: str, mod: nn.Module) -> tuple[str, nn.Module]:
    """A ModuleList/ModuleDict has no forward of its own: its first child starts it."""
    while isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and len(mod) > 0:
        name, mod = next(iter(mod.named_children()))
        path = f"{path}.{name}"
    return path, mod


def _path_of(root: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, mod in root.named_modules():
        if mod is target:
            return name
    return None


def _probe(model: nn.Module) -> dict[str, Any]:
    """What transformers' own accessors say (None where they are absent or fail)."""
    found: dict[str, Any] = {"vision": None, "language_model": None, "lm_head": None}
    for key, call in (("vision", lambda: model.get_encoder(modality="image")),
                      ("language_model", lambda: model.get_decoder()),
                      ("lm_head", lambda: model.get_output_embeddings())):
        try:
            found[key] = _path_of(model, call())
        except Exception:  # noqa: BLE001 - accessors differ across models; absence is the answer
            found[key] = None
    if found["vision"] in ("", found["language_model"]):
        found["vision"] = None
    return found


def _looks_multimodal(model: nn.Module) -> list[str]:
    """Top-most modules whose names suggest a vision part."""
    cfg = getattr(model, "config", None)
    hits = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if name and _VISION_WORDS.search(last) and not any(name.startswith(h + ".") for h in hits):
            hits.append(name)
    if not hits and getattr(cfg, "vision_config", None) is not None:
        hits.append("<config.vision_config is set>")
    return hits


def _layers_of(model: nn.Module, lm_path: str) -> str | None:
    lm = get_module(model, lm_path)
    if isinstance(lm, nn.ModuleList):
        return lm_path
    for attr in ("layers", "blocks", "h"):
        if lm is not None and isinstance(getattr(lm, attr, None), nn.ModuleList):
            return f"{lm_path}.{attr}" if lm_path else attr
    return None


def _as_paths(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def resolve_layout(model: nn.Module, vision: str | Sequence[str] | None = None,
                   language_model: str | None = None, lm_head: str | None = None,
                   layers: str | None = None) -> ResolvedLayout:
    """Find the stage modules of ``model``; explicit arguments override detection.

    ``vision=[]`` says "this model has no vision stage" explicitly.
    """
    multimodal = _looks_multimodal(model)
    # A vision-less row must not swallow a multimodal model whose vision part it cannot see.
    row = next((r for r in LAYOUTS
                if (r.vision or not multimodal)
                and all(get_module(model, p) is not None for p in (*r.vision, r.language_model, r.lm_head))),
               None)
    probe = _probe(model)
    name = row.name if row else "probe"
    v_paths: tuple[str, ...] | None = row.vision if row else (_as_paths(probe["vision"]) if probe["vision"] else None)
    lm_path = row.language_model if row else probe["language_model"]
    head_path = row.lm_head if row else probe["lm_head"]
    layers_path = row.layers if row else None

    overridden = any(x is not None for x in (vision, language_model, lm_head, layers))
    if vision is not None:
        v_paths = _as_paths(vision)
    if language_model is not None:
        lm_path = language_model
    if lm_head is not None:
        head_path = lm_head
    if layers is not None:
        layers_path = layers
    if overridden:
        name = f"{name}+override"

    if v_paths is None:
        v_paths = () if not multimodal else None

    missing = []
    for what, paths in (("vision", v_paths or ()), ("language_model", (lm_path,) if lm_path else ()),
                        ("lm_head", (head_path,) if head_path else ())):
        for p in paths:
            if get_module(model, p) is None:
                missing.append(f"{what} path {p!r} does not name a submodule")
    if v_paths is None or lm_path is None or head_path is None or missing:
        raise LayoutError(_failure_message(model, multimodal, probe, v_paths, lm_path, head_path, missing))

    if layers_path is None or get_module(model, layers_path) is None:
        layers_path = _layers_of(model, lm_path)
    layer_list = get_module(model, layers_path) if layers_path else None
    layer_mods = ([(f"{layers_path}.{i}", m) for i, m in enumerate(layer_list)]
                  if isinstance(layer_list, nn.ModuleList) else [])
    return ResolvedLayout(
        name=name,
        vision=[(p, get_module(model, p)) for p in v_paths],  # type: ignore[misc]
        language_model=_forward_entry(lm_path, get_module(model, lm_path)),  # type: ignore[arg-type]
        lm_head=(head_path, get_module(model, head_path)),  # type: ignore[arg-type]
        layers=layer_mods,
    )


def _failure_message(model: nn.Module, multimodal: list[str], probe: dict[str, Any],
                     v_paths: tuple[str, ...] | None, lm_path: str | None, head_path: str | None,
                     missing: list[str]) -> str:
    cls = type(model).__name__
    top = [n for n, _ in model.named_children()]
    inner = [f"{n}.{c}" for n, m in model.named_children() for c, _ in m.named_children()][:12]
    lm_guess = lm_path or probe["language_model"] or "<decoder path, e.g. model.language_model>"
    head_guess = head_path or probe["lm_head"] or "<head path, e.g. lm_head>"
    vis_guess = list(v_paths) if v_paths else (multimodal or ["<vision path>"])
    lines = [f"stagetrace could not find the stages of {cls}: no known layout matches "
             f"(tried {', '.join(r.name for r in LAYOUTS)})."]
    if missing:
        lines += [f"  - {m}" for m in missing]
    lines += [f"  found: vision-like modules {multimodal or 'none'}; language model "
              f"{probe['language_model']!r}; lm_head {probe['lm_head']!r}",
              f"  top-level modules: {top}; below them: {inner}",
              f"  pass the paths yourself: stagetrace.trace(model, vision={vis_guess!r}, "
              f"language_model={lm_guess!r}, lm_head={head_guess!r})"
              + ("  (vision=[] if it has no vision stage)" if multimodal else "")]
    return "\n".join(lines)
