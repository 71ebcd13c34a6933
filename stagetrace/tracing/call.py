"""One generate() call: what it was given, its state while it runs, and the prefill/decode rule.

The hooks of every mode read and update the one :class:`CallState` of the call in
flight (through a :class:`CallSlot`, a single attribute read on the hot path).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..structure import AUDIO_ARGS, PIXEL_ARGS

__all__ = ["CallSlot", "CallState", "CallInputs", "InputNames", "next_forward_is_prefill", "unclosed_prefill",
           "forward_input_len", "read_call_inputs", "named_inputs", "new_token_count", "uncounted_output",
           "DecoderPromptCheck", "decoder_prompt_check", "ReturnedPromptCheck", "returned_prompt_check"]


@dataclass
class CallState:
    """State of the generate() call in flight. ``compiled_decode`` and ``stamping`` are
    decided once per call: at its start, or when generate() decides to compile its decode."""

    prompt_len: int
    fed: int                      # tokens the cache holds or has been fed so far
    forward_compiled: bool        # the user compiled the model's forward by hand
    stamping: bool                # layer marks inside compiled code are GPU-side stamps
    compiled_decode: bool = False  # generate() compiles the decode step: steps marked outside the graph
    forwards: int = 0
    in_prefill: bool = False
    decoding: bool = False
    outer_depth: int = 0  # top-level forwards in flight (a delegating generate() runs inner ones outside them)
    inner_output_prompt_len: int | None = None  # a delegating generate() returns its inner generate()'s output
    # an encoder–decoder's decoder sequence as generate() prepared its first and its last forward from
    # (references, ``decoder_ids.py``): the prompt it began with (a start token, Whisper's start, language
    # and task tokens), then the prompt and every new token but the last
    decoder_prompt: Any = None
    decoder_ids: Any = None
    # an encoder–decoder: generate()'s decoding loop prepared the next top-level forward's inputs
    # (prepare_inputs_for_generation ran since the last one); a forward it did not prepare is no
    # prefill or decode step (Whisper's language detection), and runs with ``in_aux`` set
    prepared: bool = False
    in_aux: bool = False
    # decoding loops an encoder–decoder's generate() ran: a model's own generate() may start over
    # (Whisper's temperature fallback, long-form segments), each loop with its own encoder run and prefill
    loops: int = 0
    loop_prefill: bool = False  # the last preparation was a prefill's (is_first_iteration)
    # layer detail: "off" | "prefill" | "all"; with "all", layers on every N-th decode step
    # (0, N, 2N, ...). ``layers_now``: the forward in flight carries layer marks (the one
    # flag the layer wrappers read on the hot path).
    layer_detail: str = "off"
    layer_every: int = 1
    layers_now: bool = False
    decode_forwards: int = 0
    # the lead's mark (a forward's return to generate()) on the prefill and on decode steps
    # 0, N, 2N, ... only; ``compiled_lead_every`` replaces it once the decode is compiled
    lead_every: int = 1
    compiled_lead_every: int = 1
    module_hooks_off: bool = False  # a compiled step took the module hooks off (back after the call)
    # a stamping compiled decode: whether the last step ran the stamped graph (the layers'
    # forwards are switched only when the next step needs the other one), and the decode
    # steps whose event has a calibration stamp (only those that ran the stamped graph)
    stamped_graph: bool = False
    calibrated_steps: list[int] = field(default_factory=list)
    # layer forwards whose stamp wrappers ran as Python, outside any compiled graph (dynamo ran the
    # step eagerly: its recompile limit, a graph break at the layer's boundary); 0 where all stamped
    # in a graph
    eager_stamped_layers: int = 0
    # generate()'s compiled decode, greedy or sampled (one sequence per row, no assistant): the
    # next step's mark is taken where the step before it had its stopping criteria issued,
    # before generate() waits for the GPU to read whether to go on (``compiled_decode.py``).
    # ``early_step_mark``: the position of that mark while its step has not begun (-1: none);
    # ``early_marks``: such marks since the last step began; ``stale_marks``: the positions of
    # those no step followed (the last stop check of a call; any but the one right before a
    # step), dropped before the stage math; ``steps_from_stop_check``: steps that began there.
    stop_check_marks: bool = False
    early_step_mark: int = -1
    early_marks: int = 0
    stale_marks: list[int] = field(default_factory=list)
    steps_from_stop_check: int = 0
    # the next compiled step runs without the input preparation's wrapper (the stop check before it
    # took it off: ``compiled_decode.py``), so the step is counted where its forward returns;
    # ``unmarked_steps``: steps that began with no mark of their start (none by construction; the
    # record then says its stages are unknown)
    prepare_off: bool = False
    unmarked_steps: int = 0

    def unused_marks(self) -> list[int]:
        """Positions of the call's marks that begin no step (taken at a stop check no step followed)."""
        return self.stale_marks + ([self.early_step_mark] if self.early_step_mark >= 0 else [])

    @property
    def compiled(self) -> bool:
        return self.forward_compiled or self.compiled_decode


