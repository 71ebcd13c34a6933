"""Is each stage host-bound or GPU-bound? The GPU lead (lead.py) checked on cases of known kind.

  python benchmarks/lead.py              # GPU: the realistic Llama (22 layers, 2048 wide, bf16, random weights)
  python benchmarks/lead.py --cpu-tiny   # CPU smoke run: tiny Llama (one clock: every lead is 0, verdict n/a)

Cases, each traced at stage level and with every layer marked (``layer_detail="all"``):

  b1_eager        batch 1, 608-token prompt, eager: decode is launch-bound -> steps host-bound
  b32_eager       batch 32 of the same prompt: the prefill (19k tokens) is GPU-bound (at stage level
                  its one mark inside gives a lower bound that misses the host's issue time: >= 50%)
  b1_spin         b1_eager with a known spin (--spin-us of GPU work) queued after one decode step's
                  last layer: that step's GPU-bound time grows by the spin, its lead and its time too;
                  the other steps stay host-bound. (Queued at the step's first layer, a spin shorter
                  than the step's remaining launch time is absorbed: the GPU catches up while the
                  host still launches — which the lead shows, and which is why it is queued last.)
  b1_long_spin    the same with a spin 100x as long: the spin now dominates the step -> gpu-bound
  b1_compiled     generate()'s own compiled decode (static cache, CUDA graphs): the host launches a
                  step at once, so at the forward's return the GPU still runs it -> steps GPU-bound

Each case states what it must show (``expect``) and the script prints PASS/FAIL per check from the
records themselves; nothing here is tuned to pass. With layer detail the lead is dense: one value
per layer boundary (2 x layers + the forward's return per step).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, save, table  # noqa: E402


CASES = ("b1_eager", "b32_eager", "b1_spin", "b1_long_spin", "b1_compiled")


def _last_layer(model: Any) -> tuple[Any, int]:
    """(the last decoder layer, how many there are), as the tracer finds them."""
    from stagetrace.layouts import resolve_layout

    layers = resolve_layout(model).layers
    if not layers:
        raise SystemExit(f"no decoder layer list found in {type(model).__name__}")
    return layers[-1][1], len(layers)


def trace_case(case: Any, kw: dict[str, Any], detail: str, reps: int, warmup: int,
               spin: Callable[[], None] | None = None, spin_step: int | None = None) -> list[Any]:
    """``reps`` traced calls after ``warmup`` untraced ones; ``spin`` runs (queues GPU work) after
    the last layer of decode step ``spin_step`` of every traced call."""
    import torch

    import stagetrace

    for _ in range(warmup):
        case.model.generate(**kw)
    last, _ = _last_layer(case.model)
    forwards = [0]

    def spin_hook(module: Any, args: Any, out: Any) -> None:
        forwards[0] += 1
        if forwards[0] == spin_step + 2:  # forward 1 is the prefill, forward 2 decode step 0
            spin()

    records = []
    with torch.no_grad():
        for _ in range(reps):
            handle = last.register_forward_hook(spin_hook) if spin is not None else None
            forwards[0] = 0
            try:
                with stagetrace.trace(case.model, layer_detail=detail) as tracer:
                    case.model.generate(**kw)
            finally:
                if handle is not None:
                    handle.remove()
            records += tracer.records
    return records


def summarize(records: list[Any], spin_step: int | None) -> dict[str, Any]:
    """What the records say about the lead: per stage, per step, and around the spin step."""
    out: dict[str, Any] = {"calls": len(records), "errors": [r.error for r in records if r.error]}
    ok = [r for r in records if not r.error]
    out["stages"] = {
        stage: {"verdicts": dict(Counter(r.lead[stage]["verdict"] for r in ok if stage in r.lead)),
                "median_lead_us": _med([r.lead[stage]["median_us"] for r in ok if stage in r.lead]),
                "max_lead_us": _med([r.lead[stage]["max_us"] for r in ok if stage in r.lead]),
                "median_gpu_bound_share": _med([r.lead[stage]["gpu_bound_share"] for r in ok if stage in r.lead]),
                "marks_per_call": _med([r.lead[stage]["marks"] for r in ok if stage in r.lead])}
        for stage in ("vision", "prefill", "decode") if any(stage in r.lead for r in ok)}
    steps = [(i, v, lead, ms, gb) for r in ok for i, (v, lead, ms, gb) in
             enumerate(zip(r.decode_step_verdict, r.decode_step_lead_us, r.decode_step_ms, r.decode_step_gpu_bound_ms))]
    rest = [s for s in steps if s[0] != spin_step]
    out["steps"] = {"verdicts": dict(Counter(s[1] for s in rest)), "median_lead_us": _med([s[2] for s in rest]),
                    "median_step_ms": _med([s[3] for s in rest]), "median_gpu_bound_ms": _med([s[4] for s in rest]),
                    "n": len(rest)}
    if spin_step is not None:
        hit = [s for s in steps if s[0] == spin_step]
        out["spin_step"] = {"index": spin_step, "verdicts": dict(Counter(s[1] for s in hit)),
                            "median_lead_us": _med([s[2] for s in hit]),
                            "max_lead_us": _med([max(_step_leads(r, spin_step)) for r in ok]),
                            "median_step_ms": _med([s[3] for s in hit]),
                            "median_gpu_bound_ms": _med([s[4] for s in hit]),
                            "extra_ms": _med([s[3] for s in hit]) - out["steps"]["median_step_ms"],
                            "extra_gpu_bound_ms": _med([s[4] for s in hit]) - out["steps"]["median_gpu_bound_ms"]}
    out["steps"]["median_graph_layers_ms"] = _med([x for r in ok for x in _layers_per_step_ms(r)])
    out["lead_values_per_step"] = _med([_marks_per_step(r) for r in ok])
    out["compiled_decode"] = all(r.compiled_decode for r in ok)
    return out


def _med(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _usable(rec: Any) -> Any:
    """The marks whose lead counts (lead.py's own rule): host-issued, not a forward boundary."""
    import numpy as np

    from stagetrace.labels import kind_of
    from stagetrace.lead import BOUNDARY_KINDS, lead_ns

    m = rec.marks
    usable = ~np.isin(kind_of(m.labels), BOUNDARY_KINDS) & m.issued_by_host
    return m.device_ns, lead_ns(m.device_ns, m.host_ns) / 1e3, usable


def _step_leads(rec: Any, k: int) -> list[float]:
    t, lead_us, usable = _usable(rec)
    step = [s for s in rec.spans if s.kind == "step" and s.index == k][0]
    sel = usable & (t > step.start_ns) & (t <= step.end_ns)
    return lead_us[sel].tolist() or [float("nan")]


def _layers_per_step_ms(rec: Any) -> list[float]:
    """Per decode step: from its first layer's start to its last layer's end (GPU time)."""
    out = []
    layers = [s for s in rec.spans if s.kind == "layer"]
    for st in (s for s in rec.spans if s.kind == "step"):
        inside = [s for s in layers if st.start_ns <= s.start_ns and s.end_ns <= st.end_ns]
        if inside:
            out.append((max(s.end_ns for s in inside) - min(s.start_ns for s in inside)) / 1e6)
    return out


def _marks_per_step(rec: Any) -> float | None:
    t, _, usable = _usable(rec)
    counts = [int((usable & (t > s.start_ns) & (t <= s.end_ns)).sum()) for s in rec.spans if s.kind == "step"]
    return statistics.median(counts) if counts else None


def checks(name: str, detail: str, s: dict[str, Any], cuda: bool, n_layers: int, spin_us: float) -> list[list[Any]]:
    """(case, detail, check, measured, pass) rows: what each case must show."""
    rows: list[list[Any]] = []

    def check(what: str, measured: Any, ok: bool) -> None:
        rows.append([name, detail, what, measured, "PASS" if ok else "FAIL"])

    check("no call failed", len(s["errors"]), not s["errors"])
    if not cuda:
        v = s["steps"]["verdicts"]
        check("CPU: every verdict n/a, lead 0", f"{v} / {s['steps']['median_lead_us']}",
              set(v) == {"n/a"} and s["steps"]["median_lead_us"] == 0.0)
        return rows
    steps = s["steps"]["verdicts"]
    share = lambda v: steps.get(v, 0) / max(1, s["steps"]["n"])  # noqa: E731
    if name in ("b1_eager", "b1_spin", "b1_long_spin"):
        check("decode steps host-bound (>= 90%)", f"{share('host-bound'):.0%} {steps}", share("host-bound") >= 0.9)
    if name == "b32_eager":
        pv = s["stages"]["prefill"]["verdicts"]
        if detail == "all":
            check("prefill gpu-bound", pv, set(pv) == {"gpu-bound"})
        else:  # one mark: the lower bound misses the host's issue time at the prefill's start
            share = s["stages"]["prefill"]["median_gpu_bound_share"]
            check("prefill not host-bound, GPU-bound >= 50% (lower bound)", f"{pv} {share:.0%}",
                  "host-bound" not in pv and share >= 0.5)
    if name in ("b1_spin", "b1_long_spin"):
        sp = s["spin_step"]
        check(f"spin step's GPU-bound time grows by the spin ({spin_us / 1e3:.1f} ms, +-15%)",
              f"{sp['extra_gpu_bound_ms']:.3f} ms", abs(sp["extra_gpu_bound_ms"] * 1e3 - spin_us) <= 0.15 * spin_us)
        check(f"spin step's max lead ~ spin ({spin_us:.0f} us, +-15%)", f"{sp['max_lead_us']:.0f} us",
              abs(sp["max_lead_us"] - spin_us) <= 0.15 * spin_us)
        if name == "b1_long_spin":  # a short spin partly overlaps the host work left after the last layer
            check(f"spin step longer by ~ spin ({spin_us / 1e3:.1f} ms, +-15%)", f"{sp['extra_ms']:.3f} ms",
                  abs(sp["extra_ms"] * 1e3 - spin_us) <= 0.15 * spin_us)
            check("spin step gpu-bound", sp["verdicts"], set(sp["verdicts"]) == {"gpu-bound"})
    if name == "b1_compiled":
        check("compiled decode on", s["compiled_decode"], s["compiled_decode"])
        check("compiled steps not host-bound (>= 90%)", f"{1 - share('host-bound'):.0%} {steps}",
              share("host-bound") <= 0.1)
        if detail == "all":  # the graph's own GPU time, from its stamps, is the known truth here
            gb, graph = s["steps"]["median_gpu_bound_ms"], s["steps"]["median_graph_layers_ms"]
            check("GPU-bound time >= 0.8 x the graph's layers' GPU time (stamps)", f"{gb:.3f} vs {graph:.3f} ms",
                  gb >= 0.8 * graph)
    if detail == "all" and name != "b1_compiled":  # compiled: stamps carry no issue time of their own
        per = s["lead_values_per_step"]
        check("a lead per layer boundary + the return", per, per == 2 * n_layers + 1)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny Llama on the CPU (smoke run)")
    ap.add_argument("--reps", type=int, default=3, help="traced calls per case and detail")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--spin-us", type=float, default=3000.0)
    ap.add_argument("--spin-step", type=int, default=10)
    ap.add_argument("--cases", default="b1_eager,b32_eager,b1_spin,b1_long_spin,b1_compiled")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    import models
    from stagetrace.testing import tiny

    cuda = torch.cuda.is_available() and not args.cpu_tiny
    env = environment()
    spin_step = min(args.spin_step, args.new_tokens - 2)
    cycles_per_us = 0.0
    if cuda:
        from stagetrace.testing.reference import spin_cycles_per_us

        cycles_per_us = spin_cycles_per_us()
    results: list[dict] = []
    rows: list[list[Any]] = []
    for name in args.cases.split(","):
        batch = 32 if name == "b32_eager" else 1
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}: pick from {', '.join(CASES)}")
        case = models.llama_realistic(batch=batch) if cuda else tiny.build("llama", batch=min(batch, 2))
        case.model.eval()
        _, n_layers = _last_layer(case.model)
        kw = dict(case.inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  **case.generate_kwargs)
        if name == "b1_compiled":
            if not cuda:
                from transformers import CompileConfig

                cfg = CompileConfig(backend="eager", mode=None)
                cfg._compile_all_devices = True
                kw["compile_config"] = cfg
            case.model.generation_config.cache_implementation = "static"
        spin, spin_us = None, args.spin_us * (100 if name == "b1_long_spin" else 1)
        if name in ("b1_spin", "b1_long_spin"):
            cycles = int(cycles_per_us * spin_us)
            spin = (lambda: torch.cuda._sleep(cycles)) if cuda else (lambda: None)
        for detail in ("off", "all"):
            recs = trace_case(case, kw, detail, args.reps, args.warmup, spin, spin_step if spin else None)
            s = summarize(recs, spin_step if spin else None)
            s.update(case=name, layer_detail=detail, batch=batch, layers=n_layers, spin_us=spin_us if spin else None)
            results.append(s)
            rows += checks(name, detail, s, cuda, n_layers, spin_us)
        del case
        if cuda:
            torch.cuda.empty_cache()

    payload = {"benchmark": "lead", "env": env, "device": "cuda" if cuda else "cpu",
               "model": ("realistic Llama (22 layers, 2048 wide, bf16, random weights), 608-token prompt"
                         if cuda else "tiny random-weight Llama on the CPU (smoke run)"),
               "params": {k: v for k, v in vars(args).items() if k != "out"}, "results": results,
               "checks": [dict(zip(["case", "layer_detail", "check", "measured", "result"], r)) for r in rows],
               "all_pass": all(r[-1] == "PASS" for r in rows)}
    path = save("lead" if cuda else "lead-cpu-tiny", payload, args.out)
    view = [[s["case"], s["layer_detail"], str(s["stages"].get("prefill", {}).get("verdicts", "")),
             s["stages"].get("prefill", {}).get("median_lead_us") or 0.0, str(s["steps"]["verdicts"]),
             s["steps"]["median_lead_us"] or 0.0, s["steps"]["median_step_ms"] or 0.0,
             s["steps"]["median_gpu_bound_ms"] or 0.0, s["lead_values_per_step"] or 0] for s in results]
    print(table(view, ["case", "layers", "prefill verdicts", "prefill lead µs", "step verdicts", "step lead µs",
                       "step ms", "step GPU-bound ms", "leads/step"]))
    print(table([[str(c) for c in r] for r in rows], ["case", "layers", "check", "measured", "result"]))
    print(f"{'all checks pass' if payload['all_pass'] else 'SOME CHECKS FAIL'}; wrote {path}")
    return payload


if __name__ == "__main__":
    main()
