"""Helpers shared by the tests (no fixtures; plain functions and constants)."""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import pytest
import torch
from torch import nn

from stagetrace.testing import tiny

# Each check is written once as _check(device) and run on both backends.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def cuda_skip_reason() -> str | None:
    import stagetrace

    info = stagetrace.backend_info()
    if info.cuda_devices == 0:
        return f"no usable CUDA backend: {info.reason}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def other_transformers_release() -> bool:
    """True where the installed transformers is not the one the zoo's configs were written for:
    a tiny model that then fails to build or run untraced is skipped with its error."""
    import transformers

    from stagetrace.testing.zoo import WRITTEN_FOR

    return transformers.__version__ != WRITTEN_FOR


def cached_cases(build_one: Callable[[str], Any]) -> Callable[[str], Any]:
    """``case(case_id)``: each case built once per session (tests of one survey share it); one that
    cannot be built here skips its test with the reason."""
    from stagetrace.testing.zoo import Unbuildable

    @functools.lru_cache(maxsize=None)
    def built(case_id: str) -> Any:
        try:
            return build_one(case_id)
        except Unbuildable as e:
            return e

    def case(case_id: str) -> Any:
        found = built(case_id)
        if isinstance(found, Unbuildable):
            pytest.skip(f"{case_id}: cannot be built here ({found.reason})")
        return found

    return case


def zoo_case_on(model_type: str, device: str) -> Any:
    """A zoo model and its inputs on ``device`` (skipped as :func:`zoo_case` says)."""
    case = zoo_case(model_type)
    case.model.to(device)
    case.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.inputs.items()}
    return case


def zoo_untraced_tokens(case: Any) -> torch.Tensor:
    """The tokens of an untraced generate(); on a transformers release the zoo was not written
    for, a tiny model that does not run is skipped with the error, never blamed on the tracer."""
    try:
        return tokens(case.generate())
    except Exception as e:  # noqa: BLE001 - only on a transformers release the zoo was not written for
        if not other_transformers_release():
            raise
        pytest.skip(f"{case.model_type}: the zoo's tiny model does not run untraced on this transformers "
                    f"({type(e).__name__}: {str(e)[:120]})")


def zoo_case(model_type: str, **kw: Any) -> Any:
    """A zoo model, or the test skipped with the reason it cannot be built here (and, on a
    transformers release the zoo was not written for, with the error it fails with)."""
    from stagetrace.testing.zoo import Unbuildable, build

    try:
        return build(model_type, **kw)
    except Unbuildable as e:
        pytest.skip(f"{model_type}: cannot be built here ({e.reason})")
    except Exception as e:  # noqa: BLE001 - only on a transformers release the zoo was not written for
        if not other_transformers_release():
            raise
        pytest.skip(f"{model_type}: the zoo's config does not build on this transformers ({type(e).__name__}: {e})")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_on(family: str, device: str, **kw: Any) -> tiny.TinyCase:
    case = tiny.build(family, **kw)
    case.model.to(device)
    case.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.inputs.items()}
    return case


def gen_kwargs(case: tiny.TinyCase, new_tokens: int, **extra: Any) -> dict[str, Any]:
    """Deterministic generate() kwargs forcing exactly `new_tokens` tokens."""
    kw: dict[str, Any] = dict(case.inputs, max_new_tokens=new_tokens)
    if case.family != "molmo_like":  # Molmo's own loop is greedy and fixed-length already
        kw.update(min_new_tokens=new_tokens, do_sample=False, **case.generate_kwargs)
    kw.update(extra)
    return kw


