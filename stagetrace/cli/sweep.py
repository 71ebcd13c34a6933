"""``profile --sweep KEY=V1,V2,...``: the cartesian product of settings, one point at a time.

A key is a generation setting (:data:`GENERATION_KEYS`: ``max_new_tokens``, ``min_new_tokens``,
``batch_size``, ``dtype``) or a setting of the processor: an attribute of its image processor
or of the processor itself (``do_resize``, ``max_image_tiles``; ``size.longest_edge`` sets one
entry of a dict-like attribute: Qwen2-VL's pixel budget in transformers 5), else an argument
the image processor's call takes. Processor keys are checked once the processor is loaded, before
the model is. Every record carries its point (``sweep_point``); points are ordered with
``dtype`` outermost, so each dtype's model loads once per process.

``--point KEY=V`` (report, compare, fit) picks records by their point.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .common import CliError, show

__all__ = ["GENERATION_KEYS", "DTYPES", "Value", "parse_sweeps", "sweep_points", "ProcessorSettings",
           "resolve_processor_settings", "parse_point_filter", "select_point", "point_label", "points_of"]

Value = str | int | float | bool
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _int_at_least(low: int) -> Callable[[Value], str | None]:
    def check(v: Value) -> str | None:
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= low else f"an integer >= {low}"
    return check


# Generation settings a point can set, and what each value must be (None: it is fine).
GENERATION_KEYS: dict[str, Callable[[Value], str | None]] = {
    "max_new_tokens": _int_at_least(1),
    "min_new_tokens": _int_at_least(0),
    "batch_size": _int_at_least(1),
    "dtype": lambda v: None if v in DTYPES else f"one of {', '.join(DTYPES)}",
}


def parse_value(text: str) -> Value:
    """A value as typed: an integer, a finite number, true/false, else the text itself."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for kind in (int, float):
        try:
            v = kind(t)
        except ValueError:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            break
        return v
    return t


def _key_ok(key: str) -> bool:
    return bool(key) and all(part.isidentifier() for part in key.split("."))


def parse_sweeps(items: Sequence[str] | None) -> dict[str, list[Value]]:
    """``--sweep KEY=V1,V2`` (repeatable): key -> its values, in the order given."""
    sweep: dict[str, list[Value]] = {}
    for item in items or []:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not _key_ok(key):
            raise CliError(f"--sweep {show(item)}: give KEY=V1,V2,... (KEY a setting name, e.g. max_new_tokens, "
                           "batch_size, dtype, size.longest_edge)")
        if key in sweep:
            raise CliError(f"--sweep names {key} twice: give all its values in one --sweep {key}=V1,V2")
        texts = [v.strip() for v in values.split(",")]
        if not all(texts):
            raise CliError(f"--sweep {show(item)}: an empty value (values are separated by commas)")
        parsed = [parse_value(t) for t in texts]
        if len(set(map(_typed, parsed))) < len(parsed):
            raise CliError(f"--sweep {show(item)}: a value is given twice")
        check = GENERATION_KEYS.get(key)
        for text, v in zip(texts, parsed):
            why = check(v) if check is not None else None
            if why is not None:
                raise CliError(f"--sweep {key}={show(text)}: {key} must be {why}")
        sweep[key] = parsed
    return sweep


def _typed(v: Value) -> tuple[str, Value]:
    return (type(v).__name__, v)


def sweep_points(sweep: dict[str, list[Value]]) -> list[dict[str, Value]]:
    """Every point of the cartesian product, ``dtype`` outermost (one model load per dtype), then
    the keys in the order given; ``[{}]`` without a sweep (one point that sets nothing)."""
    keys = sorted(sweep, key=lambda k: k != "dtype")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


# ---------------------------------------------------------------- processor settings
@dataclass
class _Setting:
    key: str
    target: Any            # the object whose attribute is set, or None: passed to the processor's call
    path: tuple[str, ...]  # attribute, then entries inside it

    def apply(self, value: Value, call_kwargs: dict[str, Any]) -> None:
        if self.target is None:
            call_kwargs[self.path[0]] = value
            return
        if len(self.path) == 1:
            setattr(self.target, self.path[0], value)
            return
        top = copy.deepcopy(getattr(self.target, self.path[0]))  # never edits a dict the processor shares
        obj = top
        for part in self.path[1:-1]:
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        if isinstance(obj, dict):
            obj[self.path[-1]] = value
        else:
            setattr(obj, self.path[-1], value)
        setattr(self.target, self.path[0], top)


