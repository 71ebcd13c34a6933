"""``tracing.patch.Shadows``: instance attributes set by one owner, put back exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from stagetrace.tracing.patch import Shadows


@pytest.mark.parametrize("direct", [False, True])
def test_restore_puts_back_exactly_what_the_instance_held(direct):
    layer, other = nn.Linear(2, 2), nn.Linear(2, 2)
    def own(x: torch.Tensor) -> torch.Tensor:
        return x
    other.forward = own  # a user's own instance-level forward (accelerate places one so)
    before = (dict(layer.__dict__), dict(other.__dict__))
    s = Shadows()
    wrapper = lambda x: x  # noqa: E731
    s.set(layer, "forward", wrapper, direct=direct)
    s.set(other, "forward", wrapper, direct=direct)
    assert layer.forward is wrapper and other.forward is wrapper and layer(torch.ones(2)) is not None
    # a plain attribute, not a parameter, buffer or submodule, whichever way it was written
    assert "forward" not in layer._parameters and "forward" not in layer._modules
    s.restore()
    assert (layer.__dict__, other.__dict__) == before and not s
    assert other.forward is own and "forward" not in layer.__dict__  # the class's forward shows again


def test_switching_many_times_leaves_nothing_behind():
    layer = nn.Linear(2, 2)
    before = dict(layer.__dict__)
    s = Shadows()
    for _ in range(3):
        s.set(layer, "forward", lambda x: x, direct=True)
        s.restore()
    assert layer.__dict__ == before
