"""Do layer stamps block the compiler's fusion? Kernels inductor generates for one forward.

  python benchmarks/stamp_fusion.py              # GPU: realistic Llama (triton kernels)
  python benchmarks/stamp_fusion.py --cpu-tiny   # CPU: tiny Llama (C++ kernels; labelled CPU)

Issue 14 asks for stamps that do not block fusion. A stamp today is a copy of the hidden
state at a layer boundary (``graph_stamps``): the copy is a data dependency that pins the
stamp there, and it splits the kernel that would fuse the layer's residual add with the next
layer's input norm. This compiles the decoder stack's forward (no cache, so one graph
holds every layer) with inductor three ways, fresh each time, and counts the kernels it
generates (``torch._inductor.metrics.generated_kernel_count``; the stamps themselves are
extern calls, not counted):

  plain            no stamps
  boundary         the tracer's stamps (layer_marks="pair"): a copy of each layer's input and output
  shared           layer_marks="shared": one stamp per boundary between layers
  matmul           layer_marks="matmul": the stamps of "shared", moved by the tracer's inductor pass
                   (``tracing.stamp_placement``) to right after each layer's last matmul; the first
                   layer's begin stays on its input (it follows no matmul)
  after_last_mm    one stamp on the output of each layer's last matrix multiply (found by
                   running the layer once and recording which ``nn.Linear`` ran last; no
                   names): a matmul's output is materialized anyway, so nothing fuses across
                   it — the residual add and the next layer's input norm then count to the
                   next layer, a different boundary that a record would have to say

Kernels above plain are fusions lost. The GPU cost of each way in a decode step needs
``compiled.py`` on a GPU; this only shows where fusion breaks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, save, table  # noqa: E402


def last_linear_of_each_layer(layers: list[Any], run: Callable[[], Any]) -> list[Any]:
    """The ``nn.Linear`` (or any module with a 2-d ``weight``) each layer ran last in ``run()``."""
    import torch

    last: dict[int, Any] = {}
    handles = []
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            w = getattr(mod, "weight", None)
            if mod is not layer and isinstance(w, torch.Tensor) and w.dim() == 2 and not list(mod.children()):
                handles.append(mod.register_forward_hook(lambda m, a, o, _i=i: last.__setitem__(_i, m)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(layers)) if i not in last]
    if missing:
        raise RuntimeError(f"layers {missing} ran no matrix multiply")
    return [last[i] for i in range(len(layers))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    from torch._inductor import metrics

    import models
    import stagetrace
    from stagetrace.labels import AFTER_MATMUL, MAY_MOVE_TO_MATMUL, Kind, label, layer_labels
    from stagetrace.tracing.stamp_placement import MoveStampsToLastMatmul, movable_label
    from stagetrace.low_level import graph_stamps
    from stagetrace.testing import tiny

    cuda = torch.cuda.is_available() and not args.cpu_tiny
    case = models.llama_realistic(batch=1) if cuda else tiny.build("llama")
    model = case.model.eval()
    device = torch.device("cuda" if cuda else "cpu")
    layout = stagetrace.trace(model).layout
    layers = [m for _, m in layout.layers]
    text_model = layout.language_model[1]
    ids = case.inputs["input_ids"]
    ring = graph_stamps.ring_for(device)
    rid = graph_stamps.ring_id(ring)
    op = torch.ops.stagetrace.stamp.default

    def forward() -> Any:
        return text_model(input_ids=ids, use_cache=False).last_hidden_state

    last_mm = last_linear_of_each_layer(layers, forward)

    def boundary(i: int, layer: Any) -> tuple[Any, Callable[..., Any]]:
        inner = layer.forward

        def fwd(*a: Any, **k: Any) -> Any:
            a = (op(a[0], rid, label(Kind.LAYER_BEGIN, i)),) + a[1:]
            out = inner(*a, **k)
            return op(out, rid, label(Kind.LAYER_END, i)) if isinstance(out, torch.Tensor) else out
        return layer, fwd

    def after_last_mm(i: int, layer: Any) -> tuple[Any, Callable[..., Any]]:
        mod = last_mm[i]
        inner = mod.forward

        def fwd(x: Any) -> Any:
            return op(inner(x), rid, label(Kind.LAYER_END, i))
        return mod, fwd

    shared_labels = layer_labels(len(layers), "shared")
    matmul_labels = [tuple(lab | MAY_MOVE_TO_MATMUL if lab is not None and movable_label(lab) else lab for lab in pair)
                     for pair in shared_labels]  # as the tracer places them under layer_marks="matmul"

    def shared(i: int, layer: Any, labels: list[Any] = shared_labels) -> tuple[Any, Callable[..., Any]]:
        inner = layer.forward
        begin, end = labels[i]

        def fwd(*a: Any, **k: Any) -> Any:
            a = (op(a[0], rid, begin),) + a[1:]
            out = inner(*a, **k)
            return op(out, rid, end) if end is not None and isinstance(out, torch.Tensor) else out
        return layer, fwd

    ways: dict[str, Callable[[int, Any], tuple[Any, Callable[..., Any]]] | None] = {
        "plain": None, "boundary": boundary, "shared": shared,
        "matmul": lambda i, layer: shared(i, layer, matmul_labels), "after_last_mm": after_last_mm}
    import torch._inductor.config as inductor_config

    rows: dict[str, Any] = {}
    reference = None
    for name, place in ways.items():
        placed = [place(i, layer) for i, layer in enumerate(layers)] if place else []
        for mod, fwd in placed:
            mod.forward = fwd
        try:
            torch._dynamo.reset()
            metrics.reset()
            ring.reset(0)
            compiled = torch.compile(forward, backend="inductor")
            t0 = time.perf_counter()
            with torch.no_grad(), inductor_config.patch(
                    post_grad_custom_pre_pass=MoveStampsToLastMatmul() if name == "matmul" else None,
                    fx_graph_cache=False):
                out = compiled()
            if cuda:
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            stamped = ring.read(torch.cuda.current_stream().cuda_stream if cuda else 0)[0]
        finally:
            for mod, _ in placed:
                mod.__dict__.pop("forward", None)
        if reference is None:
            reference = out
        rows[name] = {"kernels": int(metrics.generated_kernel_count), "stamps": len(stamped),
                      "stamps_after_matmul": int(((stamped & AFTER_MATMUL) != 0).sum()), "compile_s": compile_s,
                      "same_output": bool(torch.allclose(out.float(), reference.float(), atol=1e-3, rtol=1e-3)),
                      # bf16: fusing differently rounds differently; how far apart, against the output's scale
                      "max_abs_diff": float((out.float() - reference.float()).abs().max()),
                      "output_abs_max": float(reference.float().abs().max())}
    for r in rows.values():
        r["kernels_over_plain"] = r["kernels"] - rows["plain"]["kernels"]
    env = environment()
    payload = {"benchmark": "stamp_fusion", "env": env, "device": device.type,
               "model": "realistic Llama (22 layers, bf16)" if cuda else "tiny Llama (CPU, C++ kernels)",
               "layers": len(layers), "last_mm": sorted({type(m).__name__ for m in last_mm}),
               "results": rows}
    path = save("stamp_fusion" if cuda else "stamp_fusion-cpu-tiny", payload, args.out)
    print(f"kernels inductor generates for the decoder stack's forward on {env['card']} ({len(layers)} layers)")
    print(table([[k, v["stamps"], v["stamps_after_matmul"], v["kernels"], v["kernels_over_plain"], v["same_output"],
                  v["max_abs_diff"], v["compile_s"]] for k, v in rows.items()],
                ["way", "stamps", "after matmul", "kernels", "over plain", "same output", "max |diff|", "compile s"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
