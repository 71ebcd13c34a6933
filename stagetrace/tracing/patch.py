"""Shadowing attributes of a model, and putting back exactly what was there.

A tracer places wrappers as instance attributes (``model.generate``, a layer's
``forward``). What must stay true: after :meth:`Shadows.restore` every object's
``__dict__`` holds what it held before — a user's own instance-level value comes back,
and where there was none, none is left (the class attribute shows through again).
"""
from __future__ import annotations

from typing import Any

__all__ = ["Shadows"]


class Shadows:
    """Instance attributes set by one owner, undone together in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []  # (object, attribute, its own previous value or None)

    def set(self, obj: Any, attr: str, value: Any) -> None:
        self._saved.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, value)

    def restore(self) -> None:
        for obj, attr, saved in reversed(self._saved):
            if saved is None:
                obj.__dict__.pop(attr, None)
            else:
                obj.__dict__[attr] = saved
        self._saved.clear()

    def __bool__(self) -> bool:
        return bool(self._saved)
