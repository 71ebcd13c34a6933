"""stagetrace: where the time of one ``model.generate()`` call goes, on the GPU timeline.

>>> with stagetrace.trace(model) as tracer:
...     model.generate(**inputs, max_new_tokens=16)
>>> tracer.records[-1].prefill_ms
"""
from __future__ import annotations

__version__ = "0.1.0"

from .layouts import LAYOUTS, Layout, LayoutError
from .low_level import BackendInfo, Marks, backend_info, new_timeline
from .records import JsonlWriter, RecordLoadWarning, StageRecord, load_records
from .spans import Span, SpanTable
from .stages import StageOrderError, StageTimes, stages_from_marks
from .tracing import Tracer, TracingError, attach, trace


def __getattr__(name: str):  # exporters import lazily: `import stagetrace` stays light
    if name in ("summarize", "format_summary"):
        from .export import table

        return getattr(table, name)
    if name == "LatencyModel":
        from .latency_model import LatencyModel

        return LatencyModel
    if name == "write_chrome_trace":
        from .export.chrome import write_chrome_trace

        return write_chrome_trace
    raise AttributeError(f"module 'stagetrace' has no attribute {name!r}")


__all__ = [
    "__version__", "trace", "attach", "Tracer", "TracingError", "StageRecord", "load_records", "JsonlWriter",
    "RecordLoadWarning", "summarize", "format_summary", "write_chrome_trace", "backend_info", "BackendInfo",
    "new_timeline", "Marks", "stages_from_marks", "StageTimes", "StageOrderError", "Layout", "LayoutError",
    "LAYOUTS", "Span", "SpanTable", "LatencyModel",
]
