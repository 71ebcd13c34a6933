"""Shared pytest hooks and fixtures. GPU tests carry @pytest.mark.gpu and are skipped, with
the reason, when stagetrace has no usable CUDA backend. Nothing here touches a device at
import. Plain helpers (DEVICES, sync, ...) live in helpers.py: this file is never imported."""
from __future__ import annotations

import sys
from typing import Any, Iterator

import pytest

from helpers import cuda_skip_reason, stagetrace_leftovers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    reason = cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_tracing_state_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fails a test after which a tracer is still active, or a model it traced still carries a
    hook, a wrapper or a shadowed attribute placed by stagetrace's tracing code."""
    from stagetrace.tracing import tracer as tracer_module

    traced: list[Any] = []
    start = tracer_module.Tracer.start

    def recording_start(self: Any) -> Any:
        if not any(m is self.model for m in traced):
            traced.append(self.model)
        return start(self)

    monkeypatch.setattr(tracer_module.Tracer, "start", recording_start)
    yield
    still_active = [type(m).__name__ for m in list(tracer_module._ACTIVE)]
    for model in list(tracer_module._ACTIVE):  # leave the next test a clean slate either way
        tracer_module._ACTIVE[model].stop()
    assert not still_active, f"a tracer was left active on {still_active}"
    for model in traced:
        left = stagetrace_leftovers(model)
        assert not left, f"tracing left hooks, wrappers or attributes on {type(model).__name__}: {left}"
    inductor_config = sys.modules.get("torch._inductor.config")  # only once a test imported it
    if inductor_config is not None:
        left_pass = type(inductor_config.post_grad_custom_pre_pass).__name__
        assert left_pass != "MoveStampsToLastMatmul", "a tracer left its stamp pass in inductor's config"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two contended ones; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
