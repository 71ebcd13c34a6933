"""Finding the stages of a model: known layouts, the override, and the failure message."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import stagetrace
from stagetrace.testing import tiny
from stagetrace.layouts import LayoutError

from helpers import assert_partition, gen_kwargs, zoo_case

FAMILIES = list(tiny.FAMILIES)

# ---------------------------------------------------------------- layouts: override and failure
class OddVLM(nn.Module):
    """A VLM whose layout no table row knows."""

    def __init__(self):
        super().__init__()
        self.pixel_encoder = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16))
        self.embed = nn.Embedding(64, 16)
        self.brain = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.readout = nn.Linear(16, 64)

    def forward(self, input_ids, pixels=None):
        x = self.embed(input_ids)
        if pixels is not None:
            x = x + self.pixel_encoder(pixels).mean(dim=1, keepdim=True)
        for layer in self.brain:
            x = torch.tanh(layer(x))
        return self.readout(x)

    @torch.no_grad()
    def generate(self, input_ids, pixels=None, max_new_tokens=4):
        seq = input_ids
        for i in range(max_new_tokens):
            logits = self(seq, pixels if i == 0 else None)
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
        return seq


def test_an_unknown_layout_names_what_it_found_and_the_override_to_use():
    with pytest.raises(LayoutError) as err:
        stagetrace.trace(OddVLM())
    msg = str(err.value)
    assert "OddVLM" in msg and "pixel_encoder" in msg
    assert "stagetrace.trace(model, vision=['pixel_encoder']" in msg
    assert "top-level modules: ['pixel_encoder', 'embed', 'brain', 'readout']" in msg


def test_the_override_path_traces_an_unknown_layout():
    torch.manual_seed(0)
    model = OddVLM().eval()
    ids, pixels = torch.randint(0, 64, (1, 5)), torch.randn(1, 3, 12)
    with stagetrace.trace(model, vision="pixel_encoder", language_model="brain", lm_head="readout",
                          layer_detail="all") as tracer:
        model.generate(ids, pixels, max_new_tokens=4)
    rec = tracer.records[0]
    assert_partition(rec)
    assert rec.vision_ms > 0 and len(rec.decode_step_ms) == 3
    assert rec.layout == "probe+override"
    assert len([s for s in rec.spans if s.name.startswith("layer")]) == 3 * 4


def test_override_can_cut_a_known_layout_differently():
    case = tiny.build("llava")
    with stagetrace.trace(case.model, vision=["model.vision_tower"]) as tracer:
        case.model.generate(**gen_kwargs(case, 2))
    rec = tracer.records[0]
    assert_partition(rec)
    assert tracer.layout.describe()["vision"] == ["model.vision_tower"] and rec.layout == "llava-style+override"


def test_a_multimodal_model_is_never_taken_for_text_only():
    case = tiny.build("llava")
    with pytest.raises(LayoutError, match="does not name a submodule"):
        stagetrace.trace(case.model, vision=["model.no_such_tower"])




def test_modules_named_like_vision_are_no_vision_stage_where_no_image_can_arrive():
    """BLT, a byte-level text LM: its byte "patcher" and "patch" projections are named like vision
    parts, but neither its config nor its forward takes an image. They were timed as a vision stage
    (vision_ms for a text-only call, and prefill cut after them); now it is the text-only layout."""
    case = zoo_case("blt")
    with stagetrace.trace(case.model, layer_detail="all") as tracer:
        case.generate()
    (rec,) = tracer.records
    assert tracer.layout.describe()["vision"] == [] and tracer.layout.name == "causal-lm"
    assert rec.vision_ms is None and rec.warnings == []
    assert_partition(rec)


def test_a_forward_that_takes_pixels_keeps_its_modules_named_like_vision():
    """OddVLM has no config: its forward's `pixels` argument is what says an image can arrive."""
    from stagetrace.structure import takes_images

    assert takes_images(OddVLM()) is True
    assert takes_images(nn.Linear(2, 2)) is False  # forward(input): nothing named like an image


def test_decoder_layers_are_the_decoders_not_an_audio_towers():
    """MOSS transcribe-diarize: its base model holds an audio tower's layer list beside the language
    model's, and "audio_tower.layers" sorts first. The audio layers were taken for decoder layers (no
    layer span in a text-only call; with audio, the tower's layers as "layer 0, 1"); the decoder
    transformers' accessor names holds the right list."""
    case = zoo_case("moss_transcribe_diarize")
    with stagetrace.trace(case.model, layer_detail="all") as tracer:
        case.generate()
    (rec,) = tracer.records
    assert [p for p, _ in tracer.layout.layers] == ["model.language_model.layers.0", "model.language_model.layers.1"]
    assert rec.warnings == []
    assert len(rec.spans.of_kind("layer")) == 2 * case.new_tokens  # both layers, in the prefill and every step
    assert_partition(rec)


