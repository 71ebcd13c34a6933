"""One call's record, built in one place: marks → stage math → spans placed → record.

What a call leaves (``FinishedCall``: its resolved marks and what it was given, copied where
the caller could change it) is fixed before the traced call hands back; the record is built
from it later, once per call (``build_ms``): when the records are read, usually back to back
on warm caches. The walks over the marks run natively (numpy where the extension is missing)
and the spans stay columns (``SpanTable``).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..labels import Kind, kind_of
from ..lead import call_leads
from ..low_level import Marks
from ..records import StageRecord
from ..spans import KIND_CODE, SpanTable
from ..stages import StageOrderError, stages_from_marks
from .call import CallInputs, CallState, DecoderPromptCheck, ReturnedPromptCheck
from .devices import SpanPlacement
from .features import HeldFeatures
from .stamps import StampsRead

__all__ = ["FinishedCall", "build_record", "versions", "audio_runs", "audio_note", "aux_forward_note"]

_AUDIO_BEGIN, _AUDIO_END = int(Kind.AUDIO_BEGIN), int(Kind.AUDIO_END)
_AUX_BEGIN, _AUX_END = int(Kind.AUX_FORWARD_BEGIN), int(Kind.AUX_FORWARD_END)
_RUN_KINDS = (_AUDIO_BEGIN, _AUDIO_END, _AUX_BEGIN, _AUX_END)  # marked runs that are no stage: said in words


@dataclass(frozen=True)
class FinishedCall:
    """What one traced call leaves for its record, captured before it hands back. Whatever can
    change from one call to the next (the caller's tensors, the timeline's streams, the
    sample id) is read into it then; the build reads only the tracer's settings besides."""

    marks: Marks
    call: CallState          # the call's own state object (no later call writes it)
    inputs: CallInputs
    output_tokens: int | None  # None: what generate() returned does not tell (``uncounted`` says why)
    call_index: int
    sample_id: str | None
    unix_start: float
    unix_time: float
    features: HeldFeatures   # copies of the inputs it counts, on their device
    device_streams: list[int]  # the stream marked on each GPU of a split model ([] on one)
    resolve_ms: float        # host time the call spent after generate() returned (all of the above read)
    # the GPU-side layer stamps it took (read from their ring inside the call), placed among its
    # marks when the record is built; None: none were taken
    stamps: StampsRead | None = None
    uncounted: str | None = None  # why its new tokens cannot be read off what generate() returned
    # an encoder–decoder's: whether its output begins with the decoder prompt, read when the record is
    # built (its new tokens then replace ``output_tokens``)
    prompt_check: DecoderPromptCheck | None = None
    # a decoder-only call's: whether what it returned begins with its prompt (else its new tokens
    # cannot be counted from it, and ``uncounted_reason`` says why)
    returned_check: ReturnedPromptCheck | None = None

    @functools.cached_property
    def placed(self) -> tuple[Marks, str | None, int]:
        """The call's marks with its stamps placed among them; why its marks cannot be timed
        (stamps that did not line up, a step begun with no mark), or None; layer marks placed after
        their layer's last matmul."""
        if self.call.unmarked_steps:
            return (self.marks, f"{self.call.unmarked_steps} compiled decode step(s) began with no mark of their start "
                    "(something was marked between the stop check before the step and its forward): the steps "
                    "cannot be told apart", 0)
        return (self.marks, None, 0) if self.stamps is None else self.stamps.place(self.marks)

    @functools.cached_property
    def _returned_prompt(self) -> bool:
        return self.returned_check is None or self.returned_check.holds()

    def new_tokens(self) -> int | None:
        if not self._returned_prompt:
            return None
        return self.prompt_check.new_tokens() if self.prompt_check is not None else self.output_tokens

    def uncounted_reason(self) -> str | None:
        if self.uncounted is None and not self._returned_prompt:
            assert self.returned_check is not None
            return self.returned_check.why_not()
        return self.uncounted


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"stagetrace": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def layer_steps(spans: SpanTable) -> list[int]:
    """The decode steps that carry layer spans: each layer row follows its step's row."""
    step_rows = (spans.kind == KIND_CODE["step"]).nonzero()[0]
    layer_rows = ((spans.kind == KIND_CODE["layer"]) & (spans.depth == 3)).nonzero()[0]
    owner = step_rows.searchsorted(layer_rows, "right") - 1
    return sorted({int(spans.index[step_rows[k]]) for k in owner[owner >= 0]})


