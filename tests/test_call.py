"""Per-call state: the prefill/decode rule, what generate() was given, what it returned."""
from __future__ import annotations

import torch

from stagetrace.tracing.call import (CallState, DecoderPromptCheck, InputNames, decoder_prompt_check,
                                    forward_input_len, new_token_count, next_forward_is_prefill, read_call_inputs,
                                    returned_prompt_check, unclosed_prefill, uncounted_output)


def _state(prompt_len: int, cache_len: int = 0) -> CallState:
    return CallState(prompt_len=prompt_len, fed=cache_len, forward_compiled=False, stamping=False)


def test_the_first_forward_is_prefill_and_every_later_one_a_decode_step():
    call = _state(6)
    assert [next_forward_is_prefill(call, n) for n in (6, 1, 1, 1)] == [True, False, False, False]
    assert call.forwards == 4 and call.decoding and not call.in_prefill


def test_chunked_prefill_stays_prefill_until_the_prompt_is_fed():
    call = _state(10)
    assert [next_forward_is_prefill(call, n) for n in (4, 4, 2, 1)] == [True, True, True, False]


def test_assisted_decoding_feeds_several_tokens_per_step_and_is_still_decode():
    call = _state(6)
    assert [next_forward_is_prefill(call, n) for n in (6, 4, 3)] == [True, False, False]


def test_a_call_continuing_from_a_returned_cache_starts_with_a_prefill_of_its_new_tokens():
    call = _state(prompt_len=9, cache_len=6)  # 6 tokens already cached, 3 new ones
    assert [next_forward_is_prefill(call, n) for n in (3, 1)] == [True, False]


def test_once_decoding_no_forward_is_prefill_again_even_without_input_lengths():
    call = _state(6)
    assert [next_forward_is_prefill(call, n) for n in (None, None, None)] == [True, False, False]


def test_a_call_that_never_fed_its_prompt_says_its_split_is_unknown():
    """MusicGen's decoder keeps a longer prompt's last token only: four one-token forwards of a
    7-token prompt all stay prefill by the rule, and the call says so instead of a decode of 0."""
    call = _state(7)
    assert [next_forward_is_prefill(call, n) for n in (1, 1, 1, 1)] == [True, True, True, True]
    why = unclosed_prefill(call)
    assert why is not None and "fed 4 of the prompt's 7 tokens" in why and "split of this call is unknown" in why


def test_a_closed_prefill_or_a_single_forward_says_nothing():
    for lengths, prompt in (((6, 1, 1), 6), ((4, 4, 2), 10), ((3,), 9), ((4, 4), 10)):
        call = _state(prompt)
        for n in lengths:
            next_forward_is_prefill(call, n)
        expected_open = lengths == (4, 4)  # two chunks of a 10-token prompt, and nothing more
        assert (unclosed_prefill(call) is not None) == expected_open, (lengths, prompt)
    call = _state(prompt_len=9, cache_len=6)  # a continued call: the cache counts as fed
    next_forward_is_prefill(call, 3)
    next_forward_is_prefill(call, 1)
    assert unclosed_prefill(call) is None


def test_inputs_are_read_from_any_way_generate_is_given_them():
    ids = torch.ones(2, 5, dtype=torch.long)
    for args, kwargs in (((ids,), {}), ((), {"inputs": ids}), ((), {"input_ids": ids})):
        got = read_call_inputs(args, kwargs)
        assert (got.prompt_len, got.batch, got.cache_len, got.output_prompt_len, got.has_pixels) == (5, 2, 0, 5, False)
    embeds = read_call_inputs((), {"inputs_embeds": torch.zeros(3, 7, 4)})
    assert (embeds.prompt_len, embeds.batch, embeds.output_prompt_len) == (7, 3, 0)
    pixels = read_call_inputs((ids,), {"pixel_values": torch.zeros(2, 3, 8, 8)})
    assert pixels.has_pixels


def test_an_encoder_decoders_prompt_is_its_decoders():
    ids = torch.ones(1, 12, dtype=torch.long)
    start = read_call_inputs((ids,), {}, encoder_decoder=True)
    assert (start.prompt_len, start.output_prompt_len) == (1, 1)  # the decoder start token
    assert start.input_len == 12  # what the record reports as prompt_tokens: the encoder's input
    given = read_call_inputs((ids,), {"decoder_input_ids": torch.ones(1, 3, dtype=torch.long)}, encoder_decoder=True)
    assert (given.prompt_len, given.output_prompt_len) == (3, 3)
    assert new_token_count(torch.ones(1, 7), given) == 4
    only_pixels = read_call_inputs((), {"flattened_patches": torch.zeros(2, 16, 8)}, encoder_decoder=True)
    assert only_pixels.batch == 2 and only_pixels.has_pixels


