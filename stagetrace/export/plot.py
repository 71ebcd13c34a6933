"""Pictures: where the time goes (stacked stages per call, each stage's distribution), and a latency
model's predictions against what was measured.

Needs matplotlib (the optional ``plot`` extra); imported only when plotting.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..records import StageRecord
from .files import replacing

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..latency_model import LatencyModel

__all__ = ["plot_records", "plot_fit"]

STACK = (("vision_ms", "vision", "#4C72B0"), ("prefill_ms", "prefill", "#DD8452"),
         ("decode_ms", "decode", "#55A868"), ("other_ms", "other", "#8C8C8C"))


def _format_of(path: str | os.PathLike[str]) -> str:
    """The picture format the name's extension asks for; ValueError (one line) when matplotlib has none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    formats = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"cannot write a picture named {out.name}: its name must end in one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    return fmt


def _save(fig: "Figure", out: Path, fmt: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with replacing(out) as fh:
            fig.savefig(fh, format=fmt, dpi=110)
    finally:
        plt.close(fig)


def plot_records(records: Iterable[StageRecord], path: str | os.PathLike[str]) -> Path:
    """Writes the picture to ``path``; its format is the name's extension (.png, .pdf, .svg, ...).

    ValueError (one line) for an extension matplotlib cannot write or no timed record.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, fmt = Path(path), _format_of(path)
    recs = [r for r in records if r.error is None]
    if not recs:
        raise ValueError("no timed records to plot (every record holds an error)")
    fig, (ax_stack, ax_dist) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    x = range(len(recs))
    bottom = [0.0] * len(recs)
    for key, name, color in STACK:
        vals = [getattr(r, key) or 0.0 for r in recs]
        ax_stack.bar(x, vals, bottom=bottom, color=color, label=name, width=0.9 if len(recs) > 1 else 0.5)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_stack.set_xlabel("call (in record order)")
    ax_stack.set_ylabel("ms")
    ax_stack.set_title("where each generate() call's time went")
    ax_stack.legend(loc="upper right")

    data, labels, colors = [], [], []
    for key, name, color in (*STACK, ("ttft_ms", "ttft", "#C44E52")):
        vals = [getattr(r, key) for r in recs if getattr(r, key) is not None]
        if vals:
            data.append(vals)
            labels.append(name)
            colors.append(color)
    parts = ax_dist.boxplot(data, patch_artist=True)
    ax_dist.set_xticks(range(1, len(labels) + 1), labels)
    for patch, color in zip(parts["boxes"], colors):
        patch.set_facecolor(color)
        patch.set_alpha(0.6)
    ax_dist.set_ylabel("ms")
    ax_dist.set_title(f"distribution over {len(recs)} calls")
    _save(fig, out, fmt)
    return out


def plot_fit(records: Iterable[StageRecord], model: "LatencyModel", path: str | os.PathLike[str]) -> Path:
    """Measured against predicted, one panel per stage the model predicts, with the MAPE on ``records``.

    ValueError (one line) for an extension matplotlib cannot write or no record to compare.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..latency_model import OUTPUTS

    out, fmt = Path(path), _format_of(path)
    pairs = model.predict_records(records)
    outputs = [t for t in OUTPUTS if t in pairs]
    if not outputs:
        raise ValueError("no timed record measures a stage the model predicts")
    cols = min(4, len(outputs))
    rows = -(-len(outputs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, target in zip(axes.flat, outputs):
        measured, predicted = pairs[target]
        ok = measured > 0
        mape = 100 * float(np.mean(np.abs(measured[ok] - predicted[ok]) / measured[ok])) if ok.any() else np.nan
        ax.scatter(predicted, measured, s=9, alpha=0.6, color="#4C72B0")
        low, high = float(min(measured.min(), predicted.min())), float(max(measured.max(), predicted.max()))
        ax.plot([low, high], [low, high], color="#444444", linewidth=0.8)
        ax.set_title(f"{target.removesuffix('_ms')}: MAPE {mape:.1f}% ({measured.size})", fontsize=10)
        ax.set_xlabel("predicted (ms)")
        ax.set_ylabel("measured (ms)")
    for ax in list(axes.flat)[len(outputs):]:
        ax.set_visible(False)
    _save(fig, out, fmt)
    return out
