"""The stage tracer: hooks that place marks at stage boundaries of ``generate()``.

What must stay true:

* the hot path (a hook firing) only checks a flag and calls ``timeline.mark``: no
  sync, no allocation beyond what Python does for the call itself;
* the one sync per call is ``Marks.from_timeline`` after ``generate()`` returns;
* an exception inside ``generate()`` leaves no partial record, and the tracer stays
  usable; leaving the ``with`` block (or ``stop()``) removes every hook it added and
  restores ``model.generate``;
* tracing never changes what ``generate()`` computes or returns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .labels import Kind, label
from .layouts import ResolvedLayout, resolve_layout
from .low_level import Marks, Timeline, new_timeline
from .records import JsonlWriter, StageRecord, write_jsonl
from .stages import StageOrderError, stages_from_marks

__all__ = ["Tracer", "trace", "attach", "TracingError"]

LAYER_DETAIL = ("off", "prefill", "all")
# "pair": a mark before and after every layer, so what runs between layers is outside them.
# "shared": one mark per boundary between consecutive layers (and the last layer's end):
# half the marks, and anything run between two layers counts to the earlier one.
LAYER_MARKS = ("pair", "shared")

# Device types on which tracing generate()'s compiled decode has been validated. CUDA
# (CUDA-graph replay) joins once its tests have run on a GPU; until then it is refused.
COMPILED_DECODE_VALIDATED_ON = ("cpu", "cuda")

# Plain ints: the hot path hands these straight to the native mark().
_CALL_BEGIN, _CALL_END = label(Kind.CALL_BEGIN), label(Kind.CALL_END)
_PREFILL, _DECODE = label(Kind.PREFILL_FORWARD), label(Kind.DECODE_FORWARD)

# Models being traced right now, to refuse a second tracer on the same model.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Tracer]" = weakref.WeakKeyDictionary()


class TracingError(RuntimeError):
    """Tracing was set up wrongly (nested tracing, no generate(), ...)."""


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"stagetrace": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class _Call:
    """State of the generate() call in flight."""

    prompt_len: int
    fed: int            # tokens the cache holds or has been fed so far
    forwards: int = 0
    in_prefill: bool = False
    decoding: bool = False
    compiled: bool = False  # generate() compiles the decode step: marks come from outside the graph
    stamping: bool = False  # layer marks inside the compiled decode step are GPU-side stamps


def _is_compiled(fn: Any) -> bool:
    """A torch.compile'd function, a bound method of a torch.compile'd module, or a
    ``functools.wraps`` wrapper around either (e.g. one that calls
    ``torch.compiler.cudagraph_mark_step_begin()`` first)."""
    for _ in range(8):  # a bounded walk down __wrapped__: wrappers may wrap wrappers
        if hasattr(fn, "_torchdynamo_orig_callable") or hasattr(getattr(fn, "__self__", None), "_orig_mod"):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def _cache_len(cache: Any) -> int:
    """Length of a cache passed into generate(); read once per call, off the hot path."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])  # legacy list of (key, value): (B, H, T, D)
    return 0


