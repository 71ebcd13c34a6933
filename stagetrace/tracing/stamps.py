"""Layer marks inside compiled code: GPU-side stamps around every decoder layer, and their
merge onto the call's event timeline.

Dynamo traces the stamp wrappers into the graph (CUDA-graph capture records the stamp
kernels), so each replay stamps every layer boundary on the GPU. After the call the ring
is read once (inside the call: the next call writes it); when the call's record is built,
``clocks.merge_stamps`` places each forward's stamps from the calibration stamp issued right
after that forward's event mark (``StampsRead.place``: host work the call need not wait for).

What must stay true: the wrapper objects are made once per tracer (dynamo guards on
them: new ones would recompile the decode step on every call), and :meth:`remove`
restores exactly what :meth:`install` shadowed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..labels import MAY_MOVE_TO_MATMUL, after_matmul, layer_labels
from ..layouts import ResolvedLayout
from ..low_level import Marks
from ..low_level.clocks import StampMergeError, merge_stamps
from ..low_level import graph_stamps
from .errors import TracingError
from .patch import Shadows

__all__ = ["LayerStamps", "StampsRead"]

_FUSION_WARNING = ("stagetrace: layer detail inside compiled decode puts a stamp between layers, so the compiler "
                   "can no longer fuse across layer boundaries: the stamped decode step is compiled once more, "
                   "runs a few µs per stamp slower on the GPU, and in bf16 its rounding (hence tokens) may differ "
                   "from the unstamped graph; stage-level tracing leaves the graph untouched")
_MATMUL_NOTE = ("stagetrace: layer_marks='matmul': inside compiled decode each stamp between layers moves to right "
                "after the previous layer's last matrix multiply, so the compiler still fuses across layers; a "
                "layer's work after its last matmul (the residual add) then counts to the next layer, and each "
                "record says how many of its layer marks sit there (layer_marks_after_matmul). The stamped decode "
                "step is still compiled once more, and in bf16 its rounding (hence tokens) may differ from the "
                "unstamped graph; stage-level tracing leaves the graph untouched")


class LayerStamps:
    """The stamp ring of the model's device and the stamp wrappers of its layers."""

    def __init__(self, layout: ResolvedLayout, device: torch.device, layer_marks: str):
        self.layout, self.device, self.layer_marks = layout, device, layer_marks
        self.ring: Any = None
        self.stream = 0  # the stream of the call in flight
        self._wrappers: list[tuple[torch.nn.Module, Callable[..., Any]]] = []
        self.per_forward = 0  # stamps one forward of the stamped graph takes (its wrappers' labels)
        # layer forwards whose wrapper ran as Python outside a compiled graph since the last reset
        # (inside one, dynamo folds the check away: a replayed graph runs no Python at all)
        self.eager_runs = [0]
        self._shadows = Shadows()

    def unavailable_reason(self) -> str | None:
        return graph_stamps.stamps_unavailable_reason(self.device.type)

    def ensure_ring(self) -> bool:
        """The device's ring made (once); False where stamps cannot run (a compiled call is
        then refused with the reason; eager calls need no ring)."""
        if self.ring is None and not self.unavailable_reason():
            self.ring = graph_stamps.ring_for(self.device)
        return self.ring is not None

    def prepare(self, stream: int) -> None:
        """Before a call that may stamp: the ring emptied on the call's stream (off the hot path)."""
        self.stream = stream
        if self.ensure_ring():
            self.ring.reset(stream)

    def calibrate(self, label: int) -> None:
        """A stamp right after the event mark of the same label: where the clocks meet."""
        self.ring.stamp(label, self.stream)

    def install(self) -> None:
        if self._shadows:
            return
        if not self._wrappers:
            warnings.warn(_MATMUL_NOTE if self.layer_marks == "matmul" else _FUSION_WARNING, UserWarning,
                          stacklevel=5)
            rid = graph_stamps.ring_id(self.ring)
            op = torch.ops.stagetrace.stamp.default
            # Inside a compiled graph a layer's end and the next layer's begin are one point (a
            # stamp of a stamp of the same tensor, nothing between): one stamp marks both, so
            # "pair" places the stamps of "shared" — a second stamp there would time the first.
            placement = "shared" if self.layer_marks == "pair" else self.layer_marks
            labels = layer_labels(len(self.layout.layers), placement)
            if self.layer_marks == "matmul":  # the boundaries between layers, for the pass to move
                from .stamp_placement import movable_label

                labels = [tuple(lab | MAY_MOVE_TO_MATMUL if lab is not None and movable_label(lab) else lab
                                for lab in pair) for pair in labels]
            self.per_forward = sum(lab is not None for pair in labels for lab in pair)
            for (name, layer), (begin, end) in zip(self.layout.layers, labels):
                self._wrappers.append((layer, _stamping_forward(layer.forward, op, rid, begin, end, name,
                                                                self.eager_runs)))
        for layer, forward in self._wrappers:  # a plain instance attribute, switched per sampled step
            self._shadows.set(layer, "forward", forward, direct=True)

    def remove(self) -> None:
        self._shadows.restore()

    def read(self, stream: int, anchors: tuple[int, ...], calibrated_steps: list[int] | None = None) -> "StampsRead":
        """The call's stamps, read from the ring now (after the call's sync: the next call
        writes the ring); they are placed among its marks when its record is built."""
        labels, t_ns, dropped = self.ring.read(stream)
        return StampsRead(np.asarray(labels, dtype=np.int32), np.asarray(t_ns, dtype=np.int64), int(dropped),
                          tuple(anchors), None if calibrated_steps is None else list(calibrated_steps),
                          self.per_forward)


