"""Dynamo's guard check of the graph a sampled compiled step switches to, run ahead, while the host
waits for the GPU anyway (on by default: ``compiled_decode.WARM_GUARDS``).

Why. With sampled layer stamps (``layer_every`` N) the compiled decode step has two dynamo cache
entries, the bare graph and the stamped one. A stamped step spends 170–250 µs more than a bare one
in dynamo's cache lookup, more the longer since its graph last ran (``benchmarks/README.md``,
session 13); the same checks run back to back cost about what a bare step's do, and one run after
the CPU's caches were evicted costs 5–8 times a warm one (``benchmarks/guard_checks.py``). So the
step pays for checking a large guard tree cold.

How. generate() ends each compiled step by issuing its stopping criteria and then waits, on the
host, for the GPU to finish the step (a sync to read the stop flag): 0.5–1 ms at batch 1 on an
H200 (the stop-check mark's lead). Where the next step runs the other graph, the coordinator puts
the layers' forwards in place for it right there (``compiled_decode.py``) and :meth:`GuardWarmer.warm`
checks the frame's cache entries with the locals of the last compiled call: the entry that no
longer matches fails at its first differing guard, the one the next step will take reads its
whole tree, which the real lookup then finds in the caches.

What must stay true: a guard check has no effect but on dynamo's own bookkeeping (which entry
failed where, the dictionaries it last saw), so warming never changes which graph runs or what it
computes; it reads dynamo's private structures, so any failure turns it off for the tracer, without
a word — it only ever saves time; it runs only before a sync the host waits at anyway.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable

__all__ = ["GuardWarmer", "frame_of_compiled_call", "frame_locals"]


def frame_of_compiled_call(model: Any) -> tuple[types.CodeType, dict[str, Any]] | None:
    """The code object dynamo keeps the model's compiled forward's cache entries on (the outermost
    frame it compiled: in transformers 5.x a decorator's wrapper of the forward) and that frame's
    free variables, read off the first function of the forward's ``__wrapped__`` chain that has
    entries; None where none has."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    fn = type(model).forward
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and _debug_get_cache_entry_list(code):
            return code, dict(zip(code.co_freevars, [c.cell_contents for c in fn.__closure__ or ()]))
        fn = getattr(fn, "__wrapped__", None)
    return None


def frame_locals(code: types.CodeType, free: dict[str, Any], model: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> dict[str, Any]:
    """That frame's locals for the call ``model(*args, **kwargs)``: its positional parameters (the
    model first), its ``*args`` and ``**kwargs``, its free variables."""
    n, names = code.co_argcount, code.co_varnames
    star = names[n] if code.co_flags & inspect.CO_VARARGS else None
    dstar = names[n + (1 if star else 0)] if code.co_flags & inspect.CO_VARKEYWORDS else None
    pos = (model, *args)
    loc = dict(zip(names[:n], pos))
    if star:
        loc[star] = pos[n:]
    if dstar:
        loc[dstar] = dict(kwargs)
    loc.update(free)
    return loc


class GuardWarmer:
    """Keeps the inputs of the model's last compiled call (``capturing`` wraps what
    ``get_compiled_call`` returns) and checks the compiled frame's cache entries with them."""

    def __init__(self, model: Any):
        self.model = model
        self.off = False  # set for good by the first failure
        self.warmed = 0  # warm() calls that checked entries
        self.passed = 0  # of those, the ones where an entry passed (its whole tree was read)
        self._last: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._frame: tuple[types.CodeType, dict[str, Any]] | None = None

    def capturing(self, get_compiled_call: Callable[..., Any]) -> Callable[..., Any]:
        warmer = self

        @functools.wraps(get_compiled_call)
        def capturing_get_compiled_call(*args: Any, **kwargs: Any) -> Any:
            compiled_call = get_compiled_call(*args, **kwargs)

            def compiled_step(*a: Any, **k: Any) -> Any:
                warmer._last = (a, k)  # references only: generate() builds new inputs every step
                return compiled_call(*a, **k)

            return compiled_step

        return capturing_get_compiled_call

    def forget(self) -> None:
        """After a call: its inputs are not kept past it."""
        self._last = None

    def warm(self) -> None:
        if self.off or self._last is None:
            return
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list

            if self._frame is None:
                self._frame = frame_of_compiled_call(self.model)
                if self._frame is None:
                    self.off = True
                    return
            code, free = self._frame
            loc = frame_locals(code, free, self.model, *self._last)
            self.warmed += 1
            for entry in _debug_get_cache_entry_list(code):
                if entry.guard_manager.check(loc):
                    self.passed += 1
                    break
        except Exception:  # private structures of another torch: no warming, nothing else changes
            self.off = True