def test_features_given_positionally_or_as_inputs_are_read_under_the_models_name_for_them():
    """generate(features) and generate(inputs=features): the tensor is what the model reads it as
    (Whisper's generate() takes input_features first; GenerationMixin's ``inputs`` is the main input,
    an encoder–decoder's encoder's where that differs), never a prompt of token ids: the mel bins
    (Whisper, 80) or the samples of a waveform (16000) were read as prompt tokens, and a call given
    audio alone by keyword counted batch 1."""
    feats, wave = torch.zeros(2, 80, 100), torch.zeros(2, 16000)
    for args, kwargs, names in (((feats,), {}, InputNames("input_features", "input_features")),
                                ((feats,), {}, InputNames("inputs", "input_features")),
                                ((), {"inputs": feats}, InputNames("inputs", "input_features")),
                                ((), {"input_features": feats}, InputNames())):
        got = read_call_inputs(args, kwargs, encoder_decoder=True, names=names)
        assert (got.input_len, got.prompt_len, got.batch, got.audio_args) == (0, 1, 2, ("input_features",))
    for names in (InputNames("inputs", "input_values"), InputNames("inputs", "inputs")):  # a waveform
        got = read_call_inputs((), {"inputs": wave}, encoder_decoder=True, names=names)
        assert (got.input_len, got.batch) == (0, 2)
    pixels = read_call_inputs((torch.zeros(3, 3, 8, 8),), {}, True, InputNames("inputs", "pixel_values"))
    assert pixels.has_pixels and (pixels.input_len, pixels.batch) == (0, 3)
    ids = torch.ones(2, 5, dtype=torch.long)  # token ids given as `inputs` to a model whose main input is `inputs`
    assert read_call_inputs((), {"inputs": ids}, True, InputNames("inputs", "inputs")).input_len == 5


def test_input_names_are_read_off_the_model_as_generate_reads_them():
    from stagetrace.testing.zoo_s2s import build

    assert InputNames.of(build("whisper").model) == InputNames("input_features", "input_features")
    assert InputNames.of(build("bart").model) == InputNames("inputs", "input_ids")
    assert InputNames.of(build("speech-encoder-decoder").model) == InputNames("inputs", "input_values")


def test_new_tokens_are_counted_after_the_prompt_or_alone_for_inputs_embeds():
    ids = read_call_inputs((torch.ones(1, 5, dtype=torch.long),), {})
    assert new_token_count(torch.ones(1, 9), ids) == 4
    embeds = read_call_inputs((), {"inputs_embeds": torch.zeros(1, 5, 4)})
    assert new_token_count(torch.ones(1, 4), embeds) == 4


def test_a_decoder_only_output_must_begin_with_its_prompt_to_be_counted_after_it():
    """The output less the prompt is the new tokens only where every returned row begins with a
    prompt row: rows are matched as sets (num_return_sequences repeats them, beams reorder them)."""
    prompt = torch.tensor([[5, 6, 7], [0, 8, 9]])  # the second left-padded
    inputs = read_call_inputs((), {"input_ids": prompt})
    call = _state(3)
    new = torch.tensor([[1, 2], [3, 4]])

    def check(out):
        return returned_prompt_check(out, prompt, inputs, call)

    assert check(torch.cat([prompt, new], 1)).holds()
    out = torch.cat([prompt, new], 1)
    held = check(out)  # copies: the caller's later writes to its output or its prompt do not reach them
    out.fill_(-1)
    assert held.holds() and held.head.data_ptr() != out.data_ptr() and held.prompt.data_ptr() != prompt.data_ptr()
    assert check(torch.cat([prompt, new], 1).int()).holds()  # another dtype: copied apart, compared alike
    repeated = torch.cat([prompt.repeat_interleave(2, 0), torch.ones(4, 2, dtype=torch.long)], 1)
    assert check(repeated).holds() and check(repeated.flip(0)).holds()
    alone = check(new)  # a model's own generate() returning its new tokens alone
    assert not alone.holds() and "do not all begin with the 3-token prompt" in alone.why_not()
    edited = torch.cat([torch.tensor([[5, 6, 0], [0, 8, 9]]), new], 1)
    assert not check(edited).holds()
    # nothing to check: no 2-d ids, inputs_embeds only (the output is the new tokens), a refused output
    assert returned_prompt_check(new, None, inputs, call) is None
    assert returned_prompt_check(new, prompt, read_call_inputs((), {"inputs_embeds": torch.zeros(2, 3, 4)}),
                                 call) is None
    assert returned_prompt_check(torch.ones(1, 4, 4), prompt, inputs, call) is None


