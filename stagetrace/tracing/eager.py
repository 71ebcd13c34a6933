"""Marks placed by hooks and wrappers on eager modules: the call's forwards, vision, the
language model's start, lm_head's end, decoder layers (layer detail), and the runs of a
non-vision (audio) encoder, which has no stage: the record says where they ran.

What must stay true:

* a hook firing only reads the call slot and calls ``timeline.mark`` (the native method
  itself): no sync, no allocation beyond Python's own for the call;
* layer marks, the language model's start and lm_head's end wrap ``forward`` instead of
  using module hooks: a module with hooks takes torch's slow ``_call_impl`` path (about
  10 µs a call, in every decode step too), a wrapped forward keeps the fast path and costs
  one Python frame — what keeps hundreds of marks per call cheap;
* where only some forwards carry layer marks (``layer_detail="prefill"``, ``layer_every``
  > 1) the wrappers are in place only while such a forward runs: placed or taken off at the
  top-level forward's start, before its mark (so the switch is host time between steps, not
  inside one), and a forward without layer marks runs the layers' own ``forward`` — a
  sampled step pays for its layers, a skipped step pays nothing;
* :meth:`EagerHooks.remove` undoes exactly what :meth:`EagerHooks.install` did; the hooks
  and wrappers are made once and placed again as they are (a compiled decode takes them off
  and puts them back every call: no new closures there).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from torch import nn

from ..labels import Kind, label, layer_labels
from ..layouts import ResolvedLayout
from .call import CallSlot, forward_input_len, next_forward_is_prefill, read_call_inputs
from .patch import Shadows

__all__ = ["EagerHooks", "layer_forward"]

# Plain ints: the hot path hands these straight to the native mark().
_PREFILL, _DECODE = label(Kind.PREFILL_FORWARD), label(Kind.DECODE_FORWARD)
_VISION_BEGIN, _VISION_END = label(Kind.VISION_BEGIN), label(Kind.VISION_END)
_LM_BEGIN, _HEAD_END = label(Kind.LM_BEGIN), label(Kind.LM_HEAD_END)
_AUDIO_BEGIN, _AUDIO_END = label(Kind.AUDIO_BEGIN), label(Kind.AUDIO_END)
_AUX_BEGIN, _AUX_END = label(Kind.AUX_FORWARD_BEGIN), label(Kind.AUX_FORWARD_END)


class _Placements:
    """What :class:`EagerHooks` places, in order: module hooks ``(module, post, hook,
    register kwargs)`` and wrappers ``(owner, attribute, wrapper)``."""

    def __init__(self) -> None:
        self.hooks: list[tuple[nn.Module, bool, Callable[..., Any], dict[str, Any]]] = []
        self.wrappers: list[tuple[Any, str, Callable[..., Any]]] = []

    def hook(self, module: nn.Module, hook: Callable[..., Any], post: bool = False, **kwargs: Any) -> None:
        self.hooks.append((module, post, hook, kwargs))

    def wrap(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        self.wrappers.append((owner, name, wrapper))


class EagerHooks:
    """Module hooks and layer wrappers of one tracer. ``forward_mark`` marks each top-level
    forward (the native mark, or the mark plus a calibration stamp under a hand-compiled
    forward); ``inside_compiled_forward``: the language model and layers run inside a
    forward the user compiled, so they get no hooks (prefill is cut at the top-level
    forward's own boundaries, which run outside the graph)."""

    def __init__(self, model: nn.Module, layout: ResolvedLayout, slot: CallSlot, mark: Callable[[int], None],
                 forward_mark: Callable[[int], None], layer_detail: str, layer_marks: str,
                 inside_compiled_forward: bool,
                 layer_mark_at: Sequence[tuple[Callable[[int], None], Callable[[int], None]]] | None = None,
                 layer_every: int = 1):
        self.model, self.layout, self.slot = model, layout, slot
        self._mark, self._forward_mark = mark, forward_mark
        self.layer_detail, self.layer_marks = layer_detail, layer_marks
        self.inside_compiled_forward = inside_compiled_forward
        # per layer, what records its begin and end marks (one event on its GPU when split)
        self._layer_mark_at = list(layer_mark_at) if layer_mark_at is not None else [(mark, mark)] * len(layout.layers)
        # layer wrappers switched per forward where not every forward carries layer marks
        self.switched_layers = layer_detail == "prefill" or (layer_detail == "all" and layer_every > 1)
        self._layer_wrappers: list[tuple[nn.Module, Callable[..., Any]]] = []
        self._layers_placed = Shadows()
        self._handles: list[Any] = []
        self._wrappers = Shadows()
        self._placements: _Placements | None = None  # made on the first install, placed on every one
        self.installed = False

    def install(self) -> None:
        """Hooks and wrappers in place. They are made once (the first install) and placed
        again as they are after a :meth:`remove`: a compiled decode takes them off before its
        first step and puts them back after every call, which with new closures each time
        cost about 65 µs a call in context (CPU machine)."""
        if self.installed:
            return
        self.installed = True
        if self._placements is None:
            self._placements = self._build()
        for module, post, hook, kwargs in self._placements.hooks:
            register = module.register_forward_hook if post else module.register_forward_pre_hook
            self._handles.append(register(hook, **kwargs))
        for owner, name, wrapper in self._placements.wrappers:
            self._wrappers.set(owner, name, wrapper, direct=True)

    def _build(self) -> _Placements:
        """Every hook and wrapper of this tracer, in the order they are placed."""
        slot, mark = self.slot, self._mark
        out = _Placements()
        out.hook(self.model, self._on_forward(), with_kwargs=True)
        if self._loop_prepares():  # a forward outside generate()'s loop is marked from start to end
            out.hook(self.model, lambda m, a, o: _end_aux(slot.call, mark), post=True, always_call=True)
        if self.layout.inner_generators:
            self._inner_forwards(out)
        for _, owner, name in self.layout.vision_calls:
            out.wrap(owner, name, _marking_call(getattr(owner, name), slot, mark))
        if self.layout.prefill_encoder is not None:  # its start is the start of prefill
            # ... of the loop's: not a run inside a forward outside it (Whisper's language detection)
            out.hook(self.layout.prefill_encoder[1],
                     lambda m, a: mark(_LM_BEGIN) if slot.call is not None and slot.call.forwards == 0
                     and not slot.call.in_aux else None)
        # after the prefill encoder's hook: an encoder that takes audio (Whisper's) starts prefill, then its run
        if not self.inside_compiled_forward:  # inside a hand-compiled forward they would enter the graph
            for _, owner, name in self.layout.audio_calls:
                out.wrap(owner, name, _marking_call(getattr(owner, name), slot, mark, _AUDIO_BEGIN, _AUDIO_END))
            for _, mod in self.layout.audio:
                out.hook(mod, lambda m, a: None if slot.call is None else mark(_AUDIO_BEGIN))
                out.hook(mod, lambda m, a, o: None if slot.call is None else mark(_AUDIO_END), post=True)
        for _, mod in self.layout.vision:
            out.hook(mod, lambda m, a: None if slot.call is None else mark(_VISION_BEGIN))
            out.hook(mod, lambda m, a, o: None if slot.call is None else mark(_VISION_END), post=True)
        if self.inside_compiled_forward:
            out.hook(self.model, lambda m, a, o: mark(_HEAD_END) if slot.call is not None and slot.call.in_prefill
                     else None, post=True)
            return out
        # wrapped forwards, not module hooks: both modules run in every decode step too, where a
        # hook would put them on torch's slow call path only to find the mark is not needed
        lm, head = self.layout.language_model[1], self.layout.lm_head[1]
        out.wrap(lm, "forward", _prefill_marked(lm.forward, slot, mark, before=_LM_BEGIN))
        out.wrap(head, "forward", _prefill_marked(head.forward, slot, mark, after=_HEAD_END))
        if self.layer_detail != "off":
            labels = layer_labels(len(self.layout.layers), self.layer_marks)
            self._layer_wrappers = [
                (layer, layer_forward(layer.forward, slot, mark_begin, begin, end, mark_end))
                for (_, layer), (begin, end), (mark_begin, mark_end) in zip(self.layout.layers, labels,
                                                                            self._layer_mark_at)]
            if not self.switched_layers:
                for layer, wrapper in self._layer_wrappers:
                    out.wrap(layer, "forward", wrapper)
        return out

    def layers_for(self, layers_now: bool) -> None:
        """Before a top-level forward: the layer wrappers in place exactly when it carries layer
        marks (only where they are switched; a no-op when already so)."""
        if not self.switched_layers or layers_now == bool(self._layers_placed):
            return
        if layers_now:
            for layer, wrapper in self._layer_wrappers:  # host time between two steps: kept short
                self._layers_placed.set(layer, "forward", wrapper, direct=True)
        else:
            self._layers_placed.restore()

    def _inner_forwards(self, out: _Placements) -> None:
        """A generate() that delegates to an inner model's generate() never calls the top forward:
        the inner model's forwards are then the call's forwards — but only those not run from
        inside a top-level forward (where the top-level hook already counted)."""
        slot, forward_mark, layers_for = self.slot, self._forward_mark, self.layers_for

        def enter(module: nn.Module, args: tuple[Any, ...]) -> None:
            if slot.call is not None:
                slot.call.outer_depth += 1

        def leave(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if slot.call is not None:
                slot.call.outer_depth -= 1

        def on_inner_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = slot.call
            if call is None or call.outer_depth:
                return
            first = call.forwards == 0
            prefill = next_forward_is_prefill(call, forward_input_len(args, kwargs))
            if first:
                call.prompt_len = call.fed  # the inner generate()'s own prompt is what its first forward fed
            layers_for(call.layers_now)
            forward_mark(_PREFILL if prefill else _DECODE)

        out.hook(self.model, enter)
        out.hook(self.model, leave, post=True, always_call=True)
        for _, inner in self.layout.inner_generators:
            out.hook(inner, on_inner_forward, with_kwargs=True)
            out.wrap(inner, "generate", _inner_generate(inner.generate, slot))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._layers_placed.restore()
        self._wrappers.restore()
        self.installed = False  # what was made stays, to be placed again as it is

    def _loop_prepares(self) -> bool:
        """An encoder–decoder whose generate() loop prepares each forward's inputs (``decoder_ids.py``
        records it): a top-level forward it did not prepare is none of its steps."""
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)) and callable(
            getattr(self.model, "prepare_inputs_for_generation", None))

    def _on_forward(self) -> Callable[..., None]:
        slot, forward_mark, layers_for, mark = self.slot, self._forward_mark, self.layers_for, self._mark
        loop_prepares = self._loop_prepares()

        def on_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = slot.call
            if call is None:
                return
            if loop_prepares:
                if not call.prepared:  # run outside generate()'s loop: no prefill or decode step, no layers
                    call.in_aux, call.in_prefill, call.layers_now = True, False, False
                    mark(_AUX_BEGIN)
                    return
                call.prepared = False
            prefill = next_forward_is_prefill(call, forward_input_len(args, kwargs))
            layers_for(call.layers_now)
            forward_mark(_PREFILL if prefill else _DECODE)

        return on_forward


