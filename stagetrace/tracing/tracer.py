"""The tracer: the lifecycle of tracing one model, and the generate() wrapper that times a call.

It coordinates; each way of placing marks is its own module that owns its install and
its exact undo (``eager``, ``compiled_decode``, ``stamps``), per-call state and the
prefill/decode rule live in ``call``, devices and timelines in ``devices``, the record
is built in ``record``.

What must stay true:

* the hot path (a hook firing) only checks the call slot and calls ``timeline.mark``: no
  sync, no allocation beyond what Python does for the call itself;
* the one sync per call is ``Marks.from_timeline`` after ``generate()`` returns;
  ``resolve_ms`` covers everything the call does after it returned (the sync, reading the
  stamps' ring, the copies of the inputs its features count); ``build_ms`` covers the record,
  built later from what the call left (``FinishedCall``): when ``records`` is first read,
  at ``stop()``, or before the call hands back when records stream to ``jsonl=``. What a
  record says is fixed when its call ends: a later build reads nothing the caller or the
  next call can change;
* an exception inside ``generate()`` leaves no partial record, and the tracer stays
  usable; leaving the ``with`` block (or ``stop()``) removes every hook and wrapper it
  added and restores every attribute it shadowed (``model.generate`` included);
* a second traced call on the same model from another thread while one is in flight is
  refused (its marks would mix with the first call's), a re-entrant one runs untraced;
* tracing never changes what ``generate()`` computes or returns.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from ..labels import Kind, label
from ..layouts import ResolvedLayout, resolve_layout
from ..low_level import Marks, Timeline
from ..records import JsonlWriter, StageRecord, write_jsonl
from .call import (CallInputs, CallSlot, CallState, InputNames, decoder_prompt_check, named_inputs, new_token_count,
                   read_call_inputs, returned_prompt_check, unclosed_prefill, uncounted_output)
from .compiled import compiled_decode_refusal, hand_compiled_forwards, hand_compiled_refusal
from .compiled_decode import CompiledDecodeMarks
from .decoder_ids import DecoderIds
from .devices import SpanPlacement, bind_call_streams, layer_mark_callables, model_devices, new_model_timeline
from .eager import EagerHooks
from .features import queue_features
from .forward_return import ForwardReturnMarks
from .errors import TracingError
from .patch import Shadows
from .record import FinishedCall, build_record, eager_stamped_note, versions
from .stamps import LayerStamps

__all__ = ["Tracer", "trace", "attach", "TracingError", "LAYER_DETAIL", "LAYER_MARKS"]

LAYER_DETAIL = ("off", "prefill", "all")
# "pair": a mark before and after every layer, so what runs between layers is outside them.
# "shared": one mark per boundary between consecutive layers (and the last layer's end):
# half the marks, and anything run between two layers counts to the earlier one.
# "matmul": "shared" in eager forwards; inside compiled code each boundary's stamp moves to
# right after the previous layer's last matmul, so the compiler still fuses across layers
# (stamp_placement.py; records count those marks). Inside compiled code every choice places
# one stamp per boundary: a layer's end and the next one's begin are one point of the graph.
LAYER_MARKS = ("pair", "shared", "matmul")

# Calls left unbuilt at most: the one that reaches it builds them all before it hands back.
UNBUILT_AT_MOST = 64

# lead_every=None: the lead's mark on every step of an eager decode, and on every 8th step of
# a compiled one, where a step is ~3 ms of mostly host work and the mark costs ~12 µs of it
# (benchmarks/README.md, "Compiled decode at stage level"); an eager step is 10-20 ms.
COMPILED_LEAD_EVERY = 8

_CALL_BEGIN, _CALL_END = label(Kind.CALL_BEGIN), label(Kind.CALL_END)
_PREFILL, _DECODE = label(Kind.PREFILL_FORWARD), label(Kind.DECODE_FORWARD)

# Models being traced right now, to refuse a second tracer on the same model.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Tracer]" = weakref.WeakKeyDictionary()


def _layer_detail(value: str | bool) -> str:
    value = {True: "all", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if value not in LAYER_DETAIL:
        raise ValueError(f"layer_detail must be one of {LAYER_DETAIL}, got {value!r}")
    return value


class Tracer:
    """Traces every ``generate()`` call of one model while active.

    Use as a context manager (``with stagetrace.trace(model) as tracer:``), with
    ``start()``/``stop()``, or as a decorator on a function that calls generate().
    One :class:`StageRecord` per call lands in ``tracer.records`` (built when first read, from
    what the call left when it ended; see :attr:`records`).
    """

    def __init__(self, model: nn.Module, *, vision: str | Sequence[str] | None = None,
                 language_model: str | None = None, lm_head: str | None = None, layers: str | None = None,
                 layer_detail: str | bool = "off", layer_marks: str = "pair", layer_every: int = 1,
                 lead_every: int | None = None, jsonl: str | Path | None = None,
                 sample_id: str | None = None, capacity: int = 4096, keep_marks: bool = True,
                 timeline: Timeline | None = None):
        if not callable(getattr(model, "generate", None)):
            raise TracingError(f"{type(model).__name__} has no generate() method to trace")
        if layer_marks not in LAYER_MARKS:
            raise ValueError(f"layer_marks must be one of {LAYER_MARKS}, got {layer_marks!r}")
        self.model = model
        self.layer_detail: str = _layer_detail(layer_detail)
        self.layer_marks = layer_marks
        if isinstance(layer_every, bool) or not isinstance(layer_every, int) or layer_every < 1:
            raise ValueError(f"layer_every must be an integer >= 1, got {layer_every!r}")
        self.layer_every = layer_every
        if lead_every is not None and (isinstance(lead_every, bool) or not isinstance(lead_every, int)
                                       or lead_every < 1):
            raise ValueError(f"lead_every must be None or an integer >= 1, got {lead_every!r}")
        self.lead_every = lead_every
        self.sample_id = sample_id
        self._records: list[StageRecord] = []
        self._unbuilt: collections.deque[FinishedCall] = collections.deque()  # calls whose record is not built yet
        self._build_lock = threading.Lock()
        self._next_call_index = 0  # calls recorded since the start or the last clear()
        self.keep_marks = keep_marks
        self.rank = int(os.environ.get("RANK", "0") or 0)  # torchrun sets it; one trace process per rank
        # Resolved now, so a bad layout fails at trace(), before any generate() runs.
        self.layout: ResolvedLayout = resolve_layout(model, vision=vision, language_model=language_model,
                                                     lm_head=lm_head, layers=layers)
        self._capacity = capacity
        self._jsonl_path = Path(jsonl) if jsonl is not None else None
        self._writer: JsonlWriter | None = None
        self._timeline: Timeline | None = timeline  # a caller-given one (e.g. a reference clock) replaces ours
        self._slot = CallSlot()
        self._owner: int | None = None  # the thread whose call is in flight
        self._owner_lock = threading.Lock()
        self._shadows = Shadows()
        self._parts: list[Any] = []  # the installed mark placers, each with its own remove()
        self._active = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        return self._active

    @property
    def backend(self) -> str:
        return self._timeline.backend if self._timeline is not None else "none"

    def start(self) -> "Tracer":
        if self._active:
            raise TracingError("this tracer is already active")
        if _ACTIVE.get(self.model) is not None:
            raise TracingError(f"{type(self.model).__name__} is already being traced by another stagetrace "
                               "tracer: stop it before starting a new one (nested tracing is not supported)")
        self._devices = model_devices(self.model)
        self._encoder_decoder = bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))
        self._input_names = InputNames.of(self.model)  # read before generate() is shadowed: its own signature
        self._placement = SpanPlacement.of(self.layout, self._devices)
        if self._timeline is None:
            self._timeline = new_model_timeline(self._devices, self._capacity)
        if self._jsonl_path is not None and self._writer is None:
            self._writer = JsonlWriter(self._jsonl_path)
        try:
            self._install()
        except BaseException:
            self._uninstall()  # undoes exactly what was installed before the failure
            self._close_writer()
            raise
        _ACTIVE[self.model] = self
        self._active = True
        return self

    def stop(self) -> None:
        if not self._active:
            return
        self._uninstall()
        _ACTIVE.pop(self.model, None)
        self._active = False
        try:
            self._build_unbuilt()  # every call's record exists once tracing stops (and its warnings are said)
        finally:
            self._close_writer()

    def __enter__(self) -> "Tracer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: run ``fn`` with this tracer active."""
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def sample(self, sample_id: str) -> Iterator["Tracer"]:
        """Tag the records of calls made inside the block with ``sample_id``."""
        previous, self.sample_id = self.sample_id, sample_id
        try:
            yield self
        finally:
            self.sample_id = previous

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ installing
    def _install(self) -> None:
        """Decides the mode (refusing what cannot be timed), then places every part."""
        model, tl = self.model, self._timeline
        assert tl is not None
        compiled = hand_compiled_forwards(model, self.layout)
        why = hand_compiled_refusal(self.layout, self._devices, self.layer_detail, self.layer_every) if compiled else None
        if why:
            raise TracingError(f"{' and '.join(compiled)} is compiled with torch.compile and {why}; "
                               "trace the eager model")
        self._forward_compiled = bool(compiled)
        self._stamps = LayerStamps(self.layout, self._devices[0], self.layer_marks)
        stamps_in_forward = self._stamps_in_forward = self._forward_compiled and self.layer_detail == "all"
        mark = tl.mark
        if stamps_in_forward:
            self._stamps.ensure_ring()  # it exists before the forward mark that stamps into it
            calibrate = self._stamps.calibrate

            def forward_mark(lab: int) -> None:  # the event, then its calibration stamp
                mark(lab)
                calibrate(lab)
        else:
            forward_mark = mark  # the native mark itself: nothing added on the hot path
        self._hooks = EagerHooks(model, self.layout, self._slot, mark, forward_mark, self.layer_detail,
                                 self.layer_marks, inside_compiled_forward=self._forward_compiled,
                                 layer_mark_at=layer_mark_callables(tl, self._placement, len(self.layout.layers)),
                                 layer_every=self.layer_every)
        decode = CompiledDecodeMarks(
            model, self._slot, mark, stamps_layers=self.layer_detail == "all",
            refusal=lambda gen_config: compiled_decode_refusal(self._devices, self.layer_detail, gen_config),
            before_step=self._before_compiled_step, calibrate=self._stamps.calibrate, marks_so_far=tl.__len__,
            switches_graphs=self.layer_detail == "all" and self.layer_every > 1)
        self._decode = decode
        returns = ForwardReturnMarks(model, self.layout, self._slot, mark, decode.step_returned)
        decoder_ids = DecoderIds(model, self._slot)  # wraps generate()'s input preparation after `decode` does
        self._parts = [self._hooks, self._stamps, decode, returns, decoder_ids]
        if self.layer_marks == "matmul":  # compiled graphs made while tracing get the pass that moves stamps
            from .stamp_placement import StampPassSlot  # imports inductor: only where it is needed

            stamp_pass = StampPassSlot()
            stamp_pass.place()
            self._parts.append(stamp_pass)
        self._shadows.set(model, "generate", self._wrap_generate(model.generate))
        decode.install()
        returns.install()
        decoder_ids.install()
        self._hooks.install()
        if stamps_in_forward:
            self._stamps.install()  # dynamo recompiles the forward once with them

    def _uninstall(self) -> None:
        for part in reversed(self._parts):
            part.remove()
        self._parts = []
        self._shadows.restore()

    def _before_compiled_step(self, stamped: bool) -> None:
        """A step of generate()'s compiled decode: the graph sees the bare model, or the model
        with its layer stamps when this step carries layers."""
        if self._hooks.installed:
            self._hooks.remove()
        if stamped:
            self._stamps.install()
        else:
            self._stamps.remove()

    def _after_call(self, call: CallState) -> None:
        """A compiled decode took the module hooks off for its steps: back as they were as
        installed — with a forward compiled by hand that stamps, its stamps stay (the next
        call's prefill runs that forward too)."""
        self._decode.end_call(call)
        if self._active and not self._hooks.installed:
            if not self._stamps_in_forward:
                self._stamps.remove()
            self._hooks.install()

    # ------------------------------------------------------------------ one call
    def _claim_call(self) -> bool:
        """True: this call is traced. False: run it untraced (re-entrant, or the wrapper was
        kept past stop()). Another thread's call while one is in flight is refused."""
        with self._owner_lock:
            if not self._active or self._timeline is None:
                return False
            me = threading.get_ident()
            if self._owner == me:
                return False  # generate() inside generate() (e.g. the model drafting for itself)
            if self._owner is not None:
                raise TracingError(f"generate() of this traced {type(self.model).__name__} was called from a "
                                   "second thread while another call is being traced: their marks would mix. "
                                   "Trace one call at a time per model (or one model copy per thread)")
            self._owner = me
            return True

    def _wrap_generate(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def traced_generate(*args: Any, **kwargs: Any) -> Any:
            if not self._claim_call():
                return original(*args, **kwargs)
            try:
                return self._traced_call(original, args, kwargs)
            finally:
                self._owner = None

        return traced_generate

    def _traced_call(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tl = self._timeline
        assert tl is not None
        given = named_inputs(args, kwargs, self._input_names)  # a positional input under the model's name for it
        inputs = read_call_inputs((), given, self._encoder_decoder)
        pending = queue_features(given, given.get("input_ids"), getattr(self.model, "config", None))
        tl.reset()
        stream = bind_call_streams(tl, self._devices)
        stamping = self._forward_compiled and self.layer_detail == "all"
        if self.layer_detail == "all" and (self._forward_compiled or callable(
                getattr(self.model, "_valid_auto_compile_criteria", None))):
            self._stamps.prepare(stream)
        eager_every, compiled_every = ((1, COMPILED_LEAD_EVERY) if self.lead_every is None
                                       else (self.lead_every, self.lead_every))
        call = CallState(prompt_len=inputs.prompt_len, fed=inputs.cache_len,
                         forward_compiled=self._forward_compiled, stamping=stamping,
                         layer_detail=self.layer_detail, layer_every=self.layer_every,
                         lead_every=compiled_every if self._forward_compiled else eager_every,
                         compiled_lead_every=compiled_every)
        self._slot.call = call
        self._stamps.eager_runs[0] = 0
        unix_start = time.time()
        tl.mark(_CALL_BEGIN)
        try:
            out = original(*args, **kwargs)
            tl.mark(_CALL_END)
        except BaseException:
            tl.reset()
            raise
        finally:
            self._slot.call = None
            self._after_call(call)
        t_returned = time.perf_counter_ns()
        call.eager_stamped_layers = self._stamps.eager_runs[0]
        marks = Marks.from_timeline(tl)  # the one sync of the call
        if call.compiled_decode:  # stop-check marks no step followed (compiled_decode.py) bound nothing
            marks = marks.without(call.unused_marks())
        stamps = None
        if call.stamping:  # the stamps' ring is the next call's to write: read now, placed at the build
            if call.forward_compiled:  # every forward runs the stamped graph, each one calibrated
                stamps = self._stamps.read(stream, (_PREFILL, _DECODE))
            else:  # generate()'s compiled decode: only the steps that ran the stamped graph
                stamps = self._stamps.read(stream, (_DECODE,), call.calibrated_steps)
        # an encoder–decoder's output may or may not hold its decoder prompt: told by the decoder sequence
        check = decoder_prompt_check(out, call) if self._encoder_decoder else None
        returned = None if self._encoder_decoder else returned_prompt_check(out, given.get("input_ids"), inputs, call)
        finished = FinishedCall(
            marks=marks, call=call, inputs=inputs, output_tokens=new_token_count(out, inputs, call),
            prompt_check=check, returned_check=returned,
            uncounted=uncounted_output(out),
            call_index=self._next_call_index, sample_id=self.sample_id, unix_start=unix_start,
            unix_time=time.time(), features=pending.hold(), stamps=stamps,
            device_streams=list(tl.device_streams) if len(self._devices) > 1 else [],
            resolve_ms=(time.perf_counter_ns() - t_returned) / 1e6)
        self._next_call_index += 1
        self._unbuilt.append(finished)
        # records streamed to a file reach it before generate() hands back; unread calls are
        # built in batches, so what they hold (marks, copies of the inputs, on the device for
        # a GPU model) stays bounded when the records are never read
        if self._writer is not None or len(self._unbuilt) >= UNBUILT_AT_MOST:
            self._build_unbuilt()
        return out

    # ------------------------------------------------------------------ records
    @property
    def records(self) -> list[StageRecord]:
        """One record per traced call, in call order. A call leaves its resolved marks; its
        record is built here, when first read (or at ``stop()``, or at once when records are
        streamed to ``jsonl=``): the stage math and the record are host work the call itself
        need not wait for, and built back to back they run on warm caches."""
        if self._unbuilt:
            self._build_unbuilt()
        return self._records

    def _build_unbuilt(self) -> None:
        with self._build_lock:  # one builder at a time: records stay in call order
            while self._unbuilt:
                finished = self._unbuilt[0]
                t0 = time.perf_counter_ns()
                marks, error, _ = finished.placed
                rec = build_record(marks, self._meta(finished), self._placement, error,
                                   self.keep_marks, expect=self._expectations(finished.inputs),
                                   uncounted=finished.uncounted_reason(), audio_parts=self.layout.describe()["audio"],
                                   loops=finished.call.loops, unclosed=unclosed_prefill(finished.call),
                                   eager_stamped=eager_stamped_note(finished.call.eager_stamped_layers,
                                                                    len(self.layout.layers)))
                rec.resolve_ms = finished.resolve_ms
                rec.build_ms = (time.perf_counter_ns() - t0) / 1e6
                self._unbuilt.popleft()  # only once built: a failure leaves it to be built again
                self._records.append(rec)
                if self._writer is not None:
                    self._writer.write(rec)

    def _meta(self, done: FinishedCall) -> dict[str, Any]:
        cfg = getattr(self.model, "config", None)
        split = len(self._devices) > 1
        call, inputs, (marks, _, after_matmul) = done.call, done.inputs, done.placed
        return dict(batch_size=inputs.batch, prompt_tokens=inputs.input_len,
                    output_tokens=done.new_tokens(), call_index=done.call_index,
                    sample_id=done.sample_id, model_class=type(self.model).__name__,
                    model_name=str(getattr(cfg, "_name_or_path", "") or ""), device=str(self._devices[0]),
                    backend=marks.backend, layout=self.layout.name, layer_detail=call.layer_detail,
                    layer_every=call.layer_every, lead_every=call.lead_every,
                    layer_marks=self.layer_marks, stream=int(marks.streams[0]), rank=self.rank,
                    host_start_ns=int(marks.host_ns[0]), unix_start=done.unix_start, unix_time=done.unix_time,
                    versions=versions(), n_marks=len(marks), compiled_decode=call.compiled,
                    devices=[str(d) for d in self._devices] if split else [],
                    device_streams=done.device_streams,
                    layer_marks_after_matmul=after_matmul,
                    decode_steps_from_stop_check=call.steps_from_stop_check, **done.features.resolve())

    def _expectations(self, inputs: CallInputs) -> dict[str, str]:
        """What this call's record must show, and what to say where it does not."""
        expect = {}
        if inputs.has_pixels:
            expect["vision"] = ("pixel inputs reached generate() but no vision stage was marked: the model ran its "
                                "vision part where stagetrace did not look, so that time is inside prefill or other; "
                                "pass vision=[...] (the vision modules' paths) to trace()")
        if inputs.audio_args:  # said only where no run of an audio encoder was marked (else where it ran is said)
            found = self.layout.describe()["audio"]
            expect["audio"] = (f"audio inputs ({', '.join(inputs.audio_args)}) reached generate() but no run of an "
                               "audio encoder was marked"
                               + (f" ({', '.join(found)} did not run under a mark)" if found else "")
                               + ": stagetrace has no audio stage, and this model encoded its audio where stagetrace "
                               "did not look, so that time is inside prefill, other or decode, unseparated")
        if self.layer_detail != "off":
            expect["layer"] = (f"layer_detail={self.layer_detail!r} but no decoder layer ran under a mark"
                               + ("" if self.layout.layers else " (no layer list was found: pass layers='...')"))
        return expect

    # ------------------------------------------------------------------ outputs
    def save_jsonl(self, path: str | Path, spans: bool = False) -> Path:
        write_jsonl(self.records, path, spans=spans)
        return Path(path)

    def save_chrome_trace(self, path: str | Path, **kw: Any) -> Path:
        from ..export.chrome import write_chrome_trace

        return write_chrome_trace(self.records, path, **kw)

    def summary(self) -> dict[str, dict[str, float]]:
        from ..export.table import summarize

        return summarize(self.records)

    def clear(self) -> None:
        """Forget every record, built or not."""
        with self._build_lock:
            self._unbuilt.clear()
            self._records.clear()
            self._next_call_index = 0


def trace(model: nn.Module, **kwargs: Any) -> Tracer:
    """A tracer for ``model``; use it as ``with stagetrace.trace(model) as tracer:``."""
    return Tracer(model, **kwargs)


def attach(model: nn.Module, **kwargs: Any) -> Tracer:
    """Trace every ``generate()`` of ``model`` from now until ``tracer.stop()``."""
    return Tracer(model, **kwargs).start()