def test_an_output_that_is_no_batch_of_token_sequences_is_not_counted():
    """MusicGen returns (batch, codebooks, frames) with its delay pattern undone: its length is not
    the tokens generated, so none is read off it (0 would be a plausible wrong count)."""
    ids = read_call_inputs((torch.ones(4, 1, dtype=torch.long),), {})
    assert new_token_count(torch.ones(1, 4, 4), ids) is None
    assert "shape (1, 4, 4), not (batch, tokens)" in uncounted_output(torch.ones(1, 4, 4))
    assert new_token_count(object(), ids) is None and "no tensor of sequences" in uncounted_output(object())
    assert uncounted_output(torch.ones(1, 9)) is None


def _decoder(prompt: list[list[int]], last: list[list[int]]) -> CallState:
    call = _state(1)
    call.decoder_prompt, call.decoder_ids = torch.tensor(prompt), torch.tensor(last)
    return call


def test_an_encoder_decoders_output_is_counted_after_its_decoder_prompt_where_it_holds_it():
    """GenerationMixin's generate() returns the decoder prompt it began with, then the new tokens;
    Whisper's own generate() returns the new tokens alone: 4 tokens returned were counted as 3, with
    a warning that generate() had dropped one. Told by the decoder sequence the last forward was
    prepared from, not by the prompt alone: a random Whisper's first new token was its start token."""
    whisper = _decoder([[50258, 50259, 50360, 50364]] * 2, [[50258, 50259, 50360, 50364, 7, 8, 9]] * 2)
    assert decoder_prompt_check(torch.tensor([[7, 8, 9, 10]] * 2), whisper).new_tokens() == 4
    assert decoder_prompt_check(torch.tensor([[7, 8, 9]] * 2), whisper).new_tokens() == 3  # a final EOS dropped
    standard = torch.tensor([[50258, 50259, 50360, 50364, 7, 8, 9, 10]] * 2)
    assert decoder_prompt_check(standard, whisper).new_tokens() == 4
    start_first = _decoder([[1]], [[1, 1, 257, 257]])  # the first new token is the start token itself
    assert decoder_prompt_check(torch.tensor([[1, 257, 257, 257]]), start_first).new_tokens() == 4
    assert decoder_prompt_check(torch.tensor([[1, 1, 257, 257, 257]]), start_first).new_tokens() == 4
    # beam search: a hypothesis that finished early is held by no running beam; the prompt decides
    beams = _decoder([[2], [2], [2]], [[2, 5, 6, 7], [2, 5, 8, 7], [2, 4, 6, 7]])
    assert decoder_prompt_check(torch.tensor([[2, 9, 1]]), beams).new_tokens() == 2
    assert isinstance(decoder_prompt_check(standard, whisper), DecoderPromptCheck)
    assert decoder_prompt_check(torch.ones(1, 4, 9), whisper) is None  # no (batch, tokens) output: refused elsewhere
    assert decoder_prompt_check(standard, _state(1)) is None  # no decoder sequence seen


def test_a_forward_is_fed_the_tokens_of_its_second_dimension():
    """input_ids of (batch, tokens, codebooks) (Kyutai's speech-to-text) feed their tokens, not
    their codebooks: a 5-token prompt over 8 codebooks is 5 tokens, and the rule then counts a
    second prompt forward as prefill until the 5 are fed."""
    assert forward_input_len((), {"input_ids": torch.zeros(1, 5, 8, dtype=torch.long)}) == 5
    assert forward_input_len((torch.zeros(2, 7, dtype=torch.long),), {}) == 7
    assert forward_input_len((), {"inputs_embeds": torch.zeros(1, 3, 16)}) == 3
    assert forward_input_len((), {"input_ids": torch.zeros(4, dtype=torch.long)}) == 4
    call = CallState(prompt_len=5, fed=0, forward_compiled=False, stamping=False)
    fed = [forward_input_len((), {"input_ids": torch.zeros(1, n, 8, dtype=torch.long)}) for n in (3, 2, 1, 1)]
    assert [next_forward_is_prefill(call, n) for n in fed] == [True, True, False, False]
