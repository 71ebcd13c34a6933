"""Layer stamps that let the compiler fuse across layers (``layer_marks="matmul"``).

A stamp between two layers (``stamps.py``) is a copy of the hidden state at the boundary:
the copy pins the stamp there, and it also splits the kernel the compiler would make of the
previous layer's residual add and the next layer's input norm. This inductor graph pass
moves each such stamp back to right after the previous layer's last matrix multiply: a
matmul's output is written to memory anyway (cuBLAS, or inductor's template), so a copy
there splits nothing, and the add and the norm fuse again. Found in the graph the compiler
actually fuses, by op kind only (no module names).

What a moved stamp means, and what must stay true:

* the boundary is then *right after the last matmul* of the layer before it: that layer's
  work after its last matmul (the residual add, a post-norm) counts to the next layer, the
  last layer's to the step's tail. A moved stamp carries ``labels.AFTER_MATMUL`` in its
  label, so every record says how many of its layer marks sit there — never silently;
* a stamp is moved only where that is exact: every node between the stamp and the matmul
  is pointwise, a view or a reduction (work the compiler fuses into one kernel), and every
  other heavy node feeding that region (another matmul, attention, a gather) runs before
  the matmul, so it cannot run after the moved stamp. Anything else (a MoE's scatter,
  parallel attention and MLP branches) keeps its stamp at the boundary, unflagged;
* the pass moves only stamps whose label asks for it (``labels.MAY_MOVE_TO_MATMUL``, set by
  the tracer on the boundaries between layers under ``layer_marks="matmul"``), so it is
  harmless to every other graph; the flag also keeps such a graph apart from the same
  stamps at the boundaries (``"shared"``), which dynamo would otherwise reuse. The pass is
  set in inductor's config only while such a tracer is active, and the setting before it is
  put back exactly.
"""
from __future__ import annotations

import hashlib
import operator
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..labels import AFTER_MATMUL, INDEX_SHIFT, LABEL_FLAGS, MAY_MOVE_TO_MATMUL, Kind
from .errors import TracingError

__all__ = ["MoveStampsToLastMatmul", "StampPassSlot", "move_stamps_to_last_matmul", "movable_label"]

_aten = torch.ops.aten
# Matrix multiplies as they reach a post-grad graph (nn.Linear becomes mm / addmm).
_MATMULS = {p for p in (getattr(_aten, n, None) for n in ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm",
                                                          "_grouped_mm")) if p is not None}


def _packet(node: torch.fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", None)


def _is_stamp(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.stagetrace.stamp.default


def _fusible(node: torch.fx.Node) -> bool:
    """Work inductor fuses into the kernels around it: pointwise, views, reductions."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:  # one output of a fusible multi-output op (var_mean)
        return isinstance(node.args[0], torch.fx.Node) and _fusible(node.args[0])
    tags = getattr(node.target, "tags", ())
    return (torch.Tag.pointwise in tags or torch.Tag.reduction in tags or getattr(node.target, "is_view", False)
            or _packet(node) in (_aten._unsafe_view, _aten.reshape))


def movable_label(lab: int) -> bool:
    """A boundary between layers: a layer's begin (but the first: it follows no layer) or end."""
    kind, index = lab & 0xFF, (lab & ~LABEL_FLAGS) >> INDEX_SHIFT
    return kind == Kind.LAYER_END or (kind == Kind.LAYER_BEGIN and index > 0)


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _last_matmul(value: torch.fx.Node, order: dict[torch.fx.Node, int]) -> torch.fx.Node | None:
    """The matmul a stamp on ``value`` can move to, or None (see the module's rules)."""
    region: set[torch.fx.Node] = set()
    frontier: set[torch.fx.Node] = set()
    todo = [value]
    while todo:
        n = todo.pop()
        if n in region or n in frontier:
            continue
        if _fusible(n):
            region.add(n)
            todo.extend(n.all_input_nodes)
        else:
            frontier.add(n)
    heavy = [n for n in frontier if n.op == "call_function"]  # placeholders and constants are ready
    matmuls = [n for n in heavy if _packet(n) in _MATMULS]
    if not matmuls:
        return None
    last = max(matmuls, key=order.__getitem__)
    before = _ancestors(last)
    if any(n is not last and n not in before for n in heavy):
        return None  # heavy work that need not run before the matmul: the stamp stays
    return last


def move_stamps_to_last_matmul(graph: torch.fx.Graph) -> int:
    """Moves every layer stamp of ``graph`` whose label asks for it (``MAY_MOVE_TO_MATMUL``)
    to right after its layer's last matmul, where that is exact, and swaps that flag for
    ``AFTER_MATMUL``; returns how many moved. Other stamps (and graphs) stay as they are."""
    moved = 0
    for stamp in [n for n in graph.nodes if _is_stamp(n)]:
        value, ring, lab = stamp.args[0], stamp.args[1], stamp.args[2]
        if not isinstance(value, torch.fx.Node) or not isinstance(lab, int) or not lab & MAY_MOVE_TO_MATMUL:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        mm = _last_matmul(value, order)
        if mm is None:
            continue
        with graph.inserting_after(mm):
            new = graph.call_function(stamp.target, (mm, ring, (lab & ~MAY_MOVE_TO_MATMUL) | AFTER_MATMUL))
        val = mm.meta.get("val")
        if isinstance(val, torch.Tensor):
            fake_mode = getattr(val, "fake_mode", None)
            if fake_mode is not None:
                with fake_mode:
                    new.meta["val"] = torch.empty_like(val)
            else:
                new.meta["val"] = torch.empty_like(val)
        mm.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        stamp.replace_all_uses_with(value)
        graph.erase_node(stamp)
        moved += 1
    return moved


class MoveStampsToLastMatmul(CustomGraphPass):
    """:func:`move_stamps_to_last_matmul` as inductor's post-grad custom pass."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        move_stamps_to_last_matmul(graph)

    def uuid(self) -> Any:
        # inductor's FX-graph cache keys on this: a change to the pass is a new key
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


class StampPassSlot:
    """The pass in inductor's ``post_grad_custom_pre_pass`` while a tracer needs it; the
    value before it put back exactly. A slot another tool already fills is refused (one
    pass per slot; running ours in its place would silently drop the user's)."""

    def __init__(self) -> None:
        self._saved: tuple[Any] | None = None

    def place(self) -> None:
        if self._saved is not None:
            return
        import torch._inductor.config as inductor_config

        current = inductor_config.post_grad_custom_pre_pass
        if current is not None and not isinstance(current, MoveStampsToLastMatmul):
            raise TracingError("layer_marks='matmul' needs inductor's post_grad_custom_pre_pass, which is already "
                               f"set ({type(current).__name__}); use layer_marks='shared' (stamps at the layer "
                               "boundaries) or unset it")
        self._saved = (current,)
        inductor_config.post_grad_custom_pre_pass = MoveStampsToLastMatmul()

    def remove(self) -> None:
        if self._saved is None:
            return
        import torch._inductor.config as inductor_config

        inductor_config.post_grad_custom_pre_pass = self._saved[0]
        self._saved = None
