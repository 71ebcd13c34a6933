"""The coverage matrix: every model type of the installed transformers' image-text-to-text
mapping, tiny and random, traced — and checked against what its own structure says ran.

Per type: the tracer finds its stages; vision spans the encoder and the projector (each of
their runs before the first decode step lies inside the vision span, on the CPU backend's
host clock; on CUDA the rest is checked); the stages partition the call exactly; one decode step per generated token
after the first, with ``output_tokens`` the tokens really generated; the same tokens traced
and untraced; no warning in the record; layer detail gives layer spans; nothing left on the
model (the autouse fixture). A type that cannot be built offline is skipped with its reason.
"""
from __future__ import annotations

import time

import pytest
import torch

import stagetrace
from stagetrace.layouts import get_module
from stagetrace.testing.survey import survey
from stagetrace.tracing.features import _placeholder_ids
from stagetrace.testing.zoo import model_types

from helpers import DEVICES, assert_partition, tokens, zoo_case_on, zoo_untraced_tokens

TYPES = model_types()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _time_modules(model: torch.nn.Module, paths: list[str]) -> tuple[dict[str, list[list[int]]], list]:
    """Host-clock start/end of every run of each module, taken inside the tracer's own marks."""
    runs: dict[str, list[list[int]]] = {p: [] for p in paths}
    handles = []
    for p in paths:
        mod = get_module(model, p)
        handles.append(mod.register_forward_pre_hook(lambda m, a, p=p: runs[p].append([time.monotonic_ns(), 0])))
        handles.append(mod.register_forward_hook(lambda m, a, o, p=p: runs[p][-1].__setitem__(1, time.monotonic_ns()),
                                                 prepend=True))
    return runs, handles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", TYPES)
def test_every_type_is_traced_truthfully(model_type, device):
    case = zoo_case_on(model_type, device)
    plain = zoo_untraced_tokens(case)
    vision_modules = survey(case)["vision_modules"]
    with stagetrace.trace(case.model, layer_detail="all") as tracer:
        runs, handles = _time_modules(case.model, vision_modules)
        try:
            out = case.generate()
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(plain, tokens(out)), "tracing changed the generated tokens"
    (rec,) = tracer.records
    assert_partition(rec)
    assert rec.warnings == [], rec.warnings
    assert rec.output_tokens == case.generated(out) == case.new_tokens
    assert len(rec.decode_step_ms) == rec.output_tokens - 1
    assert rec.vision_ms is not None and rec.vision_ms > 0, "no vision stage"
    ids = case.inputs.get("input_ids")
    if case.image_token_ids and ids is not None and case.shape == "decoder-only":  # features for latency models
        named = _placeholder_ids(case.model.config)  # None is honest only where the config names no such token
        want = sum(int((ids == t).sum()) for t in case.image_token_ids)
        assert rec.image_tokens == (want if named else None)
    (vision,) = rec.spans.of_kind("vision")
    assert rec.spans.of_kind("layer"), "layer detail gave no layer spans"
    if device != "cpu":
        return  # module runs are timed on the host clock: comparable with the spans on the CPU backend only
    first_step = rec.host_start_ns + rec.spans.of_kind("step")[0].start_ns
    v0, v1 = rec.host_start_ns + vision.start_ns, rec.host_start_ns + vision.end_ns
    for path, times in runs.items():
        before = [(a, b) for a, b in times if a < first_step]
        assert before, f"{path} did not run before the first decode step"
        for a, b in before:
            assert v0 <= a and b <= v1, f"{path} ran at [{a - v0}, {b - v0}] ns, outside vision [0, {v1 - v0}]"
