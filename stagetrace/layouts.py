"""Where the stages live in a model: its own structure first, a small table, the user's override.

The vision stage comes from the model's own vision entries where it has them
(``get_image_features`` and kin: encoder and projector in one call; see ``structure.py``);
the table holds only what structure cannot tell. A layout names dotted paths relative to
the model ``generate()`` is called on:

* ``vision``: modules whose span (first start to last end) is the vision stage, hooked
  where the model has no vision entry (or its entries are not what generate() runs);
* ``language_model``: the module whose forward start is the start of prefill (a
  ModuleList of blocks means its first block);
* ``lm_head``: the module whose forward end is the end of prefill (a ModuleList of heads means its
  last head);
* ``layers``: the ModuleList of decoder layers (for layer detail; optional).

A non-vision (audio) encoder has no stage: its entries (``get_audio_features``) or, where the
model has none, its modules named like audio are found here only so that their runs are
marked and the record can say in which stage that time is counted (``ResolvedLayout.audio``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from . import structure

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
    # hook these vision modules even where the model defines vision entries: its generate()
    # runs the vision part without calling them
    vision_outside_entries: bool = False


LAYOUTS: list[Layout] = [
    # LLaVA, LLaVA-NeXT, LLaVA-OneVision, PaliGemma, Gemma3, Molmo2
    Layout("llava-style", ("model.vision_tower", "model.multi_modal_projector"), "model.language_model",
           "lm_head", "model.language_model.layers"),
    # Qwen2-VL, Qwen2.5-VL, Qwen3-VL (the merger lives inside model.visual)
    Layout("qwen-vl", ("model.visual",), "model.language_model", "lm_head", "model.language_model.layers"),
    # Mllama: vision and projector run inside the first forward, with no vision entry
    Layout("mllama", ("model.vision_model", "model.multi_modal_projector"), "model.language_model", "lm_head",
           "model.language_model.layers"),
    # Idefics3, SmolVLM
    Layout("idefics3", ("model.vision_model", "model.connector"), "model.text_model", "lm_head",
           "model.text_model.layers"),
    # BLIP-2: generate() runs vision, Q-Former and projection inline, then the language model's generate()
    Layout("blip-2", ("vision_model", "qformer", "language_projection"), "language_model", "language_model.lm_head",
           vision_outside_entries=True),
    # Kosmos-2 / 2.5: on transformers 5.17 the image-to-text projection runs outside get_image_features
    Layout("kosmos-2", ("vision_model", "image_to_text_projection"), "text_model", "text_model.lm_head",
           vision_outside_entries=True),
    # Molmo / MolmoE remote code: vision runs inside the first forward
    Layout("molmo", ("model.vision_backbone",), "model.transformer.blocks", "model.transformer.ff_out",
           "model.transformer.blocks"),
    # Text-only causal LMs: Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...
    Layout("causal-lm", (), "model", "lm_head", "model.layers"),
    # GPT-2 style text-only LMs
    Layout("gpt2-style", (), "transformer", "lm_head", "transformer.h"),
]



@dataclass
class ResolvedLayout:
    name: str
    vision: list[tuple[str, nn.Module]]          # modules hooked for the vision stage
    language_model: tuple[str, nn.Module]
    lm_head: tuple[str, nn.Module]
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)
    # (path, owner, method name) of the model's own vision entries, wrapped for the vision stage
    vision_calls: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    # an encoder–decoder's encoder that does not take the image: its start is the start of prefill
    prefill_encoder: tuple[str, nn.Module] | None = None
    # submodules with a generate() of their own: a delegating generate() runs their forwards
    inner_generators: list[tuple[str, nn.Module]] = field(default_factory=list)
    vision_home: nn.Module | None = None         # where vision's weights live (device placement)
    # a non-vision (audio) encoder: its entries, wrapped, or else its modules, hooked; no stage of
    # its own: its runs are marked so that the record says in which stage that time is counted
    audio_calls: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    audio: list[tuple[str, nn.Module]] = field(default_factory=list)

    @property
    def has_vision(self) -> bool:
        return bool(self.vision or self.vision_calls)

    def describe(self) -> dict[str, Any]:
        return {"layout": self.name, "vision": [p for p, _ in self.vision] + [p for p, _, _ in self.vision_calls],
                "language_model": self.language_model[0], "lm_head": self.lm_head[0],
                "layers": len(self.layers), "prefill_encoder": self.prefill_encoder[0] if self.prefill_encoder else None,
                "inner_generators": [p for p, _ in self.inner_generators],
                "audio": [p for p, _ in self.audio] + [p for p, _, _ in self.audio_calls]}


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


def _forward_exit(path: str, mod: nn.Module) -> tuple[str, nn.Module]:
    """A ModuleList/ModuleDict of heads has no forward of its own: its last child ends it (MusicGen's
    one head per codebook, run in order)."""
    while isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and len(mod) > 0:
        name, mod = list(mod.named_children())[-1]
        path = f"{path}.{name}"
    return path, mod


def _looks_multimodal(model: nn.Module) -> list[str]:
    """Top-most modules whose names suggest a vision part — where an image can reach the model at all:
    its config names a vision part, or its forward takes an argument named like an image (a text-only
    model's modules can be named so: BLT's byte "patches" are no vision stage)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "vision_config", None) is None and structure.takes_images(model) is False:
        return []
    hits = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if name and structure.VISION_WORDS.search(last) and not any(name.startswith(h + ".") for h in hits):
            hits.append(name)
    if not hits and getattr(cfg, "vision_config", None) is not None:
        hits.append("")  # the config names a vision part whose module has no telling name
    return hits


