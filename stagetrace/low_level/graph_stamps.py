"""Marks that live inside compiled code: ``torch.ops.stagetrace.stamp``.

An event recorded from Python cannot sit inside a CUDA graph replayed by
``torch.compile(mode="reduce-overhead")``: the Python never runs again after capture.
A stamp is a kernel instead. It is captured with the graph and, on every replay, the
GPU itself writes ``%globaltimer`` and a label into a device ring (one atomic slot per
stamp). After the call, one read brings the ring back and ``clocks.merge_stamps`` places
the stamps on the event timeline using a calibration stamp taken right after each
decode-step event.

What must stay true:

* the op is ``y = stamp(x, ring, label)`` with ``y`` a copy of ``x``: the copy is a data
  dependency, so no compiler may move the stamp across the work that produces ``x`` or
  the work that consumes ``y`` (a side-effect-only op could be reordered or removed);
* a ring's device memory never moves or is freed while graphs may replay it: rings are
  made once per device per process (:func:`ring_for`) and kept;
* on the CPU the op is a pure-Python twin (host clock, ``clone``) with the same schema,
  so what dynamo and the tracer do with it is tested without a GPU.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import numpy as np
import torch

from . import _C

__all__ = ["stamp", "ring_for", "ring_id", "HostStampRing", "stamps_unavailable_reason"]

# id -> ring. The op takes the id (a plain int that dynamo bakes into the graph as a
# constant), never a pointer, so a graph can only ever reach a ring that is registered.
_RINGS: dict[int, Any] = {}
_BY_DEVICE: dict[tuple[str, int], int] = {}
_NEXT_ID = itertools.count(1)
_LOCK = threading.Lock()


class HostStampRing:
    """The CPU twin of ``_C.StampRing``: host ``time.monotonic_ns`` instead of %globaltimer."""

    device = -1

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._labels: list[int] = []
        self._t_ns: list[int] = []
        self._count = 0

    def reset(self, stream: int = 0) -> None:
        self._labels.clear()
        self._t_ns.clear()
        self._count = 0

    def stamp(self, label: int, stream: int = 0) -> None:
        t = time.monotonic_ns()
        self._count += 1
        if len(self._labels) < self.capacity:
            self._labels.append(label)
            self._t_ns.append(t)

    def read(self, stream: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        return (np.asarray(self._labels, dtype=np.int32), np.asarray(self._t_ns, dtype=np.int64),
                self._count - len(self._labels))


def stamps_unavailable_reason(device_type: str) -> str | None:
    """Why GPU-side stamps cannot run on ``device_type``; None when they can."""
    if device_type == "cpu":
        return None
    if device_type != "cuda":
        return f"no GPU-side stamps for device type {device_type!r}"
    if _C is None or not _C.stamps_compiled():
        return ("stagetrace was built without GPU-side stamps (nvcc was not found at build time); "
                "rebuild with the CUDA toolkit's nvcc present")
    return None


def ring_for(device: torch.device, capacity: int = 65536) -> Any:
    """The process-wide stamp ring of ``device`` (made on first use, never freed)."""
    key = (device.type, device.index or 0)
    with _LOCK:
        rid = _BY_DEVICE.get(key)
        if rid is None:
            why = stamps_unavailable_reason(device.type)
            if why:
                raise RuntimeError(why)
            ring = HostStampRing(capacity) if device.type == "cpu" else _C.StampRing(device.index or 0, capacity)
            rid = next(_NEXT_ID)
            _RINGS[rid] = ring
            _BY_DEVICE[key] = rid
        return _RINGS[rid]


def ring_id(ring: Any) -> int:
    for rid, r in _RINGS.items():
        if r is ring:
            return rid
    raise KeyError("this stamp ring is not registered (make rings with ring_for)")


@torch.library.custom_op("stagetrace::stamp", mutates_args=())
def stamp(x: torch.Tensor, ring: int, label: int) -> torch.Tensor:
    """A copy of ``x``, made after the GPU (or host) stamped ``label`` into ring ``ring``."""
    raise NotImplementedError(f"stagetrace::stamp has no kernel for {x.device.type} tensors")


@stamp.register_kernel("cpu")
def _stamp_cpu(x: torch.Tensor, ring: int, label: int) -> torch.Tensor:
    _RINGS[ring].stamp(label)
    return x.clone()


@stamp.register_kernel("cuda")
def _stamp_cuda(x: torch.Tensor, ring: int, label: int) -> torch.Tensor:
    r = _RINGS[ring]
    stream = torch.cuda.current_stream(x.device).cuda_stream
    y = torch.empty_like(x)
    if x.is_contiguous() and y.is_contiguous():
        r.stamp_copy(label, x.data_ptr(), y.data_ptr(), x.numel() * x.element_size(), stream)
    else:  # same order on the stream: stamp, then the copy
        r.stamp(label, stream)
        y.copy_(x)
    return y


@stamp.register_fake
def _stamp_fake(x: torch.Tensor, ring: int, label: int) -> torch.Tensor:
    return torch.empty_like(x)
