"""Per-family facts the zoo cannot derive: input style, config overrides, honest refusals."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .zoo_inputs import count_features


@dataclass
class Spec:
    style: str = "pixels"  # a key of zoo_inputs.STYLES
    over: dict[str, Any] = field(default_factory=dict)  # dotted config paths set after shrinking
    fix: Callable[[dict[str, Any]], None] | None = None  # edits the shrunk config dict (constraints)
    unbuildable: str | None = None
    broken: Callable[[], str | None] | None = None  # a probe of the installed source for a known bug
    shape: str | None = None  # when not "decoder-only" / "encoder-decoder" from the config
    image: tuple[int, int] | None = (32, 8)  # vision image_size, patch_size (pixel styles)
    image_hw: tuple[int, int] | None = None
    with_image_sizes: bool = False
    patch_layout: str = "flat"  # grid style: "flat" C*tp*p*p rows, or "chw" (C, p, p) patches
    mrope: bool = False  # the text model uses M-RoPE sections (set them even where the config has none)
    tile_mask: bool = False  # crops style: pixel_attention_mask per tile (B, crops), not per pixel
    vision_config: str | None = None  # the sub-config holding the image size, when not vision_config
    image_token: str | int | None = None  # config attribute (or id) of the image placeholder
    text: bool = True  # a text prompt (input_ids) goes in
    token_ids: bool = True  # pass pad / eos ids to generate() (BLIP's generate sets its own)
    prompt_offset: int = 0  # generate() returns the prompt this much longer (or shorter) than given
    image_tokens: Callable[[Any, Any], int] | None = None  # image tokens per row, when not counted
    finish: Callable[[Any, dict[str, Any]], None] | None = None  # last edits of the inputs
    generate: dict[str, Any] = field(default_factory=dict)  # generate() kwargs the family needs


def _llama4_bug() -> str | None:
    import inspect

    from transformers import Llama4ForConditionalGeneration

    if "outputs.image_outputs" in inspect.getsource(Llama4ForConditionalGeneration.forward):
        return ("transformers bug: Llama4ForConditionalGeneration.forward reads `outputs.image_outputs` from its "
                "language model's MoeCausalLMOutputWithPast (AttributeError), so no forward or generate() can run")
    return None


def _queries(frames: int = 1) -> Callable[[Any, Any], int]:
    """BLIP-2 style: the Q-Former's learned queries are the image tokens, per frame."""
    return lambda model, vision: model.config.num_query_tokens * frames


def _none(model: Any, vision: Any) -> int:
    """No image placeholders in the text: the image enters by cross-attention or is prepended."""
    return 0


def _cross_mask(model: Any, inputs: dict[str, Any]) -> None:
    """Mllama: every text token attends to every tile of the one image."""
    ids, tiles = inputs["input_ids"], inputs["aspect_ratio_mask"].shape[-1]
    inputs["cross_attention_mask"] = torch.ones(*ids.shape, 1, tiles, dtype=torch.long)


def _image_attention(model: Any, inputs: dict[str, Any]) -> None:
    """IDEFICS: every text token attends to the one image."""
    inputs["image_attention_mask"] = torch.ones(*inputs["input_ids"].shape, 1, dtype=torch.long)


def _kosmos_positions(model: Any, inputs: dict[str, Any]) -> None:
    inputs["image_embeds_position_mask"] = (inputs["input_ids"] == KOSMOS_IMAGE).long()


def _patch_mask(model: Any, inputs: dict[str, Any]) -> None:
    inputs["attention_mask"] = torch.ones(inputs["flattened_patches"].shape[:2], dtype=torch.long)


def _boxes(model: Any, inputs: dict[str, Any]) -> None:
    """UDOP: a layout box (x0, y0, x1, y1 in [0, 1]) for every text token."""
    ids = inputs["input_ids"]
    inputs["bbox"] = torch.tensor([0.1, 0.1, 0.3, 0.2]).expand(*ids.shape, 4).clone()


CODES, CODE_BASE = 64, 384  # VQ codebook entries, and the text-vocabulary ids they map to (384..447)


