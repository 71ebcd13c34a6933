"""Tracing ``generate()``: the coordinator (:class:`Tracer`) and one module per concern."""
from __future__ import annotations

from .errors import TracingError
from .tracer import LAYER_DETAIL, LAYER_MARKS, Tracer, attach, trace

__all__ = ["Tracer", "TracingError", "trace", "attach", "LAYER_DETAIL", "LAYER_MARKS"]
