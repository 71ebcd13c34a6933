"""The CUDA timeline against known GPU work (spin kernels), on the device machine."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _spin_cycles_per_us():
    from stagetrace.testing.reference import spin_cycles_per_us

    return spin_cycles_per_us()


@pytest.mark.parametrize("target_us", [50, 1000, 10000])
def test_marks_around_spin_kernels_match_a_reference_event_pair(target_us):
    import torch

    from stagetrace.low_level import _C

    cycles = int(target_us * _spin_cycles_per_us())
    stream = torch.cuda.current_stream()
    tl = _C.CudaTimeline(torch.cuda.current_device(), capacity=64)
    tl.bind_stream(stream.cuda_stream)
    errors = []
    for _ in range(5):
        tl.reset()
        ref_start, ref_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Keep the GPU busy (~2 ms) so the host runs ahead, as in real use: a host hiccup
        # between the reference event and our mark then costs no GPU time.
        torch.cuda._sleep(int(2000 * _spin_cycles_per_us()))
        # Each reference event right after our mark: both intervals then hold the same
        # number of event writes (a bracketing pair would add two, a few µs on some hosts).
        tl.mark(1)
        ref_start.record()
        torch.cuda._sleep(cycles)
        tl.mark(2)
        ref_end.record()
        labels, device_ns, _, _ = tl.resolve()
        ref_us = ref_start.elapsed_time(ref_end) * 1e3
        ours_us = (device_ns[1] - device_ns[0]) / 1e3
        assert labels.tolist() == [1, 2]
        errors.append((ours_us, ref_us))
    for ours_us, ref_us in errors:
        assert abs(ours_us - ref_us) <= max(0.01 * ref_us, 3.0), errors
        assert abs(ref_us - target_us) <= 0.2 * target_us + 5, errors  # the spin really is that long


def test_one_hundred_thousand_marks_in_one_run_resolve_correctly():
    import torch

    from stagetrace.low_level import _C

    tl = _C.CudaTimeline(torch.cuda.current_device(), capacity=4096, chunk=4096)
    tl.bind_stream(torch.cuda.current_stream().cuda_stream)
    n = 100_000
    for i in range(n):
        if i % 10_000 == 0:
            torch.cuda._sleep(10_000)
        tl.mark(i)
    assert tl.dropped == 0 and len(tl) == n and tl.capacity >= n
    labels, device_ns, host_ns, streams = tl.resolve()
    assert labels.tolist() == list(range(n))
    assert device_ns[0] == 0 and np.all(np.diff(device_ns) >= 0) and np.all(np.diff(host_ns) >= 0)
    assert device_ns[-1] > 0


def test_marks_on_a_side_stream_that_finishes_last_are_still_resolved():
    import torch

    from stagetrace.low_level import _C

    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    tl = _C.CudaTimeline(torch.cuda.current_device())
    tl.bind_stream(main.cuda_stream)
    tl.mark(1)
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(2000 * _spin_cycles_per_us()))  # ~2 ms on the side stream only
        tl.mark_on(2, side.cuda_stream)
    tl.mark(3)  # the last recorded mark completes long before mark 2
    labels, device_ns, _, streams = tl.resolve()
    assert streams.tolist() == [main.cuda_stream, side.cuda_stream, main.cuda_stream]
    assert device_ns[1] >= 1.5e6 and device_ns[2] < device_ns[1]


def test_stream_handles_are_validated_when_bound():
    import torch

    from stagetrace.low_level import _C

    tl = _C.CudaTimeline(torch.cuda.current_device())
    with pytest.raises(ValueError):
        tl.bind_stream(-1)
    tl.bind_stream(0)  # the legacy default stream is valid
    with pytest.raises(ValueError, match="does not exist"):
        _C.CudaTimeline(torch.cuda.device_count())


def test_the_cuda_backend_is_chosen_for_a_cuda_model():
    import stagetrace

    info = stagetrace.backend_info()
    assert info.default == "cuda" and info.cuda_devices >= 1 and str(info).startswith("cuda")
    assert stagetrace.new_timeline("cuda", 0).backend == "cuda"
