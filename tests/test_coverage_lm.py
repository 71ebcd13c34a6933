"""The coverage matrix of text-only causal LMs: every model type of the installed transformers'
causal-LM mapping that is not in its image-text-to-text one (``zoo.lm_types()``), tiny and random,
traced with layer detail.

Per type: the same tokens traced and untraced; the stages partition the call exactly; no vision
stage; ``output_tokens`` the tokens really generated, as many as asked (greedy, ``min_new_tokens``
so EOS cannot stop it early); one decode step per token after the first; no warning in the record;
layer spans in the prefill and in every decode step; nothing left on the model (the autouse
fixture). A type that cannot be built offline is skipped with its reason. A type whose record
cannot hold a number honestly (``REFUSED``) is checked to say so instead.

Each test records what the table in README's "Model coverage" shows (``record_property``):
``python -m stagetrace.testing.matrix`` runs this file and writes that table from the results.
"""
from __future__ import annotations

import contextlib
import re

import pytest
import torch

import stagetrace
from stagetrace.testing.zoo import lm_types

from helpers import DEVICES, assert_partition, tokens, zoo_case_on, zoo_untraced_tokens

TYPES = lm_types()

# Types whose generate() returns no (batch, tokens) sequences: the tracer cannot count their new
# tokens from the output, so output_tokens is None and the record says why (the stages stand).
REFUSED = {
    "musicgen": r"returned sequences of shape \(1, 4, \d+\), not \(batch, tokens\)",
    "musicgen_melody": r"returned sequences of shape \(1, 4, \d+\), not \(batch, tokens\)",
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layers_in_every_forward(rec, n_layers: int) -> None:
    """Layer spans in the prefill (at least one per layer: a recurrent stack runs its layers again)
    and in every decode step."""
    prefill_layers = [s for s in rec.spans.of_kind("layer") if s.depth == 2]
    assert len(prefill_layers) >= n_layers > 0, f"{len(prefill_layers)} layer spans in the prefill, {n_layers} layers"
    assert rec.layer_steps == list(range(len(rec.decode_step_ms))), f"layer spans in steps {rec.layer_steps}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", TYPES)
def test_every_text_only_lm_is_traced_truthfully(model_type, device, record_property):
    case = zoo_case_on(model_type, device)
    plain = zoo_untraced_tokens(case)
    refused = REFUSED.get(model_type)
    with pytest.warns(RuntimeWarning, match=refused) if refused else contextlib.nullcontext():
        with stagetrace.trace(case.model, layer_detail="all") as tracer:
            out = case.generate()
    layout = tracer.layout.describe()
    layers = tracer.layout.layers[0][0].rsplit(".", 1)[0] if tracer.layout.layers else None
    record_property("layout", f"{layout['layout']}: `{layout['language_model']}` → `{tracer.layout.lm_head[0]}`, "
                              f"layers `{layers}` ({layout['layers']})")
    assert torch.equal(plain, tokens(out)), "tracing changed the generated tokens"
    (rec,) = tracer.records
    assert_partition(rec)
    assert rec.vision_ms is None and not rec.spans.of_kind("vision"), f"a vision stage in a text-only call: {layout}"
    assert len(rec.decode_step_ms) == case.new_tokens - 1  # one decode forward per token after the first
    _layers_in_every_forward(rec, len(tracer.layout.layers))
    if refused:
        assert rec.output_tokens is None
        assert len(rec.warnings) == 1 and re.search(refused, rec.warnings[0]), rec.warnings
        record_property("refused", rec.warnings[0])
        return
    assert rec.warnings == [], rec.warnings
    assert rec.output_tokens == case.generated(out) == case.new_tokens
    assert len(rec.decode_step_ms) == rec.output_tokens - 1


def test_the_refused_types_are_text_only_lm_types():
    assert set(REFUSED) <= set(TYPES)


def test_the_table_is_written_from_outcomes_and_replaces_only_its_own_lines(tmp_path):
    """``python -m stagetrace.testing.matrix``: each outcome in its own words, counted in the summary,
    put between the README's markers and nowhere else."""
    from stagetrace.testing.matrix import BEGIN, END, Row, _after_type, markdown, replace_in

    rows = [Row("a", "passes", "causal-lm: `model` → `lm_head`, 2 layers"),
            Row("b", "refused", "probe", "shape (1, 4, 4)"),
            Row("c", "unbuildable", reason=_after_type("c: cannot be built here (needs x (y))", "c")),
            Row("d", "fails", "probe", "assert 3 == 4")]
    table = markdown(rows)
    assert "2 types pass, 1 of them with output_tokens refused honestly, 1 cannot be built here, 1 fail" in table
    assert "| a | causal-lm: `model` → `lm_head`, 2 layers | passes |" in table
    assert "| b | probe | passes, output_tokens refused: shape (1, 4, 4) |" in table
    assert "| c | — | cannot be built here (needs x (y)) |" in table
    assert "| d | probe | fails: assert 3 == 4 |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\nafter\n")
    replace_in(readme, table)
    assert readme.read_text() == f"intro\n{table.rstrip()}\nafter\n"


def test_a_prompt_the_model_never_feeds_whole_leaves_the_split_unknown_and_says_so():
    """MusicGen's decoder feeds only a longer prompt's last token (its prepare_inputs_for_generation
    keeps it once a cache exists, which transformers 5 passes from the first forward on): no
    forward ever feeds the prompt, so none can be told a decode step. The record says the split
    is unknown rather than show a decode of 0 ms."""
    case = zoo_case_on("musicgen", "cpu")
    ids = case.inputs["input_ids"]
    prompt = torch.cat([torch.full((ids.shape[0], 6), 5, dtype=ids.dtype), ids], dim=1)
    kw = dict(case.inputs, input_ids=prompt, attention_mask=torch.ones_like(prompt))
    with pytest.warns(RuntimeWarning, match="split of this call is unknown"):
        with stagetrace.trace(case.model) as tracer:
            case.model.generate(**kw, **case.generate_kwargs)
    (rec,) = tracer.records
    assert_partition(rec)
    assert rec.decode_step_ms == [] and rec.prefill_ms > 0
    assert any("fed 4 of the prompt's 7 tokens" in w for w in rec.warnings), rec.warnings