def _input_len(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    x = kwargs.get("input_ids")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
        return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
    return int(x.shape[-1]) if isinstance(x, torch.Tensor) else None


def _sequences(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    seq = getattr(out, "sequences", None)
    return seq if isinstance(seq, torch.Tensor) else None


class Tracer:
    """Traces every ``generate()`` call of one model while active.

    Use as a context manager (``with stagetrace.trace(model) as tracer:``), with
    ``start()``/``stop()``, or as a decorator on a function that calls generate().
    One :class:`StageRecord` per call lands in ``tracer.records``.
    """

    def __init__(self, model: nn.Module, *, vision: str | Sequence[str] | None = None,
                 language_model: str | None = None, lm_head: str | None = None, layers: str | None = None,
                 layer_detail: str | bool = "off", layer_marks: str = "pair", jsonl: str | Path | None = None,
                 sample_id: str | None = None, capacity: int = 4096, keep_marks: bool = True,
                 timeline: Timeline | None = None):
        if not callable(getattr(model, "generate", None)):
            raise TracingError(f"{type(model).__name__} has no generate() method to trace")
        if layer_detail is True:
            layer_detail = "all"
        elif layer_detail is False:
            layer_detail = "off"
        if layer_detail not in LAYER_DETAIL:
            raise ValueError(f"layer_detail must be one of {LAYER_DETAIL}, got {layer_detail!r}")
        if layer_marks not in LAYER_MARKS:
            raise ValueError(f"layer_marks must be one of {LAYER_MARKS}, got {layer_marks!r}")
        self.layer_marks = layer_marks
        self.model = model
        self.layer_detail: str = layer_detail
        self.sample_id = sample_id
        self.records: list[StageRecord] = []
        self.keep_marks = keep_marks
        self.rank = int(os.environ.get("RANK", "0") or 0)  # torchrun sets it; one trace process per rank
        self._overrides = dict(vision=vision, language_model=language_model, lm_head=lm_head, layers=layers)
        # Resolve now, so a bad layout fails at trace(), before any generate() runs.
        self.layout: ResolvedLayout = resolve_layout(model, **self._overrides)
        self._capacity = capacity
        self._jsonl_path = Path(jsonl) if jsonl is not None else None
        self._writer: JsonlWriter | None = None
        self._handles: list[Any] = []
        # (module, attribute, its own instance-level value or None): what _install shadowed
        self._restores: list[tuple[nn.Module, str, Any]] = []
        self._layer_restores: list[tuple[nn.Module, str, Any]] = []
        self._hooks_installed = False
        self._compiled_forward = False  # the user compiled model.forward by hand
        # GPU-side stamps for layer detail inside compiled decode steps (made on first need)
        self._ring: Any = None
        self._stream = 0
        self._stamp_wrappers: list[tuple[nn.Module, Callable[..., Any]]] = []
        # A caller-given timeline (e.g. a reference clock in benchmarks) replaces the native one.
        self._timeline: Timeline | None = timeline
        self._device = torch.device("cpu")
        self._devices: list[torch.device] = []  # several when the model is split over GPUs
        self._call: _Call | None = None
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
        other = _ACTIVE.get(self.model)
        if other is not None:
            raise TracingError(f"{type(self.model).__name__} is already being traced by another stagetrace "
                               "tracer: stop it before starting a new one (nested tracing is not supported)")
        self._device, self._devices = self._model_devices()
        if self._timeline is None:
            if len(self._devices) > 1:
                from .low_level.multi_device import MultiDeviceTimeline

                self._timeline = MultiDeviceTimeline([new_timeline("cuda", d.index or 0, capacity=self._capacity)
                                                      for d in self._devices])
            else:
                self._timeline = new_timeline(self._device.type, self._device.index or 0, capacity=self._capacity)
        if self._jsonl_path is not None and self._writer is None:
            self._writer = JsonlWriter(self._jsonl_path)
        try:
            self._install()
        except BaseException:
            self._uninstall()  # undoes exactly what was installed before the failure
            if self._writer is not None:
                self._writer.close()
                self._writer = None
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
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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

    def _model_devices(self) -> tuple[torch.device, list[torch.device]]:
        """The device generate() starts on (the input embeddings'), then every device, it first."""
        devices = {p.device for p in self.model.parameters()}
        if len(devices) <= 1:
            device = next(iter(devices)) if devices else torch.device("cpu")
            return device, [device]
        if any(d.type != "cuda" for d in devices):
            raise TracingError(f"the model's parameters are spread over {sorted(map(str, devices))}; a model "
                               "split over several GPUs is traced, but not one offloaded to the CPU or disk")
        primary = next(iter(devices))
        embeddings = getattr(self.model, "get_input_embeddings", lambda: None)()
        if isinstance(embeddings, nn.Module):
            primary = next(embeddings.parameters(), torch.empty(0, device=primary)).device
        return primary, [primary] + sorted(devices - {primary}, key=lambda d: d.index or 0)

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        """Call-level wrappers (kept while active), then the module hooks."""
        model = self.model
        self._check_compiled_forward()
        self._guard_auto_compile()
        self._shadow(model, "generate", self._wrap_generate(model.generate))
        if callable(getattr(model, "prepare_inputs_for_generation", None)):
            self._shadow(model, "prepare_inputs_for_generation",
                         self._wrap_prepare_inputs(model.prepare_inputs_for_generation))
        self._install_module_hooks()

    def _shadow(self, obj: nn.Module, attr: str, value: Any) -> None:
        self._restores.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, value)

    def _install_module_hooks(self) -> None:
        """Hooks and layer wrappers on modules: the ones a compiled region must never see."""
        model, lay = self.model, self.layout
        tl = self._timeline
        assert tl is not None
        mark = tl.mark
        self._hooks_installed = True
        stamps_in_forward = self._compiled_forward and self.layer_detail == "all"
        if stamps_in_forward:
            ring = self._ring

            def forward_mark(lab: int) -> None:  # the event, then its calibration stamp
                mark(lab)
                ring.stamp(lab, self._stream)
        else:
            forward_mark = mark  # the native mark itself: nothing added on the hot path

        def on_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = self._call
            if call is None:
                return
            first = call.forwards == 0
            call.forwards += 1
            if first or (not call.decoding and call.fed < call.prompt_len):
                call.in_prefill = True
                n = _input_len(args, kwargs)
                call.fed += call.prompt_len if n is None else n
                forward_mark(_PREFILL)
            else:
                call.in_prefill = False
                call.decoding = True
                forward_mark(_DECODE)

        self._handles.append(model.register_forward_pre_hook(on_forward, with_kwargs=True))

        vb, ve = label(Kind.VISION_BEGIN), label(Kind.VISION_END)
        for _, mod in lay.vision:
            self._handles.append(mod.register_forward_pre_hook(
                lambda m, a, _l=vb: None if self._call is None else mark(_l)))
            self._handles.append(mod.register_forward_hook(
                lambda m, a, o, _l=ve: None if self._call is None else mark(_l)))

        lm_b, head_e = label(Kind.LM_BEGIN), label(Kind.LM_HEAD_END)
        if self._compiled_forward:
            # The language model and lm_head run inside the compiled forward: prefill is cut
            # at the top-level forward's own boundaries instead, which run outside the graph.
            self._handles.append(model.register_forward_hook(
                lambda m, a, o: mark(head_e) if self._call is not None and self._call.in_prefill else None))
            if stamps_in_forward:
                self._install_stamp_wrappers()  # dynamo recompiles the forward once with them
            return
        self._handles.append(lay.language_model[1].register_forward_pre_hook(
            lambda m, a: mark(lm_b) if self._call is not None and self._call.in_prefill else None))
        self._handles.append(lay.lm_head[1].register_forward_hook(
            lambda m, a, o: mark(head_e) if self._call is not None and self._call.in_prefill else None))

        if self.layer_detail != "off":
            every_step = self.layer_detail == "all"
            for i, (_, layer) in enumerate(lay.layers):
                self._wrap_layer_forward(layer, label(Kind.LAYER_BEGIN, i), self._layer_end_label(i), every_step)

    def _check_compiled_forward(self) -> None:
        """A forward compiled by hand (``model.forward = torch.compile(...)``).

        Hooks on the top-level module run in ``_call_impl``, outside the compiled forward,
        so they stay; everything inside it (language model, lm_head, layers, a vision part
        called from forward) would be traced into the graph, so it gets no event marks:
        prefill is then the top-level prefill forward itself. Layer detail there comes from
        GPU-side stamps around every layer of every forward, each forward's stamps placed
        from a calibration stamp issued after its top-level event. Text-only models only.
        """
        model = self.model
        forwards = (("model.forward", model.forward), ("language model forward", self.layout.language_model[1].forward))
        compiled = [what for what, fn in forwards if _is_compiled(fn)]
        self._compiled_forward = bool(compiled)
        if not compiled:
            return
        why = (self._unvalidated_compile()
               or ("a vision stage may run inside the compiled forward; only text-only models are supported"
                   if self.layout.vision else None)
               or ("layer stamps inside a compiled forward run in every forward, prefill and decode alike; "
                   "use layer_detail='all' (or 'off')" if self.layer_detail == "prefill" else None))
        if not why and self.layer_detail == "all":
            from .low_level.graph_stamps import ring_for, stamps_available

            no_stamps = stamps_available(self._device.type)
            why = (f"layer marks inside the compiled graph need GPU-side stamps: {no_stamps}; "
                   "use layer_detail='off'") if no_stamps else None
            if not why:
                self._ring = ring_for(self._device)
        if why:
            raise TracingError(f"{' and '.join(compiled)} is compiled with torch.compile and {why}; "
                               "trace the eager model")

    def _unvalidated_compile(self) -> str | None:
        if len(self._devices) > 1:
            return f"the model is split over {len(self._devices)} GPUs, which compiled tracing does not support"
        if self._device.type in COMPILED_DECODE_VALIDATED_ON:
            return None
        return f"tracing compiled code is not yet validated on {self._device.type} (CUDA graphs)"

    def _guard_auto_compile(self) -> None:
        """Learns whether generate() compiles the decode step, from transformers' own decision.

        transformers compiles ``__call__`` for decode steps when the cache is static (and
        the device qualifies); that decision is ``_valid_auto_compile_criteria``, shadowed
        here for the traced model only. Module hooks inside a compiled region are traced by
        dynamo (marks that never fire, a recompile per call), so for such a call the module
        hooks come off before the first decode step and step marks come from
        ``prepare_inputs_for_generation``, which runs in the generate loop outside the graph.
        """
        model = self.model
        decide = getattr(model, "_valid_auto_compile_criteria", None)
        if decide is None:
            return

        def guarded(*args: Any, **kwargs: Any) -> bool:
            compiles = bool(decide(*args, **kwargs))
            call = self._call
            if compiles and call is not None:
                gen_config = args[1] if len(args) > 1 else kwargs.get("generation_config")
                why = (self._unvalidated_compile()
                       or ("chunked prefill is compiled too, so its stage boundaries would sit inside the graph"
                           if getattr(gen_config, "prefill_chunk_size", None) else None))
                if not why and self.layer_detail == "all":
                    from .low_level.graph_stamps import stamps_available

                    no_stamps = stamps_available(self._device.type)
                    why = (f"per-step layer marks inside the compiled graph need GPU-side stamps: {no_stamps}; "
                           "use layer_detail='prefill'") if no_stamps else None
                if why:
                    raise TracingError(f"generate() compiles the decode step (a static cache) and {why}. "
                                       "Trace it eagerly with generate(..., disable_compile=True)")
                call.compiled = True
                call.stamping = self.layer_detail == "all"
            return compiles

        self._shadow(model, "_valid_auto_compile_criteria", guarded)

    def _wrap_prepare_inputs(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """In compiled decode, a decode step starts where its inputs are prepared (outside the graph)."""
        mark = self._timeline.mark  # type: ignore[union-attr]

        @functools.wraps(inner)  # generate() inspects this signature (e.g. for inputs_embeds)
        def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> Any:
            c = self._call
            if c is not None and c.compiled and c.forwards > 0 and c.fed >= c.prompt_len:
                if self._hooks_installed:
                    self._remove_module_hooks()  # the compiled graph must see the bare model
                    if c.stamping:
                        self._install_stamp_wrappers()
                c.in_prefill = False
                c.decoding = True
                c.forwards += 1
                mark(_DECODE)
                if c.stamping:  # calibration: the step's event and the stamps' clock, side by side
                    self._ring.stamp(_DECODE, self._stream)
            return inner(*args, **kwargs)

        return prepare_inputs_for_generation

    def _wrap_layer_forward(self, layer: nn.Module, begin: int, end: int | None, every_step: bool) -> None:
        """Layer marks wrap ``forward`` instead of using module hooks.

        A module with hooks takes torch's slow ``_call_impl`` path (about 10 µs a call
        here); a wrapped forward keeps the fast path and costs one Python frame. This is
        what keeps layer detail (hundreds of marks per call) cheap.
        """
        mark = self._timeline.mark  # type: ignore[union-attr]
        saved = layer.__dict__.get("forward")
        inner = layer.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            c = self._call
            if c is None or not (every_step or c.in_prefill):
                return inner(*args, **kwargs)
            mark(begin)
            out = inner(*args, **kwargs)
            if end is not None:
                mark(end)
            return out

        layer.forward = forward  # type: ignore[method-assign]
        self._layer_restores.append((layer, "forward", saved))

    def _layer_end_label(self, i: int) -> int | None:
        """Layer i's end label, or None where the next layer's begin marks it (shared marks)."""
        if self.layer_marks == "pair" or i == len(self.layout.layers) - 1:
            return label(Kind.LAYER_END, i)
        return None

    def _install_stamp_wrappers(self) -> None:
        """Layer marks for a compiled decode step: ``torch.ops.stagetrace.stamp`` around each layer.

        Dynamo traces these wrappers into the graph (and CUDA-graph capture records the
        stamp kernels), so each replay stamps every layer boundary on the GPU. The wrapper
        objects are made once per tracer: dynamo guards on them, and new ones would
        recompile the decode step on every call.
        """
        from .low_level.graph_stamps import ring_id

        if not self._stamp_wrappers:
            warnings.warn("stagetrace: layer detail inside compiled decode puts a stamp between layers, so the "
                          "compiler can no longer fuse across layer boundaries: the stamped decode step is "
                          "compiled once more, runs a few µs per stamp slower on the GPU, and in bf16 its "
                          "rounding (hence tokens) may differ from the unstamped graph; stage-level tracing "
                          "leaves the graph untouched", UserWarning, stacklevel=4)
            rid = ring_id(self._ring)
            op = torch.ops.stagetrace.stamp.default
            for i, (name, layer) in enumerate(self.layout.layers):
                self._stamp_wrappers.append((layer, _stamping_forward(
                    layer.forward, op, rid, label(Kind.LAYER_BEGIN, i), self._layer_end_label(i), name)))
        for layer, forward in self._stamp_wrappers:
            self._layer_restores.append((layer, "forward", layer.__dict__.get("forward")))
            layer.forward = forward  # type: ignore[method-assign]

    @staticmethod
    def _restore(restores: list[tuple[nn.Module, str, Any]]) -> None:
        for module, attr, saved in reversed(restores):
            if saved is None:
                module.__dict__.pop(attr, None)
            else:
                module.__dict__[attr] = saved
        restores.clear()

    def _remove_module_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore(self._layer_restores)
        self._hooks_installed = False

    def _uninstall(self) -> None:
        self._remove_module_hooks()
        self._restore(self._restores)

    # ------------------------------------------------------------------ one call
    def _wrap_generate(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def traced_generate(*args: Any, **kwargs: Any) -> Any:
            if self._call is not None or self._timeline is None or not self._active:
                # Re-entrant generate() (e.g. the model drafting for itself), or a reference to
                # the wrapper kept past stop(): run untraced.
                return original(*args, **kwargs)
            tl = self._timeline
            input_ids = kwargs.get("input_ids", kwargs.get("inputs"))  # `inputs` is generate()'s own name
            if input_ids is None and args and isinstance(args[0], torch.Tensor):
                input_ids = args[0]
            embeds = kwargs.get("inputs_embeds")
            prompt = input_ids if input_ids is not None else embeds
            prompt_len = int(prompt.shape[1]) if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else 0
            batch = int(prompt.shape[0]) if isinstance(prompt, torch.Tensor) and prompt.dim() >= 1 else 1
            cache0 = _cache_len(kwargs.get("past_key_values", kwargs.get("cache")))
            tl.reset()
            if self._device.type == "cuda":
                self._stream = torch.cuda.current_stream(self._device).cuda_stream
                if hasattr(tl, "bind_streams"):  # a model split over GPUs: each device's current stream
                    tl.bind_streams([torch.cuda.current_stream(d).cuda_stream for d in self._devices])
                    tl.calibrate()  # before the call: never a sync inside it
                elif hasattr(tl, "bind_stream"):
                    tl.bind_stream(self._stream)  # type: ignore[attr-defined]
            if self.layer_detail == "all" and (self._compiled_forward or callable(
                    getattr(self.model, "_valid_auto_compile_criteria", None))):
                self._prepare_ring()
            self._call = _Call(prompt_len=prompt_len, fed=cache0)
            unix_start = time.time()
            tl.mark(_CALL_BEGIN)
            try:
                out = original(*args, **kwargs)
                tl.mark(_CALL_END)
            except BaseException:
                self._call = None
                tl.reset()
                raise
            finally:
                if not self._hooks_installed and self._active:
                    self._remove_module_hooks()  # the stamp wrappers of a compiled call, if any
                    self._install_module_hooks()  # a compiled call took them off for its decode steps
            compiled = self._call.compiled or self._compiled_forward
            stamping = self._call.stamping or (self._compiled_forward and self.layer_detail == "all")
            self._call = None
            t_resolve = time.perf_counter_ns()
            marks = Marks.from_timeline(tl)  # the one sync of the call
            stamp_error = None
            if stamping:
                marks, stamp_error = self._merge_stamps(marks)
            resolve_ms = (time.perf_counter_ns() - t_resolve) / 1e6
            seq = _sequences(out)
            if seq is None:
                new_tokens = 0
            elif input_ids is not None:
                new_tokens = int(seq.shape[-1]) - prompt_len
            else:
                new_tokens = int(seq.shape[-1])  # inputs_embeds only: generate returns new tokens only
            self._record(marks, batch, prompt_len, new_tokens, unix_start, resolve_ms, compiled, stamp_error)
            return out

        return traced_generate

    def _prepare_ring(self) -> None:
        """Empties the stamp ring before a call that may stamp (off the hot path)."""
        if self._ring is None:
            from .low_level.graph_stamps import ring_for, stamps_available

            if stamps_available(self._device.type):
                return  # a compiled call is then refused with the reason, eager calls need no ring
            self._ring = ring_for(self._device)
        self._ring.reset(self._stream)

    def _merge_stamps(self, marks: Marks) -> tuple[Marks, str | None]:
        from .low_level.graph_stamps import StampMergeError, merge_stamps

        labels, t_ns, dropped = self._ring.read(self._stream)
        try:
            anchors = (_PREFILL, _DECODE) if self._compiled_forward else (_DECODE,)
            return merge_stamps(marks, labels, t_ns, anchors, dropped), None
        except StampMergeError as exc:
            return marks, f"the GPU-side layer stamps do not line up with the step events: {exc}"

    def _record(self, marks: Marks, batch: int, prompt_len: int, new_tokens: int, unix_start: float,
                resolve_ms: float, compiled: bool, stamp_error: str | None = None) -> None:
        cfg = getattr(self.model, "config", None)
        meta = dict(batch_size=batch, prompt_tokens=prompt_len, output_tokens=new_tokens,
                    call_index=len(self.records), sample_id=self.sample_id,
                    model_class=type(self.model).__name__, model_name=str(getattr(cfg, "_name_or_path", "") or ""),
                    device=str(self._device), backend=marks.backend, layout=self.layout.name,
                    layer_detail=self.layer_detail, layer_marks=self.layer_marks, stream=int(marks.streams[0]), rank=self.rank,
                    host_start_ns=int(marks.host_ns[0]), unix_start=unix_start, unix_time=time.time(),
                    versions=_versions(), n_marks=len(marks), resolve_ms=resolve_ms, compiled_decode=compiled,
                    devices=[str(d) for d in self._devices] if len(self._devices) > 1 else [],
                    device_streams=[tl.bound_stream for tl in getattr(self._timeline, "timelines", [])])
        if stamp_error:
            rec = StageRecord.failed(stamp_error, **meta)
        elif marks.dropped:
            rec = StageRecord.failed(f"{marks.dropped} marks were dropped (the event pool could not grow); "
                                     "this call's stages are unknown", **meta)
        else:
            try:
                rec = StageRecord.from_stages(stages_from_marks(marks.labels, marks.device_ns), **meta)
            except StageOrderError as exc:
                rec = StageRecord.failed(str(exc), **meta)
        if rec.error:
            warnings.warn(f"stagetrace: call {rec.call_index} was not timed: {rec.error}", RuntimeWarning,
                          stacklevel=3)
        if len(self._devices) > 1 and rec.spans:
            rec.spans = self._place_spans_on_devices(rec.spans)
        if self.keep_marks:
            rec.marks = marks
        self.records.append(rec)
        if self._writer is not None:
            self._writer.write(rec)

    def _place_spans_on_devices(self, spans: list[Any]) -> list[Any]:
        """Layers and vision on the GPU holding their weights; the call and its stages on the
        GPU generate() starts on (they span every device)."""
        def device_of(module: nn.Module) -> str:
            return str(next(module.parameters(), torch.empty(0, device=self._device)).device)

        layer_devices = [device_of(m) for _, m in self.layout.layers]
        vision_device = device_of(self.layout.vision[0][1]) if self.layout.vision else str(self._device)
        out = []
        for s in spans:
            if s.name.startswith("layer "):
                device = layer_devices[int(s.name.split()[1])]
            elif s.name == "vision":
                device = vision_device
            else:
                device = str(self._device)
            out.append(dataclasses.replace(s, device=device))
        return out

    # ------------------------------------------------------------------ outputs
    def save_jsonl(self, path: str | Path, spans: bool = False) -> Path:
        write_jsonl(self.records, path, spans=spans)
        return Path(path)

    def save_chrome_trace(self, path: str | Path, **kw: Any) -> Path:
        from .export.chrome import write_chrome_trace

        return write_chrome_trace(self.records, path, **kw)

    def summary(self) -> dict[str, dict[str, float]]:
        from .export.table import summarize

        return summarize(self.records)

    def clear(self) -> None:
        self.records.clear()


def _stamping_forward(inner: Callable[..., Any], op: Any, ring: int, begin: int, end: int | None,
                      name: str) -> Callable[..., Any]:
    """A layer forward with a stamp on its hidden-state input and on its output.

    The stamps are copies of the tensors they stamp (see graph_stamps): the layer then
    reads the stamped input and its caller the stamped output, which pins both stamps
    to the layer's boundaries in whatever order the compiler schedules the rest.
    """
    def forward(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            args = (op(args[0], ring, begin),) + args[1:]
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            kwargs = dict(kwargs, hidden_states=op(kwargs["hidden_states"], ring, begin))
        else:
            raise TracingError(f"layer {name} was called without a hidden-state tensor (first argument or "
                               "hidden_states=): its stamps cannot be ordered; use layer_detail='prefill'")
        out = inner(*args, **kwargs)
        if end is None:
            return out
        if isinstance(out, torch.Tensor):
            return op(out, ring, end)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (op(out[0], ring, end),) + out[1:]
        raise TracingError(f"layer {name} returned {type(out).__name__}, not a tensor or a tuple starting "
                           "with one: its end stamp cannot be ordered; use layer_detail='prefill'")

    return forward


def trace(model: nn.Module, **kwargs: Any) -> Tracer:
    """A tracer for ``model``; use it as ``with stagetrace.trace(model) as tracer:``."""
    return Tracer(model, **kwargs)


def attach(model: nn.Module, **kwargs: Any) -> Tracer:
    """Trace every ``generate()`` of ``model`` from now until ``tracer.stop()``."""
    return Tracer(model, **kwargs).start()