def _decoder_layers(model: nn.Module, lm_path: str, decoder: str | None) -> str | None:
    """The decoder layer list: looked for first inside the decoder transformers' accessor names,
    where that lies inside the language model (the other block lists of a multimodal base model, an
    audio tower's, are no decoder layers), else anywhere in the language model."""
    if decoder is not None and decoder != lm_path and (lm_path == "" or decoder.startswith(lm_path + ".")):
        found = structure.find_layers(model, decoder)
        if found:
            return found
    return structure.find_layers(model, lm_path)


def _as_paths(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def resolve_layout(model: nn.Module, vision: str | Sequence[str] | None = None,
                   language_model: str | None = None, lm_head: str | None = None,
                   layers: str | None = None) -> ResolvedLayout:
    """Find the stage modules of ``model``; explicit arguments override detection.

    ``vision=[]`` says "this model has no vision stage" explicitly.
    """
    multimodal = _looks_multimodal(model)
    entries = structure.vision_entries(model)
    inner = structure.inner_generators(model)
    # A vision-less row must not swallow a multimodal model whose vision part it cannot see.
    row = next((r for r in LAYOUTS
                if (r.vision or not multimodal)
                and all(get_module(model, p) is not None for p in (*r.vision, r.language_model, r.lm_head))),
               None)
    probe = structure.probe_accessors(model)
    if inner and not probe["lm_head"]:  # a delegating model: its inner generator knows its head
        inner_probe = structure.probe_accessors(inner[0][1])
        probe["lm_head"] = f"{inner[0][0]}.{inner_probe['lm_head']}" if inner_probe["lm_head"] else None
    name = row.name if row else "probe"
    lm_path = row.language_model if row else probe["language_model"]
    head_path = row.lm_head if row else probe["lm_head"]
    layers_path = row.layers if row else None
    encoder = structure.encoder_of(model)
    prefill_encoder = None
    if encoder is not None and not structure.encoder_takes_images(encoder[1]):
        prefill_encoder = encoder  # a text encoder (the image came through a vision entry before it)
    if vision is not None:
        entries = []  # the user's vision paths replace the model's own entries
    v_paths, how = _vision_paths(vision, row, entries, encoder, prefill_encoder, probe, multimodal)
    name = how or name
    if language_model is not None:
        lm_path = language_model
    if lm_head is not None:
        head_path = lm_head
    if layers is not None:
        layers_path = layers
    if any(x is not None for x in (vision, language_model, lm_head, layers)):
        name = f"{name}+override"
    elif entries and not (row and row.vision):
        name = f"{name}+entries"

    missing = [f"{what} path {p!r} does not name a submodule"
               for what, paths in (("vision", v_paths or ()), ("language_model", (lm_path,) if lm_path else ()),
                                   ("lm_head", (head_path,) if head_path else ()))
               for p in paths if get_module(model, p) is None]
    if v_paths is None or lm_path is None or head_path is None or missing:
        raise LayoutError(_failure_message(model, multimodal, probe, v_paths, lm_path, head_path, missing))

    if layers_path is None or get_module(model, layers_path) is None:
        # a delegating model generates with the inner model whose head it times (Qwen2.5-Omni's
        # thinker): the layers that run are that model's, not a sibling's (its talker's)
        owner = next((p for p, _ in inner if head_path.startswith(p + ".")), None)
        layers_path = ((structure.find_layers(model, owner) if owner else None)
                       or _decoder_layers(model, lm_path, probe["language_model"]))
    layer_list = get_module(model, layers_path) if layers_path else None
    vision_mods = [(p, get_module(model, p)) for p in v_paths]
    home = vision_mods[0][1] if vision_mods else (get_module(model, probe["vision"]) if probe["vision"] else None)
    audio_calls, audio_mods = _audio_parts(model, inner, prefill_encoder, lm_path, head_path, v_paths)
    return ResolvedLayout(
        name=name,
        vision=vision_mods,  # type: ignore[arg-type]
        language_model=_forward_entry(lm_path, get_module(model, lm_path)),  # type: ignore[arg-type]
        lm_head=_forward_exit(head_path, get_module(model, head_path)),  # type: ignore[arg-type]
        layers=([(f"{layers_path}.{i}", m) for i, m in enumerate(layer_list)]
                if isinstance(layer_list, nn.ModuleList) else []),
        vision_calls=entries, prefill_encoder=prefill_encoder, inner_generators=inner, vision_home=home,
        audio_calls=audio_calls, audio=audio_mods,
    )


def _audio_parts(model: nn.Module, inner: list[tuple[str, nn.Module]], prefill_encoder: tuple[str, nn.Module] | None,
                 lm_path: str, head_path: str, v_paths: Sequence[str]
                 ) -> tuple[list[tuple[str, nn.Module, str]], list[tuple[str, nn.Module]]]:
    """The audio entries, or else the modules whose runs are the audio encoder's: an
    encoder–decoder's encoder that takes audio (it also starts prefill), else modules named like
    audio that hold neither the language model, lm_head nor a vision part (one may lie inside
    what the layout calls the language model: the causal-lm row takes a whole base model)."""
    calls = structure.audio_entries(model, inner)
    if calls:
        return calls, []
    if prefill_encoder is not None and structure.encoder_takes_audio(prefill_encoder[1]):
        return [], [prefill_encoder]
    inside = lambda a, b: a == b or b.startswith(a + ".")  # noqa: E731 - b is a or lies inside it
    return [], [(p, m) for p, m in structure.audio_modules(model)
                if not any(inside(p, x) for x in (lm_path, head_path, *v_paths) if x)]


def _vision_paths(vision: str | Sequence[str] | None, row: Layout | None, entries: list[Any],
                  encoder: tuple[str, nn.Module] | None, prefill_encoder: tuple[str, nn.Module] | None,
                  probe: dict[str, Any], multimodal: list[str]) -> tuple[tuple[str, ...] | None, str | None]:
    """The vision modules to hook (None: unknown), in order of trust: the user's paths, a row
    that knows better than the entries, an encoder that takes the image, none where the
    model's own entries mark vision, the accessor, modules named like vision (the last resort,
    so the layout is then called "named")."""
    if vision is not None:
        return _as_paths(vision), None
    if row and row.vision and (row.vision_outside_entries or not entries):
        return row.vision, None
    if encoder is not None and prefill_encoder is None:
        return (encoder[0],), None  # the encoder takes the image: its run is vision
    if entries:
        return (), None
    if probe["vision"]:
        return _as_paths(probe["vision"]), None
    if any(multimodal):
        return tuple(h for h in multimodal if h), "named"
    return (() if not multimodal else None), None


def _failure_message(model: nn.Module, multimodal: list[str], probe: dict[str, Any],
                     v_paths: tuple[str, ...] | None, lm_path: str | None, head_path: str | None,
                     missing: list[str]) -> str:
    """What was found, and the override to pass: only real module paths are ever suggested."""
    cls = type(model).__name__
    top = [n for n, _ in model.named_children()]
    inner = [f"{n}.{c}" for n, m in model.named_children() for c, _ in m.named_children()][:12]
    named = [h for h in multimodal if h]
    # vision () was found: no vision stage (a text or audio model) — neither to pass nor to add
    guesses = {"vision": list(v_paths) if v_paths is not None else named or None,
               "language_model": lm_path or probe["language_model"], "lm_head": head_path or probe["lm_head"]}
    known = ", ".join(f"{k}={v!r}" for k, v in guesses.items() if v)
    unknown = [k for k, v in guesses.items() if v is None]
    lines = [f"stagetrace could not find the stages of {cls}: its structure and the known layouts "
             f"({', '.join(r.name for r in LAYOUTS)}) do not say where they are."]
    lines += [f"  - {m}" for m in missing]
    lines += [f"  found: vision-like modules {named or ('none, though config.vision_config is set' if multimodal else 'none')}; "
              f"language model {probe['language_model']!r}; lm_head {probe['lm_head']!r}",
              f"  top-level modules: {top}; below them: {inner}",
              f"  pass the paths yourself: stagetrace.trace(model, {known or '...'})"
              + (f", adding {' and '.join(unknown)} (dotted module paths among those above)" if unknown else "")
              + ("; vision=[] if it has no vision stage" if multimodal else "")]
    return "\n".join(lines)
