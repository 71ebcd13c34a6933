"""Records of made-up calls whose latencies follow a known model: for testing ``compare`` and ``fit``."""
from __future__ import annotations

import copy
from typing import Iterable

import numpy as np

from ..records import StageRecord

__all__ = ["latency_records", "scaled", "TRUE_MODEL"]

# The generator's truth (ms), per call of P prompt tokens, batch B, step i of the decode:
TRUE_MODEL = {
    "vision_ms": lambda p, b: 4.0 + 0.002 * b * p,
    "prefill_ms": lambda p, b: 2.0 + 0.01 * b * p + 2e-6 * b * p * p,
    "step_ms": lambda ctx, b: 1.0 + 0.1 * b + 0.0005 * b * ctx,
    "other_ms": lambda p, b: 0.5,
}


def latency_records(n: int, seed: int = 0, noise: float = 0.02, vision: bool = True, batch_sizes=(1, 2, 4),
                    prompt_tokens=(50, 2000), output_tokens=(1, 40), id_prefix: str = "s") -> list[StageRecord]:
    """``n`` records drawn from :data:`TRUE_MODEL`, each stage times (1 + ``noise`` × N(0, 1))."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, t = int(rng.integers(*prompt_tokens)), int(rng.integers(*output_tokens))
        b = int(rng.choice(batch_sizes))

        def jitter() -> float:
            return 1 + noise * float(rng.standard_normal())

        vis = TRUE_MODEL["vision_ms"](p, b) * jitter() if vision else None
        prefill = TRUE_MODEL["prefill_ms"](p, b) * jitter()
        steps = [TRUE_MODEL["step_ms"](p + 1 + j, b) * jitter() for j in range(t - 1)]
        other = TRUE_MODEL["other_ms"](p, b) * jitter()
        decode = float(sum(steps))
        out.append(StageRecord(total_ms=(vis or 0.0) + prefill + decode + other, vision_ms=vis, prefill_ms=prefill,
                               decode_ms=decode, other_ms=other, ttft_ms=(vis or 0.0) + prefill + other / 2,
                               decode_step_ms=steps, batch_size=b, prompt_tokens=p, output_tokens=t,
                               sample_id=f"{id_prefix}{i}"))
    return out


def scaled(records: Iterable[StageRecord], factor: float, noise: float = 0.0, seed: int = 1,
           ids: bool = True) -> list[StageRecord]:
    """Copies of ``records`` with every time × ``factor`` (× (1 + ``noise`` × N(0, 1)) per record);
    ``ids=False`` drops their sample ids."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        f = factor * (1 + noise * float(rng.standard_normal()))
        c = copy.copy(r)
        for name in ("total_ms", "vision_ms", "prefill_ms", "decode_ms", "other_ms", "ttft_ms"):
            v = getattr(r, name)
            setattr(c, name, None if v is None else v * f)
        c.decode_step_ms = [s * f for s in r.decode_step_ms]
        c.sample_id = r.sample_id if ids else None
        out.append(c)
    return out