def test_a_list_of_heads_ends_the_prefill_at_its_last_head():
    """MusicGen: one lm head per codebook in a ModuleList, which has no forward of its own. Its
    wrapped forward never ran, so prefill silently ran on to the first decode step (the prefill's
    sampling counted as prefill); the last head's end is the end of prefill."""
    from stagetrace.labels import Kind, kind_of

    case = zoo_case("musicgen")
    with stagetrace.trace(case.model) as tracer:
        case.generate()
    (rec,) = tracer.records
    heads = len(case.model.lm_heads)
    assert tracer.layout.lm_head[0] == f"lm_heads.{heads - 1}"
    kinds = [Kind(int(k)) for k in kind_of(rec.marks.labels)]
    assert Kind.LM_HEAD_END in kinds[:kinds.index(Kind.DECODE_FORWARD)]


def test_a_layout_error_suggests_only_real_module_paths():
    """pix2struct-like: the config names a vision part, no module is named like one."""
    model = OddVLM()
    model.encoder_x = model._modules.pop("pixel_encoder")  # nothing named like vision any more
    model.config = type("Cfg", (), {"vision_config": object(), "is_encoder_decoder": False})()
    with pytest.raises(LayoutError) as err:
        stagetrace.trace(model)
    msg = str(err.value)
    assert "<" not in msg.split("pass the paths yourself")[1], msg  # no placeholder offered as a path
    assert "config.vision_config is set" in msg


def test_a_layout_error_on_a_model_without_vision_asks_only_for_what_is_missing():
    """A text (or audio) model has no vision stage, which structure found: the message must not ask
    for vision paths (it did, for Dia: "adding vision and lm_head")."""

    class OddTextLM(OddVLM):
        def forward(self, input_ids):
            return super().forward(input_ids)

    model = OddTextLM()
    del model.pixel_encoder
    with pytest.raises(LayoutError) as err:
        stagetrace.trace(model)
    msg = str(err.value)
    assert "stagetrace.trace(model, ...), adding language_model and lm_head (dotted module paths" in msg, msg
    assert "vision" not in msg.split("pass the paths yourself")[1], msg


def test_images_that_reach_generate_without_a_vision_stage_are_said_out_loud():
    case = tiny.build("llava")
    with pytest.warns(RuntimeWarning, match="no vision stage was marked"):
        with stagetrace.trace(case.model, vision=[]) as tracer:  # told, wrongly, that it has no vision
            case.model.generate(**gen_kwargs(case, 3))
    (rec,) = tracer.records
    assert rec.vision_ms is None and any("no vision stage" in w for w in rec.warnings)
    assert_partition(rec)  # the numbers stand; the record says what they miss


def test_layer_detail_without_a_layer_list_is_said_out_loud():
    case = tiny.build("llava")
    with pytest.warns(RuntimeWarning, match="no decoder layer ran"):
        with stagetrace.trace(case.model, layer_detail="all", layers="lm_head") as tracer:  # not a layer list
            case.model.generate(**gen_kwargs(case, 3))
    assert any("no decoder layer ran" in w for w in tracer.records[0].warnings)


# ---------------------------------------------------------------- audio LMs: the decoder's layers
@pytest.mark.parametrize("model_type, layers", [
    ("qwen2_audio", "model.language_model.layers"),  # beside model.audio_tower.layers, first by name
    ("qwen3_omni_moe", "thinker.model.language_model.layers"),
])
def test_the_audio_towers_layers_are_not_the_decoders(model_type, layers):
    """The causal-lm row takes a whole base model as the language model, audio tower included: the
    decoder layer list is found outside any audio part, as it is outside any vision part."""
    from stagetrace.testing.zoo_audio import build

    layout = stagetrace.trace(build(model_type).model).layout
    assert {p.rsplit(".", 1)[0] for p, _ in layout.layers} == {layers}


def test_an_embedding_returned_as_output_embeddings_is_not_the_head():
    """FSMT's get_output_embeddings() returns the decoder's embedding (its projection is declared
    tied to it): the head is the Linear sharing its weight, else the one of its shape transposed;
    an encoder returned for any modality (Seamless M4T's text encoder) is no vision part."""
    from stagetrace.structure import probe_accessors

    class Decoder(nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed_tokens = nn.Embedding(11, 4)
            self.output_projection = nn.Linear(4, 11, bias=False)
            self.other = nn.Linear(4, 4)
            if tied:
                self.output_projection.weight = self.embed_tokens.weight

    class Seq2Seq(nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.encoder, self.decoder = nn.Linear(4, 4), Decoder(tied)

        def get_output_embeddings(self):
            return self.decoder.embed_tokens

        def get_decoder(self):
            return self.decoder

        def get_encoder(self, modality=None):  # ignores the modality, as Seamless M4T's does
            return self.encoder

    for tied in (True, False):
        found = probe_accessors(Seq2Seq(tied))
        assert found == {"vision": None, "language_model": "decoder", "lm_head": "decoder.output_projection"}, tied