def _end_aux(call: Any, mark: Callable[[int], None]) -> None:
    if call is not None and call.in_aux:
        call.in_aux = False
        mark(_AUX_END)


def _marking_call(inner: Callable[..., Any], slot: CallSlot, mark: Callable[[int], None],
                  begin: int = _VISION_BEGIN, end: int = _VISION_END) -> Callable[..., Any]:
    """A vision entry (``get_image_features`` …) whose run is marked as vision (or an audio entry,
    with the audio labels). Its signature is kept (``functools.wraps``): generate() inspects it to
    decide what to pass."""
    @functools.wraps(inner)
    def entry(*args: Any, **kwargs: Any) -> Any:
        if slot.call is None:
            return inner(*args, **kwargs)
        mark(begin)
        out = inner(*args, **kwargs)
        mark(end)
        return out

    return entry


def _prefill_marked(inner: Callable[..., Any], slot: CallSlot, mark: Callable[[int], None], before: int | None = None,
                    after: int | None = None) -> Callable[..., Any]:
    """A module's forward that marks ``before`` it starts or ``after`` it returns while the
    call's forward in flight is a prefill forward (the language model's start, lm_head's end)."""
    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        c = slot.call
        if c is None or not c.in_prefill:
            return inner(*args, **kwargs)
        if before is not None:
            mark(before)
        out = inner(*args, **kwargs)
        if after is not None:
            mark(after)
        return out

    return forward