def audio_runs(labels: np.ndarray, t: np.ndarray, begin: int = _AUDIO_BEGIN,
               end: int = _AUDIO_END) -> list[tuple[int, int]]:
    """(start, end) on clock ``t`` of each outermost run of the audio encoder (an entry that calls
    another, e.g. the top model's ``get_audio_features`` calling its base model's, is one run); with
    ``begin``/``end`` the runs of another pair of kinds (forwards outside generate()'s loop)."""
    kinds = kind_of(labels)
    runs: list[tuple[int, int]] = []
    depth, start = 0, 0
    for p in np.flatnonzero((kinds == begin) | (kinds == end)).tolist():
        if kinds[p] == begin:
            if depth == 0:
                start = int(t[p])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                runs.append((start, int(t[p])))
    return runs


def _counted_in(runs: list[tuple[int, int]], spans: SpanTable) -> str:
    """Where runs (on the spans' clock) are counted, stage by stage, measured."""
    counted = {"vision": 0, "prefill": 0, "decode": 0}
    total = sum(b - a for a, b in runs)
    for kind, key in (("vision", "vision"), ("prefill", "prefill"), ("step", "decode")):
        for i in np.flatnonzero(spans.kind == KIND_CODE[kind]).tolist():
            s0, s1 = int(spans.start_ns[i]), int(spans.end_ns[i])
            counted[key] += sum(max(0, min(b, s1) - max(a, s0)) for a, b in runs)
    counted["other"] = total - sum(counted.values())
    return ", ".join(f"{k}_ms ({v / 1e6:.3f} ms)" for k, v in counted.items() if v > 0) or "no stage (0 ms)"


def audio_note(runs: list[tuple[int, int]], spans: SpanTable, parts: Sequence[str]) -> str:
    """Where the audio encoder's runs (on the spans' clock) are counted, stage by stage, measured:
    stagetrace has no audio stage, so the record says it in words."""
    total = sum(b - a for a, b in runs)
    return (f"a non-vision encoder (audio: {', '.join(parts) or '?'}) ran {len(runs)} time(s) for "
            f"{total / 1e6:.3f} ms; stagetrace has no audio stage, so that time is counted in "
            f"{_counted_in(runs, spans)}")


def aux_forward_note(runs: list[tuple[int, int]], spans: SpanTable) -> str:
    """Top-level forwards generate()'s decoding loop did not prepare (Whisper's language detection):
    none is a prefill or decode step, and the record says, measured, where their time is counted."""
    total = sum(b - a for a, b in runs)
    return (f"{len(runs)} forward(s) of the model ran outside generate()'s decoding loop (its inputs not "
            f"prepared by prepare_inputs_for_generation: e.g. Whisper's language detection) for "
            f"{total / 1e6:.3f} ms; none is a prefill or decode step, so that time is counted in "
            f"{_counted_in(runs, spans)}")


def eager_stamped_note(layer_runs: int, n_layers: int) -> str | None:
    """What to say of a call whose stamp wrappers ran as Python ``layer_runs`` times (None: never):
    the steps that carry layers ran eagerly, not as the compiled graph they were to replay."""
    if layer_runs <= 0:
        return None
    forwards = f" (about {layer_runs / n_layers:g} forwards of {n_layers} layers)" if n_layers else ""
    return (f"{layer_runs} layer forwards that carry stamps ran outside a compiled graph{forwards}: dynamo ran "
            "those steps eagerly — its recompile limit (torch._dynamo.config.recompile_limit, counted per "
            "forward function, which transformers' models share, and layer stamps add one graph per model) "
            "was reached, or a graph break falls at a layer's boundary — so those steps' times and their "
            "layers' are of an eager step, which an untraced call may not run")