def hook_state(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every hook dict of every submodule, plus whether generate is patched."""
    state = {}
    for name, m in model.named_modules():
        state[name] = tuple(len(getattr(m, d)) for d in (
            "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_always_called", "_backward_hooks"))
        state[name] += ("forward" in m.__dict__,)
    # what the tracer shadows on the top-level model must be gone again
    state["<model attributes shadowed>"] = tuple(  # type: ignore[assignment]
        a in model.__dict__ for a in ("generate", "_valid_auto_compile_criteria", "prepare_inputs_for_generation",
                                      "_get_stopping_criteria", "get_compiled_call"))
    return state


def _from_stagetrace(fn: Any) -> bool:
    fn = getattr(fn, "__func__", fn)
    return str(getattr(fn, "__module__", "") or "").startswith("stagetrace.tracing")


def stagetrace_leftovers(model: nn.Module) -> list[str]:
    """Hooks, wrappers and shadowing attributes that stagetrace's tracing code put on ``model``
    and its submodules (transformers adds hooks of its own on first use: those are not ours)."""
    found = []
    for name, m in model.named_modules():
        for d in ("_forward_hooks", "_forward_pre_hooks"):
            found += [f"{name or '<model>'}.{d}" for fn in getattr(m, d).values() if _from_stagetrace(fn)]
        found += [f"{name or '<model>'}.{attr}" for attr, value in m.__dict__.items()
                  if callable(value) and _from_stagetrace(value)]
    return found


def tokens(out: Any) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out.sequences).cpu()


def assert_partition(rec: Any) -> None:
    assert rec.error is None, rec.error
    parts = [rec.vision_ms or 0.0, rec.prefill_ms, rec.decode_ms, rec.other_ms]
    assert abs(sum(parts) - rec.total_ms) <= 1e-9 * max(1.0, rec.total_ms)
    assert all(p >= 0 for p in parts), parts
    assert rec.prefill_ms > 0 and rec.total_ms > 0
    assert 0 < rec.ttft_ms <= rec.total_ms
    assert abs(sum(rec.decode_step_ms) - rec.decode_ms) <= 1e-9 * max(1.0, rec.total_ms)
    assert all(s > 0 for s in rec.decode_step_ms)


def trace_once(case: tiny.TinyCase, kw: dict[str, Any], **trace_kw: Any) -> Any:
    """generate() untraced, then traced with the same arguments: same tokens, one exact record."""
    import stagetrace

    plain = tokens(case.model.generate(**kw))
    with stagetrace.trace(case.model, **trace_kw) as tracer:
        traced = tokens(case.model.generate(**kw))
    assert torch.equal(plain, traced), "tracing changed the generated tokens"
    (rec,) = tracer.records
    assert_partition(rec)
    return rec


# ---------------------------------------------------------------- where a module ran (coverage surveys)
def time_runs(model: torch.nn.Module, paths: list[str]) -> tuple[dict[str, list[list[int]]], list[Any]]:
    """Host-clock start/end of every run of each module's forward (``path``) or method (``path:method``)."""
    from stagetrace.layouts import get_module

    runs: dict[str, list[list[int]]] = {p: [] for p in paths}
    undo: list[Any] = []
    for p in paths:
        path, _, method = p.partition(":")
        mod = get_module(model, path) if path else model
        if method:
            inner = getattr(mod, method)

            def timed(*a: Any, _inner: Any = inner, _p: str = p, **k: Any) -> Any:
                runs[_p].append([time.monotonic_ns(), 0])
                out = _inner(*a, **k)
                runs[_p][-1][1] = time.monotonic_ns()
                return out

            setattr(mod, method, timed)
            undo.append(functools.partial(delattr, mod, method))
            continue
        h1 = mod.register_forward_pre_hook(lambda m, a, p=p: runs[p].append([time.monotonic_ns(), 0]))
        h2 = mod.register_forward_hook(lambda m, a, o, p=p: runs[p][-1].__setitem__(1, time.monotonic_ns()),
                                       prepend=True)
        undo += [h1.remove, h2.remove]
    return runs, undo


def traced_with_runs(case: Any, paths: list[str], **trace_kw: Any) -> tuple[Any, dict[str, list[list[int]]], Any, Any]:
    """One traced generate() with ``paths`` timed inside the tracer's marks: (record, runs, output, tracer)."""
    import stagetrace

    with stagetrace.trace(case.model, **trace_kw) as tracer:
        runs, undo = time_runs(case.model, paths)
        try:
            out = case.generate()
        finally:
            for u in undo:
                u()
    (rec,) = tracer.records
    return rec, runs, out, tracer


def stage_of(rec: Any, a: int, b: int) -> str:
    """The stage whose span holds the host-clock interval [a, b]: vision, prefill, "step i", or
    other (inside the call, in none of them)."""
    h = rec.host_start_ns
    for kind in ("vision", "prefill", "step"):
        for s in rec.spans.of_kind(kind):
            if h + s.start_ns <= a and b <= h + s.end_ns:
                return kind if kind != "step" else f"step {s.index}"
    return "other"


def first_step_ns(rec: Any) -> int:
    steps = rec.spans.of_kind("step")
    return rec.host_start_ns + steps[0].start_ns if steps else rec.host_start_ns + rec.spans.of_kind("call")[0].end_ns


def before_first_step(rec: Any, runs: dict[str, list[list[int]]]) -> dict[str, list[tuple[int, int]]]:
    first = first_step_ns(rec)
    return {p: [(a, b) for a, b in r if a < first] for p, r in runs.items() if any(a < first for a, _ in r)}


# ---------------------------------------------------------------- compiled runs
def dynamo_state() -> dict[str, int]:
    """What dynamo/inductor did so far: frames by outcome, graph breaks, cudagraph skips."""
    from torch._dynamo.utils import counters

    return {**{f"frames.{k}": v for k, v in counters["frames"].items()},
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}


def fresh_dynamo() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def static_compiled(case: tiny.TinyCase, device: str = "cpu") -> dict[str, Any]:
    """generate() kwargs under which transformers compiles the decode step itself (static cache).

    On CUDA transformers' default (inductor, mode="reduce-overhead": CUDA graphs). On the CPU
    dynamo's eager backend keeps tests fast: what is checked there is what dynamo sees
    (graphs, breaks, recompiles)."""
    from transformers import CompileConfig

    case.model.generation_config.cache_implementation = "static"
    if device == "cuda":
        return {}
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True  # what a CUDA device gets by default
    return {"compile_config": config}


def compile_forward_by_hand(case: tiny.TinyCase, device: str, new_tokens: int,
                            mode: str = "reduce-overhead", cpu_backend: Any = "eager") -> Any:
    """A text model's forward compiled by hand; returns a function: one generate(), its tokens.

    On CUDA the recipe transformers 5.x needs for that (untraced too): a static cache
    initialized before the compiled forward sees it (else its tensors become CUDA-graph
    outputs that the next replay overwrites), reset between calls, and each invocation
    marked as a new CUDA-graph step. On the CPU dynamo's eager backend (or ``cpu_backend``)
    and a dynamic cache.
    """
    import functools

    model, cache = case.model, None
    kw = gen_kwargs(case, new_tokens, disable_compile=True)  # transformers must not compile again
    if device == "cuda":
        from transformers import StaticCache

        cfg = model.config
        cache = StaticCache(config=cfg, max_cache_len=case.prompt_len + new_tokens)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache.early_initialization(case.inputs["input_ids"].shape[0], cfg.num_key_value_heads, head_dim,
                                   model.dtype, torch.device("cuda"))
        kw["past_key_values"] = cache
        compiled = torch.compile(model.forward, mode=mode)
    else:
        compiled = torch.compile(model.forward, backend=cpu_backend)

    @functools.wraps(compiled)
    def forward(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    model.forward = forward

    def generate() -> torch.Tensor:
        if cache is not None:
            cache.reset()
        return tokens(model.generate(**kw))

    return generate
