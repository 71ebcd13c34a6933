"""Reference timelines: what users do today, behind the same timeline protocol.

They let benchmarks and tests put the usual methods at exactly stagetrace's
boundaries (``Tracer(model, timeline=SyncTimeline())``) so only the clock differs.
Not for production use: each mark costs a sync or a Python-side CUDA event.
"""
from __future__ import annotations

import time

import numpy as np

__all__ = ["SyncTimeline", "TorchEventTimeline", "HostClockTimeline", "DualTimeline", "spin_cycles_per_us", "gpu_handover"]


class _Base:
    def __init__(self) -> None:
        self._labels: list[int] = []
        self._host: list[int] = []
        self._resolved = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def resolved(self) -> bool:
        return self._resolved

    # the Timeline protocol's stream and clock calls: these clocks have neither
    device_streams: list[int] = []

    def bind_streams(self, streams: object) -> None:
        pass

    def calibrate(self) -> None:
        pass

    def reset(self) -> None:
        self._labels.clear()
        self._host.clear()
        self._resolved = False


class SyncTimeline(_Base):
    """``torch.cuda.synchronize()`` + ``time.perf_counter_ns()`` at every mark (the usual hook)."""

    backend = "sync"

    def __init__(self, device: int | None = 0) -> None:
        super().__init__()
        self._device = device  # None: CPU work, nothing to synchronize

    def mark(self, label: int) -> None:
        if self._device is not None:
            import torch

            torch.cuda.synchronize(self._device)
        self._host.append(time.perf_counter_ns())
        self._labels.append(label)

    def mark_on(self, label: int, stream: int) -> None:
        self.mark(label)

    def resolve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._resolved = True
        host = np.asarray(self._host, dtype=np.int64)
        return (np.asarray(self._labels, dtype=np.int32), host - host[0], host, np.zeros(len(host), np.int64))


class TorchEventTimeline(_Base):
    """A ``torch.cuda.Event(enable_timing=True)`` created and recorded from Python at every mark."""

    backend = "torch-event"

    def __init__(self) -> None:
        super().__init__()
        self._events: list = []

    def mark(self, label: int) -> None:
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._events.append(ev)
        self._labels.append(label)
        self._host.append(time.monotonic_ns())

    def mark_on(self, label: int, stream: int) -> None:
        self.mark(label)

    def resolve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._events[-1].synchronize()
        first = self._events[0]
        dev = np.array([0] + [round(first.elapsed_time(e) * 1e6) for e in self._events[1:]], dtype=np.int64)
        self._resolved = True
        return (np.asarray(self._labels, dtype=np.int32), dev, np.asarray(self._host, dtype=np.int64),
                np.zeros(len(dev), np.int64))

    def reset(self) -> None:
        super().reset()
        self._events.clear()


class HostClockTimeline(_Base):
    """The same native call at every mark, but to the host clock: no CUDA event recorded.

    For decomposing what a mark costs a call (``benchmarks/overhead.py``): the tracer's hooks,
    wrappers and one pybind11 call into the extension all run as with CUDA events, so a wall
    difference between the two is what recording the event itself adds. Its times are host
    times (kernel launches, not GPU work): never for figures of a GPU call's stages.
    """

    backend = "host-clock"

    def __init__(self, capacity: int = 1 << 15) -> None:
        super().__init__()
        from ..low_level import _C

        if _C is None:
            raise RuntimeError("HostClockTimeline needs stagetrace's native extension")
        self._native = _C.HostTimeline(capacity)
        self.mark = self._native.mark  # the hot path goes straight to the native call

    def mark_on(self, label: int, stream: int) -> None:
        self._native.mark(label)

    def __len__(self) -> int:
        return len(self._native)

    @property
    def resolved(self) -> bool:
        return bool(self._native.resolved)

    def resolve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self._native.resolve()  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._native.reset()


