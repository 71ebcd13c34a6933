"""The native recorder: a timeline of labelled marks, resolved after one wait."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import stagetrace
from stagetrace.low_level import _C
from stagetrace.low_level import Marks, PyHostTimeline, new_timeline

ROOT = Path(__file__).resolve().parent.parent

HOST_TIMELINES = [pytest.param(_C.HostTimeline, id="native"), pytest.param(PyHostTimeline, id="python-twin")]


@pytest.mark.parametrize("Timeline", HOST_TIMELINES)
class TestHostTimeline:
    def test_marks_resolve_in_issue_order_with_labels_round_tripped(self, Timeline):
        tl = Timeline(capacity=8)
        labels = [7, 3, 2**20 + 9, 0, -1]
        for lab in labels:
            tl.mark(lab)
        got_labels, device_ns, host_ns, streams = tl.resolve()
        assert got_labels.dtype == np.int32 and device_ns.dtype == np.int64 and host_ns.dtype == np.int64
        assert got_labels.tolist() == labels
        assert device_ns[0] == 0 and np.all(np.diff(device_ns) >= 0)
        assert np.array_equal(device_ns, host_ns - host_ns[0])
        assert streams.tolist() == [0] * len(labels)

    def test_host_stamps_are_on_the_monotonic_clock_and_resolve_real_time(self, Timeline):
        tl = Timeline()
        before = time.monotonic_ns()
        tl.mark(1)
        time.sleep(0.02)
        tl.mark(2)
        after = time.monotonic_ns()
        _, device_ns, host_ns, _ = tl.resolve()
        assert before <= host_ns[0] <= host_ns[1] <= after
        assert 20e6 <= device_ns[1] < 200e6

    def test_reset_reuses_the_timeline_for_the_next_run(self, Timeline):
        tl = Timeline(capacity=4)
        tl.mark(1)
        tl.resolve()
        tl.reset()
        assert len(tl) == 0 and not tl.resolved
        tl.mark(5)
        tl.mark(6)
        assert tl.resolve()[0].tolist() == [5, 6]

    def test_grows_in_chunks_past_the_initial_capacity_without_dropping(self, Timeline):
        tl = Timeline(capacity=4, chunk=3)
        for i in range(20):
            tl.mark(i)
        assert len(tl) == 20 and tl.capacity >= 20 and tl.dropped == 0
        assert tl.resolve()[0].tolist() == list(range(20))

    def test_a_pool_that_cannot_grow_flags_the_run_instead_of_mistiming_it(self, Timeline):
        tl = Timeline(capacity=2, chunk=2, max_marks=3)
        for i in range(5):
            tl.mark(i)
        assert len(tl) == 3 and tl.dropped == 2
        marks = Marks.from_timeline(tl)
        assert marks.dropped == 2 and marks.labels.tolist() == [0, 1, 2]

    def test_resolve_before_any_mark_is_an_error(self, Timeline):
        with pytest.raises(RuntimeError, match="before any mark"):
            Timeline().resolve()

    def test_marks_after_resolve_need_a_reset(self, Timeline):
        tl = Timeline()
        tl.mark(1)
        tl.resolve()
        with pytest.raises(RuntimeError, match="reset"):
            tl.mark(2)
        with pytest.raises(RuntimeError, match="twice"):
            tl.resolve()

    def test_the_host_backend_refuses_stream_handles(self, Timeline):
        with pytest.raises(ValueError, match="no streams"):
            Timeline().mark_on(1, 12345)

    def test_bad_sizes_are_refused(self, Timeline):
        with pytest.raises(ValueError):
            Timeline(capacity=0)
        with pytest.raises(ValueError):
            Timeline(capacity=4, chunk=0)
        with pytest.raises(ValueError):
            Timeline(capacity=8, max_marks=4)


def test_native_and_python_twin_agree_on_every_outcome():
    rng = np.random.default_rng(0)
    ops = rng.integers(0, 10, size=300)
    native, twin = _C.HostTimeline(capacity=3, chunk=5, max_marks=200), PyHostTimeline(3, 5, 200)
    for tl in (native, twin):
        for op in ops:
            tl.mark(int(op))
    assert len(native) == len(twin) and native.dropped == twin.dropped == 100
    a, b = native.resolve(), twin.resolve()
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[3], b[3])


def test_without_a_gpu_the_cuda_enabled_build_selects_the_cpu_backend_and_says_so():
    info = stagetrace.backend_info()
    if info.cuda_devices > 0:
        pytest.skip("this machine has a usable GPU")
    assert info.native
    assert info.default == "cpu"
    assert info.reason  # says why
    assert str(info).startswith("cpu (host clock") and info.reason in str(info)
    tl = new_timeline("cpu")
    assert tl.backend == "cpu"
    with pytest.raises(RuntimeError, match="CUDA backend is unusable"):
        new_timeline("cuda")


def test_this_build_has_the_cuda_backend_where_the_toolkit_is_installed():
    from setup import find_cuda_home  # the build's own detection

    if find_cuda_home() is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert _C.cuda_compiled()
    assert hasattr(_C, "CudaTimeline")


@pytest.mark.slow
def test_a_cpu_only_build_imports_and_says_why_cuda_is_missing(tmp_path):
    env = dict(os.environ, STAGETRACE_FORCE_CPU="1")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stderr
    assert "building the CPU-only backend" in build.stdout
    (so,) = (tmp_path / "lib" / "stagetrace" / "low_level").glob("_C*.so")
    probe = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("stagetrace.low_level._C", {str(so)!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        print(m.cuda_compiled(), hasattr(m, "CudaTimeline"), m.cuda_probe())
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False False (0, 'stagetrace was built without the CUDA backend")


@pytest.mark.parametrize("Timeline", HOST_TIMELINES)
def test_host_timelines_implement_the_whole_protocol_with_no_op_streams_and_clock(Timeline):
    tl = Timeline(capacity=4)
    tl.bind_streams([])
    tl.calibrate()
    assert tl.device_streams == [] and tl.dropped == 0 and tl.backend == "cpu"
    tl.mark(1)
    assert len(tl) == 1


def test_marks_without_drops_rows_but_never_the_calls_origin():
    labels = np.array([1, 6, 6, 2], dtype=np.int32)
    m = Marks(labels, np.array([0, 5, 9, 12]), np.array([100, 104, 108, 111]), np.array([7, 7, 7, 7]), "cpu", 0,
              np.array([False, True, False, False]))
    kept = m.without([2, 0, 9])  # the first mark and positions past the end are ignored
    assert kept.labels.tolist() == [1, 6, 2] and kept.device_ns.tolist() == [0, 5, 12]
    assert kept.host_ns.tolist() == [100, 104, 111] and kept.streams.tolist() == [7, 7, 7]
    assert kept.from_stamp.tolist() == [False, True, False] and kept.backend == "cpu"
    assert m.without([]) is m and m.without([0]) is m