def build_record(marks: Marks, meta: dict[str, Any], placement: SpanPlacement | None, error: str | None,
                 keep_marks: bool, expect: dict[str, str] | None = None, uncounted: str | None = None,
                 audio_parts: Sequence[str] = (), loops: int = 0, unclosed: str | None = None,
                 eager_stamped: str | None = None) -> StageRecord:
    """The record of one call: its stages, or why the call was not timed (``error``, or marks
    that were dropped or out of order), with a RuntimeWarning then. ``expect`` maps a span kind
    the call must have to what to say when it has none: said in the record's ``warnings`` and
    as a RuntimeWarning, never silently; so is ``uncounted``, why ``output_tokens`` is None. Its
    ``"audio"`` entry is what to say when audio reached the call and no audio run was marked;
    where runs of the audio encoder (``audio_parts``) were marked, the record says in which
    stages their time is counted. ``loops``: decoding loops the call ran (an encoder–decoder's; 0
    where not counted): each loop after the first is said, its prefill being in decode. ``unclosed``:
    why the prefill never ended (``call.unclosed_prefill``), said likewise; so is ``eager_stamped``
    (``eager_stamped_note``)."""
    if error is None and marks.dropped:
        error = (f"{marks.dropped} marks were dropped (the event pool could not grow); "
                 "this call's stages are unknown")
    rec: StageRecord | None = None
    if error is None:
        try:
            # the host clock's spans: when the host *issued* each boundary's mark
            rec = StageRecord.from_stages(stages_from_marks(marks.labels, marks.device_ns,
                                                            marks.host_ns - marks.host_ns[0]), **meta)
        except StageOrderError as exc:
            error = str(exc)
    if rec is None:
        rec = StageRecord.failed(error or "", **meta)
        warnings.warn(f"stagetrace: call {rec.call_index} was not timed: {rec.error}", RuntimeWarning, stacklevel=4)
    else:
        leads = call_leads(marks.labels, marks.device_ns, marks.host_ns, rec.spans, marks.backend,
                           marks.issued_by_host)
        rec.lead, rec.decode_step_lead_us = leads["stages"], leads["step_lead_us"]
        rec.decode_step_gpu_bound_ms, rec.decode_step_verdict = leads["step_gpu_bound_ms"], leads["step_verdict"]
        rec.layer_steps = layer_steps(rec.spans)
        if placement is not None:
            rec.spans = placement.place(rec.spans)
        expect = dict(expect or {})
        unmarked_audio = expect.pop("audio", None)
        rec.warnings = [why for kind, why in expect.items() if not rec.spans.has_kind(kind)]
        runs: list[tuple[int, int]] = []
        aux: list[tuple[int, int]] = []
        if np.isin(kind_of(marks.labels), _RUN_KINDS).any():  # most calls have neither: no clock to shift
            t = np.asarray(marks.device_ns, dtype=np.int64)
            on_spans = t - t[0] + int(rec.spans.start_ns[0])  # the call's span (the first row) starts at its first mark
            runs = audio_runs(marks.labels, on_spans)
            aux = audio_runs(marks.labels, on_spans, _AUX_BEGIN, _AUX_END)
        if runs:  # a compiled decode's steps run with the hooks off: a run inside one is not marked
            rec.warnings.append(audio_note(runs, rec.spans, audio_parts) + (
                "; the decode steps were compiled, and runs inside them are not marked, so decode_ms may hold "
                "more of it" if rec.compiled_decode else ""))
        elif unmarked_audio:
            rec.warnings.append(unmarked_audio)
        if aux:
            rec.warnings.append(aux_forward_note(aux, rec.spans))
        if unclosed is not None:
            rec.warnings.append(unclosed)
        if eager_stamped is not None:
            rec.warnings.append(eager_stamped)
        steps = len(rec.decode_step_ms)
        if uncounted is not None:
            rec.warnings.append(f"{uncounted}: the tokens it generated cannot be counted from it, so output_tokens "
                                f"is None ({steps} decode steps ran)")
        elif loops > 1:
            rec.warnings.append(f"generate() ran its decoding loop {loops} times (a model's own generate() starting "
                                "over: Whisper's temperature fallback, long-form segments): each later loop's prefill "
                                "forward, and the encoder run before it, are counted in decode, so decode_step_ms has "
                                f"{steps} steps for the {rec.output_tokens} new tokens returned")
        elif steps and rec.output_tokens <= steps:  # each token after the first is one decode step at most
            rec.warnings.append(f"{steps} decode steps ran for {rec.output_tokens} new tokens: generate() ran forwards "
                                "whose tokens it did not return (e.g. a stopping check deferred by a step); their "
                                "time is in decode, and decode_step_ms has more steps than tokens")
        for why in rec.warnings:
            warnings.warn(f"stagetrace: call {rec.call_index}: {why}", RuntimeWarning, stacklevel=4)
    if keep_marks:
        rec.marks = marks
    return rec
