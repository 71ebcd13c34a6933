"""What one mark costs *inside* a real generate(), as opposed to a tight loop.

  python benchmarks/in_context.py              # GPU: realistic Llama b1, 16 new tokens, pinned to one core
  python benchmarks/in_context.py --cpu-tiny   # CPU smoke run (host timeline; labelled CPU)

mark_cost.py times a mark in a loop, where the driver's code and data stay hot. In a
generate() the host runs Python and launches hundreds of kernels between two marks. This
script wraps every decoder layer's forward with one variant at a time and times whole
generate() calls, interleaved and pinned to one core:

  plain        no wrapper (baseline; plain_again is the A/A row)
  noop         the wrapper alone (a Python frame around each layer)
  host_call    the wrapper + two calls into the native module that touch no CUDA
  event_mark   the wrapper + two stagetrace marks (cudaEventRecord) on the work stream
  side_mark    the same marks on another, idle stream (no ordering against the work)
  stamp_kernel the wrapper + two GPU-side stamp kernel launches instead of events

(variant - plain) / marks is the in-context host cost of one mark.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, pin_cpu, save, table, timed_ms  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--pin-cpu", default="3", metavar="CORES",
                    help="comma-separated cores to pin the process to (threads started later, the CUDA driver's "
                         "included, inherit it); 'none' for no pinning")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    import models
    from stagetrace.testing import tiny
    from stagetrace.low_level import _C, new_timeline

    pin_cpu(args.pin_cpu)
    cuda = torch.cuda.is_available() and not args.cpu_tiny
    case = models.llama_realistic(batch=1) if cuda else tiny.build("llama")
    model = case.model.eval()
    kw = dict(case.inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              **case.generate_kwargs)
    layers = [m for _, m in __import__("stagetrace").trace(model).layout.layers]

    tl = new_timeline("cuda" if cuda else "cpu")
    side_tl = new_timeline("cuda" if cuda else "cpu")
    ring = None
    if cuda:
        tl.bind_stream(torch.cuda.current_stream().cuda_stream)
        side = torch.cuda.Stream()
        side_tl.bind_stream(side.cuda_stream)
        if _C.stamps_compiled():
            ring = _C.StampRing(torch.cuda.current_device(), 1 << 20)
    stream = torch.cuda.current_stream().cuda_stream if cuda else 0

    def before_after(kind: str) -> tuple[Callable[[], None], Callable[[], None]] | None:
        if kind == "noop":
            return (lambda: None), (lambda: None)
        if kind == "host_call":
            return _C.host_now_ns, _C.host_now_ns
        if kind == "event_mark":
            return (lambda: tl.mark(1)), (lambda: tl.mark(2))
        if kind == "side_mark":
            return (lambda: side_tl.mark(1)), (lambda: side_tl.mark(2))
        if kind == "stamp_kernel" and ring is not None:
            return (lambda: ring.stamp(1, stream)), (lambda: ring.stamp(2, stream))
        return None

    def install(kind: str) -> bool:
        hooks = before_after(kind)
        if hooks is None:
            return kind in ("plain", "plain_again")
        pre, post = hooks
        for layer in layers:
            inner = layer.forward

            def forward(*a: Any, _inner: Callable[..., Any] = inner, **k: Any) -> Any:
                pre()
                out = _inner(*a, **k)
                post()
                return out

            layer.forward = forward
        return True

    def uninstall() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)

    def timed() -> float:
        return timed_ms(lambda: model.generate(**kw), cuda)

    kinds = [k for k in ("plain", "noop", "host_call", "event_mark", "side_mark", "stamp_kernel", "plain_again")
             if k in ("plain", "plain_again") or before_after(k) is not None]
    for _ in range(2):
        timed()
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(args.reps):
        for kind in kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]:
            install(kind)
            tl.reset()
            side_tl.reset()
            if ring is not None:
                ring.reset(stream)
            walls[kind].append(timed())
            uninstall()
    marks_per_call = 2 * len(layers) * args.new_tokens  # prefill + (new_tokens - 1) steps, each through every layer
    plain = walls["plain"]
    rows: dict[str, Any] = {}
    for kind, ws in walls.items():
        paired = statistics.median(w - p for w, p in zip(ws, plain))
        rows[kind] = {"median_ms": statistics.median(ws), "paired_extra_ms": paired,
                      "us_per_mark": paired * 1e3 / marks_per_call, "walls_ms": ws}
    env = environment()
    payload = {"benchmark": "in_context", "env": env, "device": "cuda" if cuda else "cpu",
               "model": "realistic Llama b1 (22 layers, bf16)" if cuda else "tiny Llama (CPU smoke run)",
               "marks_per_call": marks_per_call, "params": {k: v for k, v in vars(args).items() if k != "out"},
               "results": rows}
    name = "in_context" if cuda else "in_context-cpu-tiny"
    if args.pin_cpu != "3":  # the default run keeps the plain name
        name += "-pin-" + args.pin_cpu.replace(",", "_")
    path = save(name, payload, args.out)
    print(f"in-context mark cost on {env['card']} ({marks_per_call} marks per call)")
    print(table([[k, v["median_ms"], v["paired_extra_ms"], v["us_per_mark"]] for k, v in rows.items()],
                ["variant", "median ms", "paired extra ms", "µs per mark"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
