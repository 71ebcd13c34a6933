"""Which devices a model runs on, the timeline that marks them, and where each span's work ran."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..layouts import ResolvedLayout
from ..low_level import Timeline, new_timeline
from ..spans import KIND_CODE, SpanTable
from .errors import TracingError

__all__ = ["model_devices", "new_model_timeline", "bind_call_streams", "SpanPlacement", "layer_mark_callables"]


def model_devices(model: nn.Module) -> list[torch.device]:
    """Every device holding the model's parameters, the one generate() starts on (the input
    embeddings') first. Several only for a model split over GPUs."""
    devices = {p.device for p in model.parameters()}
    if len(devices) <= 1:
        return [next(iter(devices)) if devices else torch.device("cpu")]
    if any(d.type != "cuda" for d in devices):
        raise TracingError(f"the model's parameters are spread over {sorted(map(str, devices))}; a model "
                           "split over several GPUs is traced, but not one offloaded to the CPU or disk")
    primary = next(iter(devices))
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if isinstance(embeddings, nn.Module):
        primary = next(embeddings.parameters(), torch.empty(0, device=primary)).device
    return [primary] + sorted(devices - {primary}, key=lambda d: d.index or 0)


def new_model_timeline(devices: Sequence[torch.device], capacity: int) -> Timeline:
    """One timeline for the model: on its device, or on every GPU of a split model."""
    if len(devices) > 1:
        from ..low_level.multi_device import MultiDeviceTimeline

        return MultiDeviceTimeline([new_timeline("cuda", d.index or 0, capacity=capacity) for d in devices])
    return new_timeline(devices[0].type, devices[0].index or 0, capacity=capacity)


# The current stream's raw handle, without the torch.cuda.Stream object current_stream() builds
# around it: inductor's generated code reads it so (get_raw_stream). On an H200 host the object
# made this the dearest part of a call's set-up, 48 µs (benchmarks/README.md, session 15); where
# a torch lacks it, current_stream() gives the same handle.
_raw_stream: Callable[[int], int] | None = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device: torch.device) -> int:
    """The handle of ``device``'s current CUDA stream (what ``torch.cuda.current_stream(device).cuda_stream`` reads)."""
    if _raw_stream is None:
        return int(torch.cuda.current_stream(device).cuda_stream)
    return int(_raw_stream(device.index if device.index is not None else torch.cuda.current_device()))


def bind_call_streams(timeline: Timeline, devices: Sequence[torch.device]) -> int:
    """Before a call: mark each device's current stream, one clock for all; returns the
    first device's stream handle (0 on the CPU)."""
    if devices[0].type != "cuda":
        return 0
    streams = [current_stream_handle(d) for d in devices]
    timeline.bind_streams(streams)
    timeline.calibrate()  # before the call: never a sync inside it
    return int(streams[0])


@dataclass(frozen=True)
class SpanPlacement:
    """Where the work of each span runs on a model split over GPUs: layers and vision on the
    GPU holding their weights; the call and its stages on the GPU generate() starts on (they
    span every device). Decided once, at start."""

    devices: tuple[str, ...]       # the model's devices, the primary first
    layer_device: np.ndarray       # per decoder layer: position in ``devices``
    vision_device: int             # position in ``devices``

    @classmethod
    def of(cls, layout: ResolvedLayout, devices: Sequence[torch.device]) -> "SpanPlacement | None":
        if len(devices) < 2:
            return None  # one device: spans carry none
        names = [str(d) for d in devices]

        def device_of(module: nn.Module) -> int:
            return names.index(str(next(module.parameters(), torch.empty(0, device=devices[0])).device))

        return cls(tuple(names), np.asarray([device_of(m) for _, m in layout.layers], dtype=np.int16),
                   device_of(layout.vision_home) if layout.vision_home is not None else 0)

    def place(self, spans: SpanTable) -> SpanTable:
        code = np.zeros(len(spans), dtype=np.int16)
        layers = spans.kind == KIND_CODE["layer"]
        code[layers] = self.layer_device[spans.index[layers]]
        code[spans.kind == KIND_CODE["vision"]] = self.vision_device
        return spans.placed(code, self.devices)


def layer_mark_callables(timeline: Timeline, placement: "SpanPlacement | None",
                         n_layers: int) -> list[tuple[Callable[[int], None], Callable[[int], None]]]:
    """Per decoder layer, what records its begin mark and its end mark.

    One device: the timeline's native mark for both. A model split over GPUs: one event per
    mark, on the GPU whose work the boundary waits for —

    * a layer's end: the layer's own GPU (its output stays there);
    * a layer's begin: the previous layer's GPU. The mark is issued before the layer's
      forward runs, and with ``device_map`` the hidden states move to the layer's GPU inside
      that forward (accelerate's hook), after the mark: what the boundary waits for is the
      previous layer's work. The copy itself then counts to the layer that needs it;
    * the first layer's begin: every GPU (what runs before it — embeddings, the vision
      merge, rotary tables, masks — may sit on any of them).
    """
    every = timeline.mark
    device_mark = getattr(timeline, "device_mark", None)
    if placement is None or device_mark is None:
        return [(every, every)] * n_layers
    at = [device_mark(int(d)) for d in placement.layer_device[:n_layers]]
    return [(every if i == 0 else at[i - 1], at[i]) for i in range(n_layers)]