def _inner_generate(inner: Callable[..., Any], slot: CallSlot) -> Callable[..., Any]:
    """An inner model's generate(): what it is given says where its output's new tokens start."""
    @functools.wraps(inner)
    def generate(*args: Any, **kwargs: Any) -> Any:
        call = slot.call
        if call is not None and call.outer_depth == 0 and call.inner_output_prompt_len is None:
            call.inner_output_prompt_len = read_call_inputs(args, kwargs).output_prompt_len
        return inner(*args, **kwargs)

    return generate


def layer_forward(inner: Callable[..., Any], slot: CallSlot, mark: Callable[[int], None], begin: int,
                  end: int | None, mark_end: Callable[[int], None] | None = None) -> Callable[..., Any]:
    """A layer's forward with its marks around it while the forward in flight carries layer
    marks (``CallState.layers_now``: the prefill, and the decode steps layer detail samples);
    ``end`` None: the next layer's begin marks this one's end. ``mark`` records the begin,
    ``mark_end`` (default: ``mark``) the end — on a split model, each on its own GPU."""
    mark_begin, mark_end = mark, mark if mark_end is None else mark_end

    def forward(*args: Any, **kwargs: Any) -> Any:
        c = slot.call
        if c is None or not c.layers_now:
            return inner(*args, **kwargs)
        mark_begin(begin)
        out = inner(*args, **kwargs)
        if end is not None:
            mark_end(end)
        return out

    return forward
