"""What every benchmark result names: card, driver, CUDA, torch, transformers, date."""
from __future__ import annotations

import datetime as _dt
import gc
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    import torch
    import transformers

    import stagetrace

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "stagetrace": stagetrace.__version__, "backend": str(stagetrace.backend_info()),
        "card": "cpu", "driver": None,
    }
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name(0)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def card_slug(env: dict[str, Any]) -> str:
    return "".join(c if c.isalnum() else "-" for c in env["card"]).strip("-").lower() or "cpu"


def save(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{card_slug(payload['env'])}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def timed_ms(fn: Callable[[], Any], cuda: bool) -> float:
    """Host wall ms of ``fn()`` between two syncs (everything it queued has run).

    As timeit does: no collector pauses inside the timed region (callers collect once per
    repetition)."""
    gc.disable()
    try:
        if cuda:
            import torch

            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter_ns() - t0) / 1e6
    finally:
        gc.enable()


def quantile(xs: list[float], q: float) -> float:
    """The sample at quantile ``q`` (nearest rank): for p10/p90 spreads of a handful of runs."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def bootstrap_median_ci(xs: list[float], n: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median: how far the paired median could move by chance."""
    import numpy as np

    if len(xs) < 3:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    a = np.asarray(xs)
    meds = np.median(a[rng.integers(0, len(a), size=(n, len(a)))], axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


class TimedTimeline:
    """A timeline whose ``mark()`` times the native call and nothing else; the rest delegates."""

    def __init__(self, native: Any):
        self._native, self._mark = native, native.mark
        self.backend = native.backend
        self.cost_ns: list[int] = []
        self.labels: list[int] = []

    def mark(self, label: int) -> None:
        now = time.perf_counter_ns
        t0 = now()
        self._mark(label)
        t1 = now()
        self.cost_ns.append(t1 - t0)
        self.labels.append(label)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._native, name)

    def __len__(self) -> int:
        return len(self._native)


def pin_cpu(cores: str | int | None) -> None:
    """Pins this process to ``cores`` ("3", "3,4", 3; None or "none": no pinning) and torch to
    one thread: threads started later, the CUDA driver's included, inherit it. Cores this
    machine lacks are dropped (core 0 if none is left)."""
    if cores is None or cores == "none":
        return
    import os

    import torch

    wanted = {int(c) for c in str(cores).split(",")}
    os.sched_setaffinity(0, wanted & set(range(os.cpu_count() or 1)) or {0})
    torch.set_num_threads(1)
