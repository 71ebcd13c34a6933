"""The zoo: a tiny model of every model type in the installed transformers' image-text-to-text
mapping, built (or refused with its reason), generating deterministically, reaching its vision path."""
from __future__ import annotations

import pytest
import torch

from stagetrace.testing.survey import ENTRIES, survey
from stagetrace.testing.zoo import SHAPES, Unbuildable, build, lm_types, make_config, model_types, spec_of

from helpers import other_transformers_release, zoo_case

TYPES = model_types()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(model_type: str, **kw):
    case = zoo_case(model_type, **kw)
    if other_transformers_release():
        try:
            case.generate()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"{model_type}: the zoo's tiny model does not run on this transformers ({type(e).__name__})")
    return case


def _tokens(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.sequences


@pytest.mark.parametrize("model_type", TYPES)
def test_generates_deterministically_through_its_vision_path(model_type):
    case = _build(model_type)
    assert case.shape in SHAPES
    assert not case.model.training and next(case.model.parameters()).dtype == torch.float32
    first = _tokens(case.generate())
    assert case.generated(first) == case.new_tokens
    assert torch.equal(_tokens(case.generate()), first)  # greedy, same inputs: the same tokens

    s = survey(case)
    assert s["generated_tokens"] == case.new_tokens
    assert s["vision_entry"] is not None and s["vision_modules"], f"no vision module ran: {s}"
    assert s["decoder_layers"], "no decoder layer list ran in the last step"
    # The shape is what the structure says.
    assert s["is_encoder_decoder"] == (case.shape == "encoder-decoder")
    if case.shape == "delegating":
        assert s["top_forward_calls"] == 0 and s["generate_delegates_to"]
    else:
        assert s["top_forward_calls"] == case.new_tokens and s["steps"] == case.new_tokens
    if case.shape == "vision-as-tokens":
        assert "get_image_tokens" in s["entries_defined"]["top"] + s["entries_defined"]["model"]
    # The vision entry's modules really ran during generate(), before or inside the first step.
    assert s["vision_runs"] in ("before the first step", "inside the first step")
    if s["vision_entry"].split(".")[-1] in ENTRIES:
        assert s["vision_entry"] in s["entries_called"]


@pytest.mark.parametrize("model_type", TYPES)
def test_batch_of_two_and_seeded(model_type):
    case = _build(model_type, batch=2)
    out = _tokens(case.generate())
    assert out.shape[0] == 2 and case.generated(out) == case.new_tokens
    again = build(model_type, batch=2)  # the same seed gives the same weights and inputs
    assert all(torch.equal(a, b) for a, b in zip(case.model.state_dict().values(), again.model.state_dict().values()))
    assert all(torch.equal(v, again.inputs[k]) for k, v in case.inputs.items() if isinstance(v, torch.Tensor))


def test_unknown_type_is_refused_with_the_version():
    import transformers

    with pytest.raises(Unbuildable, match=f"not in transformers {transformers.__version__}"):
        build("no_such_model_type")


def test_survey_leaves_no_hook_behind():
    case = build("llava")
    before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in case.model.named_modules()}
    survey(case)
    after = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in case.model.named_modules()}
    assert before.keys() == after.keys()
    assert all(before[n][0].keys() == after[n][0].keys() and before[n][1].keys() == after[n][1].keys()
               for n in before)
    assert "generate" not in case.model.__dict__ and "get_image_features" not in case.model.model.__dict__


def test_text_only_lm_types_are_the_causal_lm_mapping_less_the_vision_language_one():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    assert set(lm_types()) == set(causal) - set(model_types()) and len(lm_types()) == len(set(lm_types()))
    assert all(spec_of(t).style == "text" for t in lm_types() if not spec_of(t).unbuildable)


@pytest.mark.parametrize("model_type, derived", [
    # mamba_d_head ("auto") is mamba_expand * hidden_size // mamba_n_heads, both shrunk
    ("bamba", lambda c: c.mamba_d_head * c.mamba_n_heads == c.mamba_expand * c.hidden_size),
    # num_hidden_layers is num_layers_per_stack (None: the value given) times the cycles
    ("hrm_text", lambda c: c.num_hidden_layers == c.num_layers_per_stack * c.H_cycles * (c.L_cycles + 1)),
    # head_dim is no field of the class: set from qk_rope_head_dim
    ("deepseek_v3", lambda c: c.head_dim == c.qk_rope_head_dim),
    ("rwkv", lambda c: c.attention_hidden_size == c.hidden_size),
])
def test_what_a_config_derives_is_derived_again_from_the_shrunk_sizes(model_type, derived):
    config = make_config(model_type, spec_of(model_type))
    assert derived(config), config