class DualTimeline:
    """stagetrace's CUDA events and the sync method at the very same marks of the very same run.

    Each mark records the native event, then synchronizes and stamps the host clock. The
    run is perturbed by the syncs, but both clocks see the same perturbed run, so their
    stages differ only by what each clock measures: agreement without run-to-run noise.
    After ``resolve()``, ``reference`` holds the sync method's (labels, times_ns).
    """

    backend = "cuda"

    def __init__(self, native: object) -> None:
        self._native = native
        self._host: list[int] = []
        self.reference: tuple[np.ndarray, np.ndarray] | None = None

    def bind_streams(self, streams: object) -> None:
        self._native.bind_streams(streams)  # type: ignore[attr-defined]

    def calibrate(self) -> None:
        self._native.calibrate()  # type: ignore[attr-defined]

    @property
    def device_streams(self) -> list[int]:
        return self._native.device_streams  # type: ignore[attr-defined,no-any-return]

    def mark(self, label: int) -> None:
        import torch

        self._native.mark(label)  # type: ignore[attr-defined]
        torch.cuda.synchronize()
        self._host.append(time.perf_counter_ns())

    def mark_on(self, label: int, stream: int) -> None:
        self.mark(label)

    def resolve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        out = self._native.resolve()  # type: ignore[attr-defined]
        host = np.asarray(self._host, dtype=np.int64)
        self.reference = (out[0].copy(), host - host[0])
        return out

    def reset(self) -> None:
        self._native.reset()  # type: ignore[attr-defined]
        self._host.clear()

    @property
    def dropped(self) -> int:
        return int(self._native.dropped)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self._native)  # type: ignore[arg-type]


def spin_cycles_per_us(cycles: int = 4_000_000) -> float:
    """GPU clock cycles per µs, for spin kernels of known duration (``torch.cuda._sleep``).

    Measured with an event pair after a warm-up spin (the card may idle at a low clock).
    """
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles // 4)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1e3)


def gpu_handover(timeline: object, cycles_per_us: float, first_us: float = 2000.0,
                 second_us: float = 1000.0) -> dict[str, object]:
    """Known work handed from GPU 0 to GPU 1, marked through a two-device ``timeline``.

    GPU 0 spins ``first_us``; GPU 1 waits for it (an event wait) and spins ``second_us``.
    Marks (on both devices, calibrated first, as the tracer does): call begin, after GPU 0's
    spin, after GPU 1's wait, after GPU 1's spin. Returns the merged times, which device each
    mark took its time from, GPU 1's start minus GPU 0's end on the calibrated clock
    (``handover_us``: the cross-GPU wait latency plus the calibration error), and reference
    event pairs of each spin on its own device (each pair's second event recorded after our
    mark, so both intervals hold the same number of event writes).
    """
    import torch

    from ..labels import Kind, label
    from ..low_level.clocks import place_on_one_clock

    tl = timeline
    labels = [label(Kind.CALL_BEGIN), label(Kind.PREFILL_FORWARD), label(Kind.LM_BEGIN), label(Kind.CALL_END)]
    tl.reset()  # type: ignore[attr-defined]
    tl.bind_streams([torch.cuda.current_stream(0).cuda_stream,  # type: ignore[attr-defined]
                     torch.cuda.current_stream(1).cuda_stream])
    tl.calibrate()  # type: ignore[attr-defined]
    tl.mark(labels[0])  # type: ignore[attr-defined]
    with torch.cuda.device(0):
        a0, b0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a0.record()
        torch.cuda._sleep(int(first_us * cycles_per_us))
        b0.record()
    tl.mark(labels[1])  # type: ignore[attr-defined]
    with torch.cuda.device(1):
        torch.cuda.current_stream(1).wait_event(b0)
    tl.mark(labels[2])  # type: ignore[attr-defined]
    with torch.cuda.device(1):
        a1, b1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a1.record()
        torch.cuda._sleep(int(second_us * cycles_per_us))
    tl.mark(labels[3])  # type: ignore[attr-defined]
    with torch.cuda.device(1):
        b1.record()
    per_device = [t.resolve() for t in tl.timelines]  # type: ignore[attr-defined]
    (_, t, _, _), which = place_on_one_clock(per_device)
    d0_end = per_device[0][2][0] + per_device[0][1][1]
    d1_start = per_device[1][2][0] + per_device[1][1][2]
    return {"t_ns": t, "which": which, "handover_us": (d1_start - d0_end) / 1e3,
            "first_ref_us": a0.elapsed_time(b0) * 1e3, "second_ref_us": a1.elapsed_time(b1) * 1e3}