def _chameleon_vocab(d: dict[str, Any]) -> None:
    """A VQ codebook of 64 codes mapped onto ids 384..447 (names "IMGIMG<code in letters A-J>Z")."""
    def name(i: int) -> str:
        return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(i)) + "Z"

    d["vq_config"]["num_embeddings"] = CODES
    d["vocabulary_map"] = {"<image>": CODE_BASE - 1, **{name(i): CODE_BASE + i for i in range(CODES)}}
    d["image_token_id"] = CODE_BASE - 1


def _emu3_vocab(d: dict[str, Any]) -> None:
    """Emu3: codes "<|visual token 000042|>" onto ids 384..447, an end-of-line token after each row."""
    d["vq_config"].update(codebook_size=CODES, channel_multiplier=[1, 1, 1, 1])  # attention width = base
    d["image_token_id"] = CODE_BASE - 1
    d["vocabulary_map"] = {"<image>": CODE_BASE - 1, "<|extra_200|>": CODE_BASE - 2,
                           **{f"<|visual token {i:06d}|>": CODE_BASE + i for i in range(CODES)}}


KOSMOS_IMAGE = 4  # kosmos-2 has no image token: any id marks the latent-query positions


GRID = Spec(style="grid", image=None, mrope=True)
TEXT = Spec(style="text", image=None)  # a text-only causal LM: a prompt and nothing else


def text(**kw: Any) -> Spec:
    """A text-only LM's spec with what its family needs besides."""
    return Spec(style="text", image=None, **kw)


SPECS: dict[str, Spec] = {
    "evolla": Spec(unbuildable="not a vision-language model: EvollaForProteinText2Text generates text conditioned "
                               "on protein sequences (a SaProt protein encoder), it takes no image"),
    "pi0": Spec(unbuildable="not a text generator: PI0ForConditionalGeneration is a vision-language-action policy "
                            "that samples robot actions by flow matching (sample_actions), it has no token generate()"),
    "diffusion_gemma": Spec(unbuildable="not an autoregressive generator: DiffusionGemmaForBlockDiffusion denoises "
                                        "whole blocks of tokens by block diffusion, there is no prefill / one-token "
                                        "decode-step structure to trace"),
    "mistral4": Spec(unbuildable="no vision path: Mistral4ForCausalLM (mapped here) is the text-only MoE language "
                                 "model, with no vision tower and no image input"),
}
for _t in ("qwen2_vl qwen2_5_vl qwen3_vl qwen3_vl_moe qwen3_5 qwen3_5_moe qwen2_5_omni_thinker qwen3_omni_moe_thinker "
           "glm4v glm4v_moe glm46v glmga glm_ocr glm5_next cosmos3_edge cosmos3_omni cohere_compass exaone4_5 "
           "ernie4_5_vl_moe hunyuan_vl hy_v4_vl hyperclovax_vision_v2 kimi_k25 lfm3_vl muse_glimmer muse_spark "
           "paddleocr_vl video_llama_3 minimax_m3_vl inkling2 inkling2_loop dots3_note qwen4_exp").split():
    SPECS[_t] = GRID
