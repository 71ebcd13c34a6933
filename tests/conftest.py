"""Shared fixtures. GPU tests carry @pytest.mark.gpu and are skipped, with the reason,
when stagetrace has no usable CUDA backend. Nothing here touches a device at import."""
from __future__ import annotations

import pytest


def cuda_skip_reason() -> str | None:
    import torch

    import stagetrace

    info = stagetrace.backend_info()
    if info.cuda_devices == 0:
        return f"no usable CUDA backend: {info.reason}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


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


# Each check is written once as _check(device) and run on both backends.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
