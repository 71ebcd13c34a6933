"""The native boundary: timelines that record labelled marks, and backend selection.

The compiled extension is ``stagetrace.low_level._C`` (its stub ``_C.pyi`` lies beside
it). Everything above this package sees only :class:`Marks` (plain numpy columns) and
the :class:`Timeline` protocol, which every timeline implements in full — host ones
with no-op stream binding and calibration — so no caller probes with ``hasattr``.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .marks import Marks
from .pytimeline import PyHostTimeline, TimelineError

try:
    from . import _C

    NATIVE_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    NATIVE_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["Marks", "BackendInfo", "Timeline", "TimelineError", "CudaError", "backend_info", "new_timeline",
           "PyHostTimeline"]

if _C is not None:
    TimelineError = _C.TimelineError  # type: ignore[misc,assignment]  # noqa: F811
    CudaError = _C.CudaError
else:  # pragma: no cover
    class CudaError(RuntimeError):  # type: ignore[no-redef]
        """A CUDA runtime call failed."""


class Timeline(Protocol):
    """What the tracer needs of a timeline. ``mark`` is the hot path: nothing else is."""

    backend: str

    def mark(self, label: int) -> None: ...
    def mark_on(self, label: int, stream: int) -> None: ...
    def resolve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
    def reset(self) -> None: ...
    def __len__(self) -> int: ...

    @property
    def dropped(self) -> int:
        """Marks lost since the last reset (the pool could not grow): the call is then not timed."""

    @property
    def device_streams(self) -> list[int]:
        """The stream marked on each device of the timeline ([] where there are no streams)."""

    def bind_streams(self, streams: Sequence[int]) -> None:
        """Before a call: the stream to mark on each device, in the timeline's device order."""

    def calibrate(self) -> None:
        """Before a call: put every device on one clock (no-op where there is one clock)."""


@dataclass(frozen=True)
class BackendInfo:
    """Which timeline backend stagetrace will use, and why."""

    native: bool           # the compiled extension imported
    cuda_compiled: bool    # the extension has the CUDA backend
    cuda_devices: int      # usable CUDA devices seen by the extension
    reason: str            # why CUDA is unusable ('' when it is usable)

    @property
    def default(self) -> str:
        return "cuda" if self.cuda_devices > 0 else "cpu"

    def __str__(self) -> str:
        if self.default == "cuda":
            return f"cuda ({self.cuda_devices} device(s), native CUDA events)"
        build = "native" if self.native else "pure-Python fallback"
        return f"cpu (host clock, {build}; CUDA backend unusable: {self.reason})"


@functools.lru_cache(maxsize=1)
def backend_info() -> BackendInfo:
    """Probe once. Never raises: a machine without a GPU simply gets the CPU backend."""
    if _C is None:
        return BackendInfo(False, False, 0, f"the native extension did not import ({NATIVE_IMPORT_ERROR})")
    count, reason = _C.cuda_probe()
    return BackendInfo(True, bool(_C.cuda_compiled()), int(count), reason)


def new_timeline(device_type: str = "cpu", device_index: int = 0, capacity: int = 4096,
                 chunk: int = 4096, max_marks: int = -1) -> Timeline:
    """A timeline for work on ``device_type`` ('cpu' or 'cuda').

    CUDA work needs the CUDA backend: timing it with a host clock would time kernel
    launches, not GPU work, so that is refused rather than silently mis-timed.
    """
    if device_type == "cuda":
        info = backend_info()
        if info.cuda_devices == 0:
            raise RuntimeError(
                "the model runs on CUDA but stagetrace's CUDA backend is unusable: "
                f"{info.reason}. Rebuild stagetrace where the CUDA toolkit is present "
                "(CUDA_HOME pointing at a toolkit with libcudart_static.a), e.g. "
                "`pip install --no-build-isolation --no-deps -e .`")
        return _C.CudaTimeline(device_index, capacity, chunk, max_marks)
    if device_type != "cpu":
        raise ValueError(f"stagetrace has no timeline backend for device type {device_type!r} (cpu, cuda)")
    if _C is None:
        warnings.warn(f"stagetrace: native extension unavailable ({NATIVE_IMPORT_ERROR}); "
                      "using the pure-Python host timeline", RuntimeWarning, stacklevel=2)
        return PyHostTimeline(capacity, chunk, max_marks)
    return _C.HostTimeline(capacity, chunk, max_marks)