class ProcessorSettings:
    """The processor keys of a sweep, resolved on a loaded processor; ``apply(point)`` sets a point's values
    and returns the keyword arguments its processor calls take."""

    def __init__(self, settings: list[_Setting]):
        self.settings = settings

    def apply(self, point: dict[str, Value]) -> dict[str, Any]:
        call_kwargs: dict[str, Any] = {}
        for s in self.settings:
            s.apply(point[s.key], call_kwargs)
        return call_kwargs


def _has_path(obj: Any, path: Sequence[str]) -> bool:
    for part in path:
        if isinstance(obj, dict):
            if part not in obj:
                return False
            obj = obj[part]
        elif hasattr(obj, part) and not callable(getattr(obj, part)):
            obj = getattr(obj, part)
        else:
            return False
    return True


def _call_kwargs_of(image_processor: Any) -> set[str]:
    """The arguments an image processor's call takes, as transformers declares them (``valid_kwargs``)."""
    declared = getattr(image_processor, "valid_kwargs", None)
    names: set[str] = set()
    for attr in ("__required_keys__", "__optional_keys__"):
        names |= set(getattr(declared, attr, ()) or ())
    return names


def resolve_processor_settings(processor: Any, keys: Iterable[str]) -> ProcessorSettings:
    """Where each processor key of a sweep goes; one line naming the key when the processor has no such setting."""
    keys = [k for k in keys if k not in GENERATION_KEYS]
    image_processor = getattr(processor, "image_processor", None)
    is_processor = hasattr(processor, "tokenizer") or image_processor is not None
    targets = [t for t in (image_processor, processor if is_processor else None) if t is not None]
    settings = []
    for key in keys:
        path = tuple(key.split("."))
        target = next((t for t in targets if _has_path(t, path)), None)
        if target is not None:
            settings.append(_Setting(key, target, path))
        elif len(path) == 1 and image_processor is not None and key in _call_kwargs_of(image_processor):
            settings.append(_Setting(key, None, path))
        else:
            where = (f"{type(image_processor).__name__} or {type(processor).__name__}" if image_processor is not None
                     else f"{type(processor).__name__}" + ("" if is_processor else " (a tokenizer: the checkpoint has "
                                                              "no image processor)"))
            raise CliError(f"--sweep {show(key)}: not a generation setting ({', '.join(GENERATION_KEYS)}) and not a "
                           f"setting of {where}")
    return ProcessorSettings(settings)


# ---------------------------------------------------------------- picking records by point
def parse_point_filter(items: Sequence[str] | None) -> dict[str, Value]:
    """``--point KEY=V`` (repeatable): the settings a record's point must have."""
    want: dict[str, Value] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not _key_ok(key.strip()) or not value.strip():
            raise CliError(f"--point {show(item)}: give KEY=VALUE (a setting of the sweep and one of its values)")
        want[key.strip()] = parse_value(value)
    return want


def point_label(point: dict[str, Value] | None) -> str:
    if not point:
        return "(no sweep point)"
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in point.items())


def points_of(records: Iterable[Any]) -> list[dict[str, Value] | None]:
    """The distinct sweep points of ``records``, in the order first met."""
    from .runs import point_key

    seen: dict[Any, dict[str, Value] | None] = {}
    for r in records:
        seen.setdefault(point_key(r.sweep_point), r.sweep_point)
    return list(seen.values())


def select_point(records: list[Any], want: dict[str, Value], what: str) -> list[Any]:
    """The records whose point has every setting of ``want``; one line when none has."""
    if not want:
        return records
    kept = [r for r in records if r.sweep_point is not None
            and all(k in r.sweep_point and _typed(r.sweep_point[k]) == _typed(v) for k, v in want.items())]
    if not kept:
        have = "; ".join(point_label(p) for p in points_of(records)[:6])
        raise CliError(f"--point {point_label(want)}: no record of {what} has it (its points: {have})")
    return kept
