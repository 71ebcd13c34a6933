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
  boundary         the tracer's stamps: a copy of each layer's input and output
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
    from stagetrace.labels import Kind, label
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

    ways: dict[str, Callable[[int, Any], tuple[Any, Callable[..., Any]]] | None] = {
        "plain": None, "boundary": boundary, "after_last_mm": after_last_mm}
    rows: dict[str, Any] = {}
    reference = None
    for name, place in ways.items():
        placed = [place(i, layer) for i, layer in enumerate(layers)] if place else []
        for mod, fwd in placed:
            mod.forward = fwd
        try:
            torch._dynamo.reset()
            metrics.reset()
            compiled = torch.compile(forward, backend="inductor")
            t0 = time.perf_counter()
            with torch.no_grad():
                out = compiled()
            compile_s = time.perf_counter() - t0
        finally:
            for mod, _ in placed:
                mod.__dict__.pop("forward", None)
        if reference is None:
            reference = out
        rows[name] = {"kernels": int(metrics.generated_kernel_count), "stamps": 2 * len(placed) if place is boundary
                      else len(placed), "compile_s": compile_s,
                      "same_output": bool(torch.allclose(out.float(), reference.float(), atol=1e-3, rtol=1e-3))}
    for r in rows.values():
        r["kernels_over_plain"] = r["kernels"] - rows["plain"]["kernels"]
    env = environment()
    payload = {"benchmark": "stamp_fusion", "env": env, "device": device.type,
               "model": "realistic Llama (22 layers, bf16)" if cuda else "tiny Llama (CPU, C++ kernels)",
               "layers": len(layers), "last_mm": sorted({type(m).__name__ for m in last_mm}),
               "results": rows}
    path = save("stamp_fusion" if cuda else "stamp_fusion-cpu-tiny", payload, args.out)
    print(f"kernels inductor generates for the decoder stack's forward on {env['card']} ({len(layers)} layers)")
    print(table([[k, v["stamps"], v["kernels"], v["kernels_over_plain"], v["same_output"], v["compile_s"]]
                 for k, v in rows.items()], ["way", "stamps", "kernels", "over plain", "same output", "compile s"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
