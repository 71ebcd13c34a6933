"""The tracer's one error type (its own module, so every tracing module can raise it)."""
from __future__ import annotations

__all__ = ["TracingError"]


class TracingError(RuntimeError):
    """Tracing was set up wrongly or cannot time this call truthfully (the message says why)."""