class CallSlot:
    """Where the hooks find the call in flight (``None`` between calls: hooks do nothing)."""

    __slots__ = ("call",)

    def __init__(self) -> None:
        self.call: CallState | None = None


def next_forward_is_prefill(call: CallState, n_input: int | None) -> bool:
    """Counts one top-level forward of the call; True when it is a prefill forward.

    The rule (verified on transformers 5.x: batch 1/2 with left padding, beam search,
    static and sliding-window caches, M-RoPE, assisted decoding, prompt lookup, chunked
    prefill, ``use_cache=False``, a call continuing from a returned cache): a forward is
    prefill while the tokens fed so far (the cache length at ``generate()`` entry plus
    every prefill forward's input length) are fewer than the prompt, and the first
    forward of a call always is. Once a decode step ran, no later forward is prefill.
    Rules that fail: reading ``cache_position`` (no longer passed), "sequence length > 1"
    (assisted decoding verifies several tokens at once), positions (PaliGemma starts at 1).
    """
    first = call.forwards == 0
    call.forwards += 1
    if first or (not call.decoding and call.fed < call.prompt_len):
        call.fed += call.prompt_len if n_input is None else n_input
        call.in_prefill = True
        call.layers_now = call.layer_detail != "off"
        return True
    call.in_prefill = False
    call.decoding = True
    call.layers_now = call.layer_detail == "all" and call.decode_forwards % call.layer_every == 0
    call.decode_forwards += 1
    return False


def unclosed_prefill(call: CallState) -> str | None:
    """Why the call's prefill/decode split is unknown, or None: by the rule above every forward
    stays prefill until the prompt is fed, so a call of several forwards that never fed its
    whole prompt (MusicGen's decoder keeps only a longer prompt's last token) counted its decode
    steps as prefill. Said in the record, never folded in silently."""
    if call.decoding or call.forwards < 2 or call.fed >= call.prompt_len:
        return None
    return (f"generate()'s {call.forwards} forwards fed {call.fed} of the prompt's {call.prompt_len} tokens (the "
            "cache's included): the model never fed its whole prompt, so no forward could be told a decode step; "
            "every forward is counted in prefill_ms (decode steps included) and decode_step_ms is empty: the "
            "prefill/decode split of this call is unknown")