@dataclass(frozen=True)
class StampsRead:
    """One call's GPU-side stamps as read from the ring, and how to place them.

    ``anchors``: the event labels a calibration stamp follows. ``calibrated_steps``: the steps
    (the k-th event of an anchor label is step k) that ran the stamped graph and were
    calibrated; None: every one. Sampled, a bare step has no calibration of its own, so stamps
    it took would be counted to the stamped step before it: every calibrated step must then have
    taken exactly the stamped graph's stamps (``per_forward``), or nothing is placed."""

    labels: np.ndarray
    t_ns: np.ndarray
    dropped: int
    anchors: tuple[int, ...]
    calibrated_steps: list[int] | None
    per_forward: int

    def place(self, marks: Marks) -> tuple[Marks, str | None, int]:
        """The call's marks with its stamps placed among them, or the marks and why not; and how
        many stamps were taken after their layer's last matmul (their labels keep the flag: the
        stage math marks the layer spans they bound). Pure: run when the record is built."""
        labels, anchors = self.labels, self.anchors
        try:
            anchored = None
            if self.calibrated_steps is not None:
                n_events = int(np.isin(marks.labels, anchors).sum())
                anchored = np.isin(np.arange(n_events), self.calibrated_steps)
                if not self.dropped:  # a ring that dropped stamps fails the record as such (merge_stamps)
                    _stamps_per_step(labels, anchors, self.per_forward)
            return (merge_stamps(marks, labels, self.t_ns, anchors, self.dropped, anchored), None,
                    int(after_matmul(labels).sum()))
        except StampMergeError as exc:
            return marks, f"the GPU-side layer stamps do not line up with the step events: {exc}", 0


def _stamps_per_step(labels: np.ndarray, anchors: tuple[int, ...], per_forward: int) -> None:
    """Every calibrated step took the stamped graph's stamps, no more: a bare step that
    stamped (its graph switch failed) shows as a step with too many."""
    cuts = np.flatnonzero(np.isin(labels, anchors))
    taken = np.diff(np.append(cuts, len(labels))) - 1
    wrong = np.flatnonzero(taken != per_forward)
    if len(wrong):
        k = int(wrong[0])
        raise StampMergeError(f"calibrated step {k} took {int(taken[k])} stamps where its graph has {per_forward}: "
                              "a step that ran the bare graph stamped, or a stamped one did not")


def _stamping_forward(inner: Callable[..., Any], op: Any, ring: int, begin: int, end: int | None,
                      name: str, eager_runs: list[int]) -> Callable[..., Any]:
    """A layer forward with a stamp on its hidden-state input and on its output.

    The stamps are copies of the tensors they stamp (see graph_stamps): the layer then
    reads the stamped input and its caller the stamped output, which pins both stamps
    to the layer's boundaries in whatever order the compiler schedules the rest. Run as
    Python (not traced into a graph) it counts itself in ``eager_runs``: the step it belongs
    to then ran eagerly, which the record says.
    """
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():  # a constant True while dynamo traces this
            eager_runs[0] += 1
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
