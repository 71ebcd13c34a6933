"""Host cost of one mark, and of resolving it, against what users do today.

  python benchmarks/mark_cost.py [--n 100000] [--reps 7] [--out DIR]

Methods (host µs per mark, median over repetitions):
  native_cpp          cudaEventRecord in a C++ loop (the floor)
  stagetrace          Timeline.mark(label) from Python (the hot path)
  torch_event_new     torch.cuda.Event(enable_timing=True) + .record() from Python
  torch_event_record  .record() on a pre-made torch.cuda.Event from Python
  sync_perf_counter   torch.cuda.synchronize() + time.perf_counter() (the usual hook)
  layer_wrapper       added host cost per mark of a layer mark as the tracer places it (a
                      wrapped forward: begin + end mark around a module call), vs
  layer_module_hooks  the same two marks placed by forward pre/post module hooks
and resolve cost per mark (after the GPU is idle, so it is the work, not the wait), and
  after_call          everything done after generate() returns, per mark (the one wait,
                      resolve, stage math on both clocks, the record), at --n marks
On a machine without CUDA it measures the host backend and says so.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, save, table  # noqa: E402


def per_mark_us(fn, n: int, reps: int) -> tuple[float, list[float]]:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn(n)
        samples.append((time.perf_counter_ns() - t0) / n / 1e3)
    return statistics.median(samples), samples


def layer_mark_costs(tl, n: int, reps: int, cuda: bool) -> dict[str, dict]:
    """Host µs added per layer mark, through the tracer's own wrapper and through module hooks.

    Noise-free where whole-generate() timings are not: multiply by the marks of a call and
    divide by its wall time for the layer-detail overhead of a host-bound decode.
    """
    import torch
    from torch import nn

    from stagetrace.tracing.call import CallSlot, CallState
    from stagetrace.tracing.eager import layer_forward

    x = torch.zeros(4, device="cuda" if cuda else "cpu")
    slot = CallSlot()
    slot.call = CallState(prompt_len=0, fed=0, forward_compiled=False, stamping=False, in_prefill=True, layers_now=True)
    mark = tl.mark
    plain, wrapped, hooked = nn.Identity(), nn.Identity(), nn.Identity()
    wrapped.forward = layer_forward(wrapped.forward, slot, mark, 9, 10)  # as the tracer does
    hooked.register_forward_pre_hook(lambda m, a: mark(9))
    hooked.register_forward_hook(lambda m, a, o: mark(10))
    k = max(n // 2, 1000)

    def loop(module):
        def run(count: int) -> None:
            tl.reset()
            for _ in range(count):
                module(x)
        return run

    base, _ = per_mark_us(loop(plain), k, reps)
    out = {}
    for name, module in (("layer_wrapper", wrapped), ("layer_module_hooks", hooked)):
        loop(module)(1000)
        med, samples = per_mark_us(loop(module), k, reps)
        # two marks per call: the added cost of the call, per mark
        out[name] = {"median_us": (med - base) / 2, "samples_us": [(s - base) / 2 for s in samples]}
    return out


def after_call_cost(n_marks: int, reps: int, cuda: bool) -> dict:
    """Host µs per mark of everything done after generate() returns — the one wait, resolve,
    stage math on both clocks, the record — exactly as the tracer does it
    (``Marks.from_timeline`` + ``tracing.record.build_record``), for one call of about
    ``n_marks`` marks: layer detail (pair marks) on 24 layers at every step."""
    import torch

    from stagetrace.labels import Kind, label, layer_labels
    from stagetrace.low_level import Marks, new_timeline
    from stagetrace.tracing.record import build_record

    layers = [lab for pair in layer_labels(24, "pair") for lab in pair]
    steps = max((n_marks - 5 - len(layers)) // (1 + len(layers)), 1)
    seq = ([label(Kind.CALL_BEGIN), label(Kind.PREFILL_FORWARD), label(Kind.LM_BEGIN)] + layers
           + [label(Kind.LM_HEAD_END)] + ([label(Kind.DECODE_FORWARD)] + layers) * steps + [label(Kind.CALL_END)])
    tl = new_timeline("cuda" if cuda else "cpu", torch.cuda.current_device() if cuda else 0, capacity=len(seq))
    if cuda:
        tl.bind_streams([torch.cuda.current_stream().cuda_stream])
    meta = dict(batch_size=1, prompt_tokens=1, output_tokens=steps + 1)
    samples = []
    for _ in range(reps):
        tl.reset()
        for lab in seq:
            tl.mark(lab)
        t0 = time.perf_counter_ns()
        rec = build_record(Marks.from_timeline(tl), meta, None, None, keep_marks=True)
        samples.append((time.perf_counter_ns() - t0) / len(seq) / 1e3)
        assert rec.error is None and len(rec.decode_step_ms) == steps, rec.error
    return {"after_call": {"median_us": statistics.median(samples), "samples_us": samples, "marks": len(seq)}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cpu", action="store_true", help="measure the host backend even where a GPU is usable")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    import stagetrace
    from stagetrace.low_level import _C

    env = environment()
    cuda = stagetrace.backend_info().cuda_devices > 0 and torch.cuda.is_available() and not args.cpu
    n, reps = args.n, args.reps
    results: dict[str, dict] = {}

    if cuda:
        dev = torch.cuda.current_device()
        stream = torch.cuda.current_stream().cuda_stream
        tl = _C.CudaTimeline(dev, capacity=n)
        tl.bind_stream(stream)
    else:
        tl = _C.HostTimeline(capacity=n)
    mark = tl.mark

    def run_native(k: int) -> None:
        tl.reset()
        for _ in range(k):
            mark(1)

    def run_resolve(k: int) -> None:
        tl.reset()
        for _ in range(k):
            mark(1)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        tl.resolve()
        resolve_ns.append((time.perf_counter_ns() - t0) / k)

    run_native(1000)  # warm-up
    results["stagetrace"] = dict(zip(("median_us", "samples_us"), per_mark_us(run_native, n, reps)))
    resolve_ns: list[float] = []
    for _ in range(reps):
        run_resolve(n)
    results["resolve"] = {"median_us": statistics.median(resolve_ns) / 1e3, "samples_us": [x / 1e3 for x in resolve_ns]}

    if cuda:
        floor = [_C.bench_event_record_ns(dev, n, stream) / 1e3 for _ in range(reps)]
        results["native_cpp"] = {"median_us": statistics.median(floor), "samples_us": floor}
        m = max(n // 10, 1000)

        def torch_new(k: int) -> None:
            evs = []
            for _ in range(k):
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                evs.append(e)
            torch.cuda.synchronize()

        made = [torch.cuda.Event(enable_timing=True) for _ in range(m)]

        def torch_record(k: int) -> None:
            for e in made[:k]:
                e.record()
            torch.cuda.synchronize()

        def sync_pc(k: int) -> None:
            stamps = []
            for _ in range(k):
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())

        for name, fn in (("torch_event_new", torch_new), ("torch_event_record", torch_record),
                         ("sync_perf_counter", sync_pc)):
            fn(100)
            results[name] = dict(zip(("median_us", "samples_us"), per_mark_us(fn, m, reps)))

    results.update(layer_mark_costs(tl, n, reps, cuda))
    results.update(after_call_cost(n, reps, cuda))
    payload = {"benchmark": "mark_cost", "env": env, "device": "cuda" if cuda else "cpu", "params": {"n": n, "reps": reps, "cuda": cuda},
               "results": results,
               "targets": {"stagetrace_median_us": 1.6, "resolve_median_us": 0.1, "after_call_median_us": 1.0}}
    path = save("mark_cost" if cuda else "mark_cost-cpu", payload, args.out)
    order = ["native_cpp", "stagetrace", "layer_wrapper", "layer_module_hooks", "torch_event_record",
             "torch_event_new", "sync_perf_counter", "resolve", "after_call"]
    rows = [[k, results[k]["median_us"], min(results[k]["samples_us"])] for k in order if k in results]
    print(f"mark cost on {env['card']} (torch {env['torch']}, {'CUDA events' if cuda else 'host backend'})")
    print(table(rows, ["method", "median µs/mark", "min µs/mark"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
