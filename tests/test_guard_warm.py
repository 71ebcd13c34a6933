"""guard_warm's pure parts: the compiled frame's locals rebuilt for a call, and the frame found on
the forward's chain — checked against dynamo's own cache entries on a small compiled module."""
from __future__ import annotations

import functools

import torch
from torch import nn

from stagetrace.tracing.guard_warm import GuardWarmer, frame_locals, frame_of_compiled_call


def _decorated(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):  # the shape of transformers' forward decorators
        return fn(self, *args, **kwargs)

    return wrapper


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @_decorated
    def forward(self, x, scale=1.0):
        return self.lin(x) * scale


def test_frame_locals_fill_positional_star_and_double_star_and_free_variables():
    def plain(self, a, b=2):
        return a

    def starred(*args, **kwargs):
        return args

    free_value = object()

    def closing(self, *rest, **kw):
        return free_value

    model = object()
    assert frame_locals(plain.__code__, {}, model, (1,), {}) == {"self": model, "a": 1}
    assert frame_locals(starred.__code__, {}, model, (1, 2), {"k": 3}) == {"args": (model, 1, 2), "kwargs": {"k": 3}}
    loc = frame_locals(closing.__code__, {"free_value": free_value}, model, (5,), {"x": 6})
    assert loc == {"self": model, "rest": (5,), "kw": {"x": 6}, "free_value": free_value}


def test_the_frame_found_on_the_forward_chain_passes_its_own_cache_entry():
    import torch._dynamo

    torch._dynamo.reset()
    model = _Toy().eval()
    x = torch.randn(2, 4)
    assert frame_of_compiled_call(model) is None  # nothing compiled yet
    compiled = torch.compile(model.__call__, backend="eager")
    with torch.no_grad():
        compiled(x, scale=2.0)
    code, free = frame_of_compiled_call(model)
    assert code is type(model).forward.__code__ and set(free) == {"fn"}  # the decorator's wrapper
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    (entry,) = _debug_get_cache_entry_list(code)
    with torch.no_grad():
        assert entry.guard_manager.check(frame_locals(code, free, model, (x,), {"scale": 2.0}))
        assert not entry.guard_manager.check(frame_locals(code, free, model, (torch.randn(3, 5),), {"scale": 2.0}))
    torch._dynamo.reset()


def test_the_warmer_checks_with_the_last_call_and_forgets_it():
    import torch._dynamo

    torch._dynamo.reset()
    model = _Toy().eval()
    warmer = GuardWarmer(model)
    warmer.warm()  # nothing captured yet: nothing checked
    assert warmer.warmed == 0 and not warmer.off
    get_compiled_call = warmer.capturing(lambda: torch.compile(model.__call__, backend="eager"))
    step = get_compiled_call()
    with torch.no_grad():
        step(torch.randn(2, 4), scale=3.0)
        warmer.warm()
    assert (warmer.warmed, warmer.passed, warmer.off) == (1, 1, False)
    warmer.forget()
    warmer.warm()
    assert warmer.warmed == 1
    torch._dynamo.reset()


def test_a_warmer_whose_model_has_no_compiled_frame_turns_itself_off():
    warmer = GuardWarmer(_Toy())
    warmer._last = ((torch.randn(2, 4),), {})
    warmer.warm()
    assert warmer.off and warmer.warmed == 0
    warmer.warm()  # off for good: nothing more is tried
    assert warmer.warmed == 0

