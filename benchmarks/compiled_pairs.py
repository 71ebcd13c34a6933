"""Two traced methods of one ``compiled.py`` run, paired per repetition: ``compiled.py`` pairs
every method with ``plain``; this reads two methods' own samples out of its JSON (the whole call,
as % of plain's median, and each host-clock part with ``--step-clock``) and pairs them with each
other, so a difference between two ways of tracing is read without plain's noise twice.

    python benchmarks/compiled_pairs.py results/compiled-session15-prepare-off-nvidia-h200.json \\
        stagetrace stagetrace_prepare_wrapped
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import bootstrap_median_ci  # noqa: E402

PARTS = ("setup_ms", "prefill_ms", "step_ms", "tail_ms")


def pair(result: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """``a`` less ``b``, repetition by repetition: the whole call in % of plain's median wall time, and
    each host-clock part in µs (the repetitions' medians, with a 95% bootstrap interval)."""
    methods = result["methods"]
    ma, mb, plain_ms = methods[a], methods[b], methods["plain"]["median_ms"]
    whole = (np.asarray(ma["walls_ms"]) - np.asarray(mb["walls_ms"])) / plain_ms * 100
    out: dict[str, Any] = {"config": result["config"], "a": a, "b": b, "reps": int(len(whole)),
                           "whole_call_pct": float(np.median(whole)),
                           "whole_call_ci95_pct": list(bootstrap_median_ci(whole.tolist()))}
    sa, sb = ma.get("host_samples_ms"), mb.get("host_samples_ms")
    if sa and sb:
        for part in PARTS:
            diff_us = (np.asarray(sa[part]) - np.asarray(sb[part])) * 1e3
            out[f"{part[:-3]}_us"] = float(np.median(diff_us))
            out[f"{part[:-3]}_ci95_us"] = list(bootstrap_median_ci(diff_us.tolist()))
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="a compiled.py result")
    ap.add_argument("a", help="a traced method of that run")
    ap.add_argument("b", help="the method it is paired with")
    args = ap.parse_args(argv)
    rows = [pair(r, args.a, args.b) for r in json.loads(args.json.read_text())["results"]
            if args.a in r["methods"] and args.b in r["methods"]]
    if not rows:
        ap.exit(2, f"compiled_pairs: {args.json} has no config with both {args.a} and {args.b}\n")
    for row in rows:
        line = (f"{row['config']}: {row['a']} - {row['b']} over {row['reps']} repetitions: whole call "
                f"{row['whole_call_pct']:+.2f}% [{row['whole_call_ci95_pct'][0]:+.2f}, {row['whole_call_ci95_pct'][1]:+.2f}]")
        for part in PARTS:
            key = part[:-3]
            if f"{key}_us" in row:
                lo, hi = row[f"{key}_ci95_us"]
                line += f"; {key} {row[f'{key}_us']:+.1f} µs [{lo:+.1f}, {hi:+.1f}]"
        print(line)
    return rows


if __name__ == "__main__":
    main()
