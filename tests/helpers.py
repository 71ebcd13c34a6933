"""Helpers shared by the tracer tests (no fixtures; plain functions)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stagetrace import tiny


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
        a in model.__dict__ for a in ("generate", "_valid_auto_compile_criteria", "prepare_inputs_for_generation"))
    return state


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
