"""The failure that started the project, reproduced: stages by subtraction vs stagetrace.

  python benchmarks/subtraction.py [--samples 100]      # GPU: realistic LLaVA-NeXT, varied tiles
  python benchmarks/subtraction.py --cpu-tiny           # CPU smoke run (tiny LLaVA-NeXT)

Per sample (an image size that sets the tile count, 1-4 new tokens), the subtraction
method of the background write-up, each part in its own run with a sync around it:
  vision  = get_image_features() alone
  prefill = one full forward alone - vision
  total   = generate() after torch.cuda.empty_cache()
  decode  = total - vision - prefill
and then stagetrace on the same sample, one generate(), one timeline.
Reported: share of samples with subtracted decode <= 0, the inconsistency
(vision + prefill - total) mean and worst, and stagetrace's for the same samples.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, save, table  # noqa: E402

import torch  # noqa: E402

IMAGE_SIZES = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008), (500, 400), (400, 900), (800, 600)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-tiny", action="store_true")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import stagetrace
    import models
    from stagetrace.testing import tiny

    cuda = torch.cuda.is_available() and not args.cpu_tiny
    rng = random.Random(args.seed)
    if cuda:
        model = models.llava_next_realistic()
        sizes = IMAGE_SIZES
        make = lambda hw, s: models.llava_next_inputs(model, hw, text_len=rng.randint(8, 48), seed=s)  # noqa: E731
    else:
        base = tiny.build("llava_next")
        model = base.model
        sizes = [(32, 32), (32, 64), (64, 32), (64, 64)]

        def make(hw, s):
            return tiny.build("llava_next", tiles_hw=hw, seed=0).inputs | {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def wall_ms(fn) -> float:
        sync()
        t0 = time.perf_counter_ns()
        fn()
        sync()
        return (time.perf_counter_ns() - t0) / 1e6

    gk = dict(do_sample=False, pad_token_id=0, suppress_tokens=[model.config.image_token_index])
    tracer = stagetrace.trace(model)
    rows = []
    with torch.no_grad():
        warm = make(sizes[0], 0)
        model.generate(**warm, max_new_tokens=2, **gk)
        for i in range(args.samples):
            hw = rng.choice(sizes)
            n_new = rng.randint(1, 4)
            inputs = make(hw, i)
            img = {k: inputs[k] for k in ("pixel_values", "image_sizes")}
            vision = wall_ms(lambda: model.model.get_image_features(**img))
            forward = wall_ms(lambda: model(**inputs))
            if cuda:
                torch.cuda.empty_cache()
            total = wall_ms(lambda: model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, **gk))
            prefill = forward - vision
            decode = total - vision - prefill
            with tracer:
                model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, **gk)
            rec = tracer.records[-1]
            rows.append({"image_hw": hw, "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": n_new,
                         "sub": {"vision_ms": vision, "prefill_ms": prefill, "total_ms": total, "decode_ms": decode,
                                 "inconsistency_ms": vision + prefill - total},
                         "stagetrace": {"vision_ms": rec.vision_ms, "prefill_ms": rec.prefill_ms,
                                        "decode_ms": rec.decode_ms, "other_ms": rec.other_ms,
                                        "total_ms": rec.total_ms,
                                        "inconsistency_ms": rec.vision_ms + rec.prefill_ms - rec.total_ms}})

    def summary(key: str) -> dict:
        inc = [r[key]["inconsistency_ms"] for r in rows]
        multi = [r for r in rows if r["new_tokens"] > 1]
        return {
            "share_decode_le_0": sum(r[key]["decode_ms"] <= 0 for r in rows) / len(rows),
            "share_decode_le_0_multi_token": (sum(r[key]["decode_ms"] <= 0 for r in multi) / len(multi)
                                              if multi else None),
            "inconsistency_mean_ms": statistics.mean(inc), "inconsistency_worst_ms": max(inc),
            "vision_median_ms": statistics.median(r[key]["vision_ms"] for r in rows),
            "prefill_median_ms": statistics.median(r[key]["prefill_ms"] for r in rows),
        }

    result = {"subtraction": summary("sub"), "stagetrace": summary("stagetrace")}
    env = environment()
    payload = {"benchmark": "subtraction", "env": env, "device": "cuda" if cuda else "cpu",
               "model": ("LLaVA-NeXT, CLIP-L/336 tiles + 22-layer 2048-wide Llama, bf16, random weights"
                         if cuda else "tiny LLaVA-NeXT on the CPU (smoke run)"),
               "params": {"samples": args.samples, "seed": args.seed, "image_sizes": sizes, "new_tokens": "1-4"},
               "results": result, "samples": rows}
    path = save("subtraction" if cuda else "subtraction-cpu-tiny", payload, args.out)
    trows = [[m, f"{100 * s['share_decode_le_0']:.1f}%",
              f"{100 * s['share_decode_le_0_multi_token']:.1f}%" if s["share_decode_le_0_multi_token"] is not None
              else "-", s["inconsistency_mean_ms"], s["inconsistency_worst_ms"], s["vision_median_ms"],
              s["prefill_median_ms"]] for m, s in result.items()]
    print(f"subtraction vs stagetrace on {env['card']}, {args.samples} samples")
    print(table(trows, ["method", "decode<=0", "decode<=0 (>1 tok)", "incons. mean ms", "incons. worst ms",
                        "vision med ms", "prefill med ms"]))
    print("inconsistency = vision + prefill - total (> 0 means the parts outgrew the whole)")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
