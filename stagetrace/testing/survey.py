"""Structure of a zoo model, found by running one ``generate()`` with temporary hooks everywhere.

``survey(case)`` records, on a logical clock, when every submodule's forward, every vision entry
(``get_image_features`` / ``get_video_features`` / ``get_image_tokens`` on the top model and its
inner ``.model``) and every ``generate`` ran; what ran where is then read off the intervals.
All hooks and wrappers are removed afterwards (checked). ``python -m stagetrace.testing.survey``
prints one row per model type of the installed mapping.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from typing import Any, Callable

import torch

ENTRIES = ("get_image_features", "get_video_features", "get_image_tokens")
Interval = tuple[int, int]


class _Recorder:
    """Intervals ``(start, end)`` on one logical clock, per module path and per wrapped method."""

    def __init__(self) -> None:
        self.tick = 0
        self.calls: dict[str, list[Interval]] = defaultdict(list)
        self._open: dict[str, list[int]] = defaultdict(list)

    def start(self, key: str) -> None:
        self.tick += 1
        self._open[key].append(self.tick)

    def end(self, key: str) -> None:
        self.tick += 1
        self.calls[key].append((self._open[key].pop(), self.tick))

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # generate() reads the signature of get_image_features
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.start(key)
            try:
                return fn(*args, **kwargs)
            finally:
                self.end(key)

        return wrapper


def _inside(a: Interval, b: Interval) -> bool:
    return b[0] < a[0] and a[1] < b[1]


def path_of(model: torch.nn.Module, module: Any) -> str | None:
    if module is None:
        return None
    if module is model:
        return ""
    for name, m in model.named_modules():
        if m is module:
            return name
    return f"<not a submodule: {type(module).__name__}>"


def _topmost(paths: set[str]) -> list[str]:
    """Paths none of whose ancestors is in the set (the outermost modules that ran)."""
    return sorted(p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p) and p != "")


def entries_defined(model: torch.nn.Module) -> dict[str, list[str]]:
    inner = getattr(model, "model", None)
    out = {"top": [e for e in ENTRIES if callable(getattr(model, e, None))]}
    out["model"] = [e for e in ENTRIES if isinstance(inner, torch.nn.Module) and callable(getattr(inner, e, None))]
    return out


def accessors(model: torch.nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, call in (("get_encoder", lambda: model.get_encoder()),
                       ("get_encoder_image", lambda: model.get_encoder(modality="image")),
                       ("get_decoder", lambda: model.get_decoder()),
                       ("get_output_embeddings", lambda: model.get_output_embeddings())):
        try:
            out[name] = path_of(model, call())
        except Exception as e:  # noqa: BLE001 - record what the accessor does, whatever it is
            out[name] = f"<error: {type(e).__name__}: {str(e)[:80]}>"
    return out


def _hook_state(model: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    """Hooks and shadowing instance attributes per module, to check that the survey leaves none behind."""
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                tuple(a for a in ("generate", *ENTRIES) if a in m.__dict__)) for n, m in model.named_modules()}


def _install(model: torch.nn.Module, rec: _Recorder) -> Callable[[], None]:
    handles = []
    shadowed: list[tuple[Any, str]] = []
    before = _hook_state(model)
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: rec.start(n)))
        handles.append(m.register_forward_hook(lambda mod, args, out, n=name: rec.end(n)))
        if callable(getattr(m, "generate", None)):
            shadowed.append((m, "generate"))
            m.generate = rec.wrap(f"{name}.generate" if name else "generate", m.generate)
    inner = getattr(model, "model", None)
    for owner, prefix in ((model, "top"), (inner, "model")):
        if isinstance(owner, torch.nn.Module):
            for e in ENTRIES:
                if callable(getattr(owner, e, None)):
                    shadowed.append((owner, e))
                    setattr(owner, e, rec.wrap(f"{prefix}.{e}", getattr(owner, e)))

    def remove() -> None:
        for h in handles:
            h.remove()
        for owner, attr in shadowed:
            owner.__dict__.pop(attr, None)
        after = _hook_state(model)
        left = [n for n in before if before[n] != after.get(n)]
        if left:
            raise RuntimeError(f"survey left hooks or wrappers on {left}")

    return remove


def run_recorded(case: Any) -> tuple[_Recorder, Any]:
    rec = _Recorder()
    remove = _install(case.model, rec)
    try:
        out = case.generate()
    finally:
        remove()
    return rec, out


def _ran_within(rec: _Recorder, spans: list[Interval], paths: list[str]) -> set[str]:
    return {p for p in paths if any(_inside(c, s) for c in rec.calls.get(p, ()) for s in spans)}


def _steps(rec: _Recorder) -> tuple[str, str | None, list[Interval]]:
    """The module whose forwards are the generation steps: the top model, or the one generate() delegates to."""
    gen = rec.calls["generate"][0]
    inner = sorted(k[: -len(".generate")] for k in rec.calls if k.endswith(".generate"))
    top = [c for c in rec.calls.get("", ()) if _inside(c, gen)]
    if top:
        return "", inner[0] if inner else None, top
    if not inner:
        return "", None, []
    spans = rec.calls[f"{inner[0]}.generate"]
    return inner[0], inner[0], [c for c in rec.calls.get(inner[0], ()) if any(_inside(c, s) for s in spans)]


def _vision_entry(rec: _Recorder, paths: list[str], steps: list[Interval],
                  layers: list[str]) -> tuple[str | None, list[str]]:
    """The vision entry generate() ran and the modules it ran: a get_*_features / get_image_tokens call,
    else what ran before the first step (an encoder, or vision before a delegated generate), else what
    only the first step ran outside the decoder layers (cross-attention keys cached from the image are
    computed inside the layers and are not vision)."""
    gen = rec.calls["generate"][0]
    for key in [f"{p}.{e}" for p in ("model", "top") for e in ENTRIES]:
        ran = _ran_within(rec, rec.calls.get(key, []), paths)
        if ran:
            return key, sorted(ran)
    first = steps[0][0] if steps else gen[1]
    before = _ran_within(rec, [(gen[0], first)], paths) - _ran_within(rec, steps, paths)  # not embeddings
    if before:
        return "before-first-step", sorted(before)
    if len(steps) > 1:  # run by the first (prefill) step only
        prefill = _ran_within(rec, steps[:1], paths) - _ran_within(rec, steps[1:], paths)
        prefill = {p for p in prefill if not any(p.startswith(lst + ".") for lst in layers)}
        if prefill:
            return "prefill-step-only", sorted(prefill)
    return None, []


def _layer_lists(model: torch.nn.Module, rec: _Recorder, last: Interval) -> list[str]:
    lists = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and all(
                any(_inside(c, last) for c in rec.calls.get(f"{name}.{i}", ())) for i in range(len(m))):
            lists.append(name)
    return [n for n in lists if not any(n.startswith(o + ".") for o in lists)]


def _children_run(model: torch.nn.Module, parent: str | None, ran: set[str]) -> list[str]:
    """The direct children of ``parent`` that ran, themselves or below (e.g. an encoder's vision tower,
    projector, layer list)."""
    if parent is None or parent.startswith("<"):
        return []
    children = [f"{parent}.{n}" if parent else n for n, _ in model.get_submodule(parent).named_children()]
    return [c for c in children if any(r == c or r.startswith(c + ".") for r in ran)]


def _runs_any(rec: _Recorder, owner: str | None, modules: list[str]) -> bool:
    if not owner or owner.startswith("<"):
        return False
    spans = rec.calls.get(owner, [])
    return bool(owner not in modules and _ran_within(rec, spans, [m for m in modules if m != owner]))


def survey(case: Any) -> dict[str, Any]:
    """What runs where in one ``generate()`` of ``case`` (a zoo case), as a JSON-able dict.

    Paths are module paths from the top model ("" is the top model itself). "Steps" are the forwards
    of the step module: the top model, or the language model its generate() delegates to.

    - entries_defined / entries_called: get_image_features, get_video_features, get_image_tokens on
      the top model ("top") and its inner ``.model`` ("model"); which of them generate() called.
    - get_encoder, get_encoder_image (``modality="image"``), get_decoder, get_output_embeddings: paths.
    - top_forward_calls, generate_delegates_to, step_module, steps.
    - vision_entry: the called entry that ran modules; else "before-first-step" (modules run before the
      first step and in no step: an encoder, vision before a delegated generate); else
      "prefill-step-only" (modules only the first step ran, outside the decoder layer lists).
      vision_modules: the outermost modules it ran; vision_shared_with_decode: modules it ran that
      the decode steps run too (the text embedding of VQ tokens); vision_runs: before / inside step 1.
    - before_first_step, prefill_step_only: outermost modules run there; encoder_parts_run: the
      encoder's children run before the first step (encoder-decoder models).
    - decoder_layers: ModuleLists all of whose children ran in the last step (outermost only).
    - decoder_runs_vision / layers_owner_runs_vision: whether get_decoder()'s module, or the module
      holding a decoder layer list, runs a vision module inside its own forward (IDEFICS, GIT).
    """
    model = case.model
    rec, out = run_recorded(case)
    paths = [n for n, _ in model.named_modules()]
    step_module, delegate, steps = _steps(rec)
    layers = _layer_lists(model, rec, steps[-1]) if steps else []
    entry, vision_run = _vision_entry(rec, paths, steps, layers)
    shared = set(vision_run) & _ran_within(rec, steps[1:], paths)  # e.g. the text embedding VQ tokens go through
    vision = sorted(set(vision_run) - shared)
    gen = rec.calls["generate"][0]
    first = steps[0][0] if steps else gen[1]
    before = _ran_within(rec, [(gen[0], first)], paths)
    acc = accessors(model)
    return {
        "model_type": case.model_type, "class": type(model).__name__, "shape": case.shape,
        "is_encoder_decoder": bool(model.config.is_encoder_decoder),
        "entries_defined": entries_defined(model),
        "entries_called": sorted(k for k in rec.calls if k.split(".")[-1] in ENTRIES),
        **acc,
        "top_forward_calls": len([c for c in rec.calls.get("", ()) if _inside(c, gen)]),
        "generate_delegates_to": delegate, "step_module": step_module, "steps": len(steps),
        "vision_entry": entry, "vision_modules": _topmost(set(vision)), "vision_modules_all": len(vision),
        "vision_shared_with_decode": _topmost(shared),
        "vision_runs": ("before the first step" if vision and set(vision) <= before else
                        "inside the first step" if vision and _ran_within(rec, steps[:1], vision) else None),
        "before_first_step": _topmost(before),
        "encoder_parts_run": _children_run(model, acc["get_encoder"], before) if model.config.is_encoder_decoder
        else [],
        "prefill_step_only": _topmost(_ran_within(rec, steps[:1], paths) - _ran_within(rec, steps[1:], paths)),
        "decoder_layers": layers,
        "decoder_runs_vision": _runs_any(rec, acc["get_decoder"], vision),
        "layers_owner_runs_vision": any(_runs_any(rec, lst.rsplit(".", 1)[0] if "." in lst else "", vision)
                                        for lst in layers),
        "prompt_len": case.prompt_len, "generated_tokens": case.generated(out),
    }


# ---------------------------------------------------------------------------------------------
# CLI: one row per model type of the installed mapping.


def survey_all(types: list[str] | None = None) -> list[dict[str, Any]]:
    import transformers

    from .zoo import Unbuildable, build, model_types

    rows = []
    for t in types or model_types():
        try:
            row = {"status": "built", **survey(build(t))}
        except Unbuildable as e:
            row = {"model_type": t, "status": "unbuildable", "reason": e.reason}
        row["transformers"] = transformers.__version__
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return ", ".join(map(str, value)) if isinstance(value, list) else "" if value is None else str(value)


COLUMNS = ("model_type", "status", "shape", "vision_entry", "vision_modules", "decoder_layers", "generated_tokens")


def markdown(rows: list[dict[str, Any]]) -> str:
    version = rows[0]["transformers"] if rows else "?"
    lines = [f"# Image-text-to-text model types of transformers {version}: zoo and survey", "",
             "Written by `python -m stagetrace.testing.survey --md`; every field per type is in the JSON beside it.",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if row["status"] == "unbuildable":
            cells = [row["model_type"], f"unbuildable: {row['reason']}"] + [""] * (len(COLUMNS) - 2)
        else:
            cells = [_cell(row, c) for c in COLUMNS]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagetrace.testing.survey", description=__doc__.split("\n")[0])
    parser.add_argument("types", nargs="*", help="model types (default: every type of the installed mapping)")
    parser.add_argument("--json", metavar="PATH", help="write the full survey as JSON here")
    parser.add_argument("--md", metavar="PATH", help="write the table as Markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = survey_all(args.types)
    for row in rows:
        if row["status"] == "unbuildable":
            print(f"{row['model_type']:24s} unbuildable: {row['reason']}")
        else:
            print(f"{row['model_type']:24s} built  {row['shape']:16s} {row['vision_entry']:26s} "
                  f"{_cell(row, 'vision_modules')} | layers {_cell(row, 'decoder_layers')} | "
                  f"{row['generated_tokens']} tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