def forward_input_len(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Tokens one top-level forward is fed (None where it cannot tell)."""
    x = kwargs.get("input_ids")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
        return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
    if not isinstance(x, torch.Tensor):
        return None
    # (batch, tokens), or (batch, tokens, codebooks) where each token is several ids (Kyutai's
    # speech-to-text): the tokens are the second dimension, never the last
    return int(x.shape[1]) if x.dim() >= 2 else int(x.shape[-1])



@dataclass(frozen=True)
class CallInputs:
    """What generate() was given, read once at its entry (off the hot path)."""

    prompt_len: int       # the prompt the prefill/decode rule counts (the decoder's, for encoder–decoders)
    input_len: int        # the prompt generate() was given (the encoder's, for encoder–decoders)
    batch: int
    cache_len: int        # tokens already in a cache passed in
    output_prompt_len: int  # leading tokens of generate()'s output that are not new
    has_pixels: bool      # pixel inputs reached generate()
    audio_args: tuple[str, ...] = ()  # the audio inputs that reached generate() (mel features, waveforms)


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])  # legacy list of (key, value): (B, H, T, D)
    return 0


def _len(x: Any) -> int:
    return int(x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() >= 1 else 0


@dataclass(frozen=True)
class InputNames:
    """How a model's generate() names what it is given positionally: its first parameter (``inputs``
    for GenerationMixin's; Whisper's and Pop2Piano's own generate() take ``input_features``, BLIP-2's
    ``pixel_values``), and the main input ``inputs`` stands for, read as generate() reads it: the
    model's ``main_input_name`` (input_ids, input_features, pixel_values …), or an encoder–decoder's
    encoder's where the two differ (SpeechEncoderDecoderModel's ``inputs`` is its encoder's
    ``input_values``)."""

    first: str = "inputs"
    main: str = "input_ids"

    @classmethod
    def of(cls, model: Any) -> "InputNames":
        import inspect

        main = getattr(model, "main_input_name", None)
        encoder = getattr(model, "encoder", None)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and isinstance(
                getattr(encoder, "main_input_name", None), str):
            main = encoder.main_input_name
        try:
            params = [p for p in inspect.signature(model.generate).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        return cls(first=params[0].name if params else "inputs", main=main if isinstance(main, str) else "input_ids")


def named_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], names: InputNames = InputNames()) -> dict[str, Any]:
    """What generate() was given, each under the name the model reads it by: the first positional
    argument under generate()'s first parameter, ``inputs`` under the model's main input name — where
    that is ``inputs`` itself (SpeechEncoderDecoderModel's), token ids are ``input_ids`` and anything
    else (a waveform) stays ``inputs``: features are never read as a prompt."""
    given = dict(kwargs)
    if args:
        given.setdefault(names.first, args[0])
    x = given.pop("inputs", None)
    if x is not None:
        main = names.main
        if main == "inputs":
            main = "input_ids" if isinstance(x, torch.Tensor) and not x.is_floating_point() else "inputs"
        given.setdefault(main, x)
    return given


# where the batch is read, in order, where no prompt tells it
_BATCHED = ("inputs_embeds", *PIXEL_ARGS, *AUDIO_ARGS, "inputs")


def read_call_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], encoder_decoder: bool = False,
                     names: InputNames = InputNames()) -> CallInputs:
    """An encoder–decoder's prompt is its decoder's (``decoder_input_ids``, else the one start
    token generate() begins the decoder with); its output holds the decoder's tokens only. A call
    given no prompt (audio or pixels alone) has a prompt of 0 tokens and its batch from those."""
    given = named_inputs(args, kwargs, names)
    input_ids = given.get("input_ids")
    prompt = input_ids if input_ids is not None else given.get("inputs_embeds")
    is_2d = isinstance(prompt, torch.Tensor) and prompt.dim() >= 2
    prompt_len = input_len = int(prompt.shape[1]) if is_2d else 0
    if encoder_decoder:
        prompt_len = _len(given.get("decoder_input_ids")) or 1
        output_prompt_len = prompt_len
    else:  # inputs_embeds only: generate() returns the new tokens only
        output_prompt_len = prompt_len if input_ids is not None else 0
    batch = prompt if isinstance(prompt, torch.Tensor) else next(
        (given[k] for k in _BATCHED if isinstance(given.get(k), torch.Tensor) and given[k].dim() >= 1), None)
    return CallInputs(prompt_len=prompt_len, input_len=input_len,
                      batch=int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() >= 1 else 1,
                      cache_len=_cache_len(given.get("past_key_values", given.get("cache"))),
                      output_prompt_len=output_prompt_len,
                      has_pixels=any(isinstance(given.get(k), torch.Tensor) for k in PIXEL_ARGS),
                      audio_args=tuple(k for k in AUDIO_ARGS if isinstance(given.get(k), torch.Tensor)))


def uncounted_output(out: Any) -> str | None:
    """Why the new tokens cannot be read off what generate() returned (None: they can): it returned
    no tensor of sequences, or one that is not (batch, tokens) — MusicGen returns (batch, codebooks,
    frames) with its delay pattern undone, whose length is not the tokens it generated."""
    seq = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if not isinstance(seq, torch.Tensor):
        return f"generate() returned {type(out).__name__}, which holds no tensor of sequences"
    if seq.dim() != 2:
        return f"generate() returned sequences of shape {tuple(seq.shape)}, not (batch, tokens)"
    return None


@dataclass(frozen=True)
class DecoderPromptCheck:
    """Whether an encoder–decoder's output holds the decoder prompt it began with: GenerationMixin's
    generate() returns it, a model's own generate() may return the new tokens alone (Whisper's). Read
    off the running decoder sequence of the last forward (``last``: the prompt, then every new token
    but the last): the output begins with it (the prompt returned), or with its part after the prompt
    (new tokens alone). Where neither holds (beam search returns hypotheses no running beam holds any
    more) the prompt alone decides. Rows are matched as sets (beams and returned sequences repeat
    them). Copies made after the call's sync where the tensors live (no second sync), read on the host
    when the record is built."""

    returned: int          # tokens per returned sequence
    head: torch.Tensor     # each returned sequence's first len(last) tokens (fewer where it is shorter)
    last: torch.Tensor     # the decoder sequence the last forward was prepared from
    prompt_len: int        # the decoder prompt's length: the first len(prompt) tokens of ``last``

    def new_tokens(self) -> int:
        head, last, n = self.head.numpy(force=True), self.last.numpy(force=True), self.prompt_len

        def begins(rows: Any) -> bool:  # every returned row begins with one of ``rows``
            k = min(rows.shape[-1], head.shape[-1])
            return k > 0 and bool((head[:, None, :k] == rows[None, :, :k]).all(-1).any(-1).all())

        if begins(last):
            return self.returned - n
        if last.shape[-1] > n and begins(last[:, n:]):
            return self.returned
        return self.returned - (n if begins(last[:, :n]) else 0)


def decoder_prompt_check(out: Any, call: CallState) -> DecoderPromptCheck | None:
    """For an encoder–decoder's call, the check to run when its record is built; None where there is
    nothing to check (no 2-d decoder sequence seen, an output :func:`uncounted_output` refuses, or a
    delegating generate(), counted after its inner generate()'s prompt)."""
    prompt, last = call.decoder_prompt, call.decoder_ids
    if (not isinstance(prompt, torch.Tensor) or not isinstance(last, torch.Tensor) or prompt.dim() != 2
            or last.dim() != 2 or uncounted_output(out) is not None or call.inner_output_prompt_len is not None):
        return None
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    return DecoderPromptCheck(int(seq.shape[-1]), seq[:, :last.shape[-1]].detach().clone(), last.detach().clone(),
                              int(prompt.shape[-1]))


@dataclass(frozen=True)
class ReturnedPromptCheck:
    """A decoder-only call's: the prompt generate() was given, and as many leading tokens of what it
    returned. Its new tokens are counted as the output's length less the prompt's, which holds only
    where every returned row begins with a prompt row (rows matched as sets: beams and
    ``num_return_sequences`` repeat them). A model's own generate() may return something else (its
    new tokens alone, an edited prompt): then they cannot be counted from the output, and the record
    says so. Copies made after the call's sync where the tensors live (no second sync), compared on
    the host when the record is built."""

    head: torch.Tensor    # each returned sequence's first len(prompt) tokens (fewer where it is shorter)
    prompt: torch.Tensor  # the prompt's ids as generate() was given them

    def holds(self) -> bool:
        head, prompt = self.head.numpy(force=True), self.prompt.numpy(force=True)
        if head.shape[-1] < prompt.shape[-1]:
            return False
        return bool((head[:, None, :] == prompt[None, :, :]).all(-1).any(-1).all())

    def why_not(self) -> str:
        return (f"generate() returned sequences that do not all begin with the {self.prompt.shape[-1]}-token prompt "
                "it was given (the model's own generate() returned its new tokens alone, or an edited prompt)")


def returned_prompt_check(out: Any, input_ids: Any, inputs: CallInputs,
                          call: CallState) -> ReturnedPromptCheck | None:
    """For a decoder-only call counted as the output less its prompt, the check to run when its record
    is built; None where nothing is counted that way (no 2-d ``input_ids``, an output
    :func:`uncounted_output` refuses, a delegating generate() counted after its inner one's prompt)."""
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or inputs.output_prompt_len == 0
            or uncounted_output(out) is not None or call.inner_output_prompt_len is not None):
        return None
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    return ReturnedPromptCheck(seq[:, :input_ids.shape[-1]].detach().clone(), input_ids.detach().clone())


def new_token_count(out: Any, inputs: CallInputs, call: CallState | None = None) -> int | None:
    """Tokens generate() produced per sequence, from what it returned (for a delegating
    generate(), counted after the prompt its inner generate() was given); None where what it
    returned does not tell (:func:`uncounted_output` says why)."""
    if uncounted_output(out) is not None:
        return None
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    inner = call.inner_output_prompt_len if call is not None else None
    return int(seq.shape[-1]) - (inputs.output_prompt_len if inner is None else inner)