SPECS.update({
    "muse_glimmer": Spec(style="grid", image=None, mrope=True, over={"out_hidden_size": 128}),
    "muse_spark": Spec(style="grid", image=None, mrope=True, over={"out_hidden_size": 128}),
    "step3p7": Spec(over={"text_config.sliding_window": 16}),
    "minicpm_ocr": Spec(style="navit"), "minicpmv4_6": Spec(style="navit"), "minicpmv4_7": Spec(style="navit"),
    "lfm2_vl": Spec(style="siglip2", image=(32, 8)),
    "nemotron_h_omni": Spec(style="grid_hw", image=None),
    "inkling2": Spec(style="merged_blocks", image=None), "inkling2_loop": Spec(style="merged_blocks", image=None),
    "video_llama_3": Spec(style="grid_merge_sizes", image=None, mrope=True),
    "gemma3": Spec(over={"mm_tokens_per_image": 4}), "shieldgemma2": Spec(over={"mm_tokens_per_image": 4}),
    "lighton_ocr": Spec(with_image_sizes=True), "mistral3": Spec(with_image_sizes=True),
    "mistral_large4": Spec(with_image_sizes=True),
    "vipllava": Spec(over={"vision_feature_layers": [-2, -1]}),
    # The thinker's rope index reads vision start/end ids its own config class leaves out (the full
    # Omni checkpoints carry them).
    "qwen2_5_omni_thinker": Spec(style="grid", image=None, mrope=True,
                                 over={"vision_start_token_id": 460, "vision_end_token_id": 461}),
    "qwen3_omni_moe_thinker": Spec(style="grid", image=None, mrope=True,
                                   over={"vision_start_token_id": 460, "vision_end_token_id": 461}),
    "hy_v4_vl": Spec(style="grid", image=None, mrope=True, over={"text_config.qk_rope_head_dim": 8}),
    "qwen4_exp": Spec(style="grid", image=None, mrope=True, over={"text_config.indexer_n_heads": 2,
        "text_config.indexer_kv_heads": 1, "text_config.indexer_head_dim": 8, "text_config.indexer_budget": 8,
        "text_config.indexer_compress_ratio": 2}),
    "llama4": Spec(over={"vision_config.intermediate_size": 128}, broken=_llama4_bug),
    "gemma4": Spec(style="patches_xy", image=None, over={"vision_config.patch_size": 4}),
    "gemma4_unified": Spec(style="merged_patches_xy", image=None, over={"vision_config.patch_size": 4}),
    "blip-2": Spec(shape="delegating", image_tokens=_queries()),
    "instructblip": Spec(style="pixels_qformer", shape="delegating", image_tokens=_queries()),
    "instructblipvideo": Spec(style="frames_qformer", shape="delegating", image_tokens=_queries(4)),
    # BLIP drops the prompt's last token (the processor's [SEP]) and sets the first to BOS.
    "blip": Spec(shape="delegating", image_tokens=_none, prompt_offset=-1, token_ids=False),
    "git": Spec(image_tokens=_none),
    "idefics": Spec(style="images_5d", image_tokens=_none, finish=_image_attention),
    "kosmos-2": Spec(shape="delegating", image_token=KOSMOS_IMAGE, finish=_kosmos_positions,
                     over={"latent_query_num": 4}, image_tokens=lambda m, v: m.config.latent_query_num),
    "mllama": Spec(style="tiles_cross", image_tokens=lambda m, v: 1, finish=_cross_mask,
                   over={"vision_config.max_num_tiles": 4, "vision_config.intermediate_layers_indices": [0, 1],
                         "vision_config.vision_output_dim": 96, "text_config.cross_attention_layers": [1]}),
    "fuyu": Spec(style="flat_patches", over={"patch_size": 8}),
    "florence2": Spec(image=None, image_hw=(64, 64), over={
        "vision_config.embed_dim": [8, 16, 32, 64], "vision_config.num_heads": [1, 2, 4, 8],
        "vision_config.num_groups": [1, 2, 4, 8], "vision_config.projection_dim": 32}),
    "t5gemma2": Spec(vision_config="encoder.vision_config", over={"encoder.mm_tokens_per_image": 4}),
    "kosmos-2.5": Spec(style="flattened_patches", image=None, image_token=KOSMOS_IMAGE, finish=_kosmos_positions,
                       over={"latent_query_num": 4}, image_tokens=lambda m, v: m.config.latent_query_num),
    # Pix2Struct has no text input: the prompt is rendered into the image; the mask covers patches.
    "pix2struct": Spec(style="flattened_patches", image=None, text=False, finish=_patch_mask),
    "udop": Spec(vision_config="", image_tokens=_none, finish=_boxes, over={"decoder_start_token_id": 0}),
    "vision-encoder-decoder": Spec(vision_config="encoder", text=False, over={"decoder_start_token_id": 1}),
    "pp_formulanet": Spec(text=False, over={
        "vision_config.output_channels": 32, "vision_config.post_conv_in_channels": 32,
        "vision_config.post_conv_mid_channels": 32, "vision_config.post_conv_out_channels": 32,
        "vision_config.decoder_hidden_size": 32}),
    # Its MLP encoder needs a layer per scale of the patch (else it plans scales with scipy).
    "inkling_mm_model": Spec(style="patch_cubes", image=None, over={"vision_config.patch_size": 4,
                                                                    "vision_config.n_layers": 4}),
    "chameleon": Spec(fix=_chameleon_vocab, vision_config="vq_config"),
    "emu3": Spec(fix=_emu3_vocab, vision_config="vq_config", with_image_sizes=True),
    "aria": Spec(over={"projector_patch_to_query_dict": {16: 4}}),
    "deepseek_vl_hybrid": Spec(style="two_resolutions", over={
        "high_res_vision_config.image_size": 64, "high_res_vision_config.patch_size": 8,
        "high_res_vision_config.global_attn_indexes": [1], "high_res_vision_config.output_channels": 32}),
    "molmo2": Spec(style="pooled_crops", image=None, image_token="image_patch_id", over={
        "vision_config.image_size": [28, 28], "vision_config.patch_size": 14,
        "vision_config.num_position_embeddings": 4,
        "adapter_config.vision_feature_layer": [-1]}),
    # SAM (patch 2, 8x8 grid) then a Qwen2 encoder over learned queries (144 for small images).
    "deepseek_ocr2": Spec(image=None, image_hw=(16, 16), over={
        "text_config.mlp_layer_types": ["dense", "sparse"], "text_config.num_experts_per_tok": 2,
        "vision_config.sam_config": {"hidden_size": 32, "output_channels": 16, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "image_size": 16, "patch_size": 2, "window_size": 4,
                                     "global_attn_indexes": [1], "downsample_channels": [32, 64]},
        "vision_config.encoder_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "num_key_value_heads": 4,
                                         "max_position_embeddings": 512}}),
    "unlimited_ocr": Spec(image=None, image_hw=(32, 32), over={
        "vision_config.sam_config.output_channels": 16, "vision_config.sam_config.downsample_channels": [32, 32],
        "vision_config.sam_config.image_size": 32, "vision_config.sam_config.patch_size": 4,
        "vision_config.sam_config.window_size": 4, "vision_config.sam_config.global_attn_indexes": [1]}),
    # A VQ tokenizer whose codes are offset into the vocabulary: image codes 320..383, then audio codes.
    "apertus1p5": Spec(with_image_sizes=True, over={
        "image_token_offset": CODE_BASE - CODES, "vision_config.codebook_size": CODES,
        "vision_config.num_res_blocks": 1, "audio_token_offset": CODE_BASE, "audio_config.codebook_size": CODES,
        "audio_config.codebook_dim": 32}),
    "kimi_k25": Spec(style="grid", image=None, patch_layout="chw"),
    "paddleocr_vl": Spec(style="grid", image=None, mrope=True, patch_layout="chw"),
    "cohere_compass": Spec(style="grid", image=None, over={"text_config.rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}}),
    "ernie4_5_vl_moe": Spec(style="grid", image=None, over={"text_config.rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}),
})
for _t in "llava_next llava_next_video llava_onevision".split():
    SPECS[_t] = Spec(style="tiles", over={"image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]]})
for _t in "idefics2 idefics3 smolvlm".split():
    SPECS[_t] = Spec(style="crops")
# Its window Q-Former wants a vision width of 64 (heads = width // 64) and windows tiling the patch grid.
SPECS["granite4_vision"] = Spec(style="tiles", image=(8, 2), over={
    "image_grid_pinpoints": [[8, 8], [8, 16], [16, 8], [16, 16]], "downsample_rate": "1/2",
    "deepstack_layer_map": [[1, 0]], "vision_config.hidden_size": 64, "qformer_config.intermediate_size": 64},
    image_tokens=lambda m, v: count_features(m, v, len(v.inputs["image_sizes"]),
                                             lambda out: out.deepstack_features[0][1]))
SPECS["granite_docling"] = Spec(style="crops", tile_mask=True)


# ---------------------------------------------------------------------------------------------
# Text-only causal LMs (zoo.lm_types): a prompt and nothing else. Only what the generic shrink
# cannot give a family is here: configs whose defaults do not run, constraints between sizes.


def _kv_sharing(d: dict[str, Any]) -> None:
    """Gemma 3n: the last ``num_kv_shared_layers`` layers reuse the keys and values of the last earlier layer
    of their type. The shrunk layers are doubled and the second half shares, so each type has a producer."""
    n = d["num_hidden_layers"]
    for key, value in list(d.items()):
        if isinstance(value, list) and len(value) == n:
            d[key] = value * 2  # layer_types, activation_sparsity_pattern, intermediate_size (per layer)
    d["num_hidden_layers"], d["num_kv_shared_layers"] = 2 * n, n


def _codebooks(model: Any, inputs: dict[str, Any]) -> None:
    """MusicGen's decoder generates from its start token, one row per codebook: (batch x codebooks, 1). A longer
    prompt is not fed whole (its prepare_inputs_for_generation keeps the last token once a cache exists, which
    transformers 5 passes from the first forward on). Its delay pattern pads with the start token, which its
    checkpoints' generation config sets to the pad id."""
    start = model.config.pad_token_id
    model.generation_config.decoder_start_token_id = start
    model.generation_config.num_return_sequences = 1  # its generate() expands by it; transformers 5 leaves it None
    rows = inputs["input_ids"].shape[0] * model.config.num_codebooks
    inputs["input_ids"] = torch.full((rows, 1), start, dtype=torch.long)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])


def _gemma_drafter(name: str) -> str:
    return (f"not a standalone generator: {name} is the multi-token-prediction drafter of Gemma 4's assisted "
            "decoding; its forward requires the target model's hidden states (inputs_embeds) and shared KV states, "
            "so generate() cannot run it alone")


SPECS.update({
    # Their configs leave the MoE's routed experts or top-k unset (None): the gate cannot route.
    "deepseek_v2": text(over={"num_experts_per_tok": 2}),
    "dots1": text(over={"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1}),
    # No default layer types (checkpoints carry them): one short-convolution and one attention layer.
    "lfm2_moe": text(over={"layer_types": ["conv", "full_attention"]}),
    # The indexer's sizes default to None (QSA off), which its attention divides by.
    "qwen4_exp_text": text(over={"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8,
                                 "indexer_budget": 8, "indexer_compress_ratio": 2}),
    # Per-layer-type rope (its attention reads rope_parameters["full_attention"]).
    "cohere_compass_text": text(over={"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    # Its attention reads attn_config.rope_theta, which DBRX checkpoints carry and the config class lacks,
    # and clamps q/k/v to clip_qkv, which defaults to None (torch.clamp then has no bound).
    "dbrx": text(over={"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0}),
    # Attention types are given as (pattern, repeats): one global and one local layer for the 2 layers.
    "gpt_neo": text(over={"attention_types": [[["global", "local"], 1]]}),
    # Hybrids of 2 layers must keep an attention layer: generate() reads the cache length from one.
    "jamba": text(over={"attn_layer_period": 2, "attn_layer_offset": 1}),
    "recurrent_gemma": text(over={"block_types": ["recurrent", "attention"]}),
    "bamba": text(over={"attn_layer_indices": [1]}),
    "granitemoehybrid": text(over={"layer_types": ["linear_attention", "full_attention"]}),
    # Zamba's hybrid layers share one attention block, tied from the first hybrid layer to the others: two of them.
    "zamba": text(over={"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]}),
    # Its 4 heads of 8 must span hidden_size x expand (32 x 1), in groups that divide the heads.
    "mamba2": text(over={"expand": 1, "n_groups": 1}),
    # Its cache rounds the q/k and v widths (width x 0.5, width x 1) up to multiples of 64 and its layers do
    # not: they agree only for a width that is a multiple of 128.
    "xlstm": text(over={"hidden_size": 128}),
    # Axial position embeddings: their widths must add up to hidden_size; one local and one LSH layer.
    "reformer": text(over={"axial_pos_embds_dim": [16, 16], "attn_layers": ["local", "lsh"]}),
    # Its language adapters need a language: the config names "en_XX" but leaves the default unset.
    "xmod": text(over={"default_language": "en_XX"}),
    "gemma3n_text": text(fix=_kv_sharing),
    # transformers bug: with a cache its forward builds DynamicCache(config=) from the top-level BltConfig, which
    # has no num_hidden_layers (AttributeError); generate() runs without one (every forward re-reads the prompt).
    "blt": text(generate={"use_cache": False}),
    # An input, a recurrent (run n_recurrent_loops times) and an output stack, one layer each. Given without
    # "mlp" entries: its config halves every count of the checkpoints' (attention, mlp)-pair layout.
    "dory": text(over={"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
                       "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "musicgen": text(finish=_codebooks), "musicgen_melody": text(finish=_codebooks),
    "gemma4_assistant": Spec(unbuildable=_gemma_drafter("Gemma4AssistantForCausalLM")),
    "gemma4_unified_assistant": Spec(unbuildable=_gemma_drafter("Gemma4UnifiedAssistantForCausalLM")),
})
