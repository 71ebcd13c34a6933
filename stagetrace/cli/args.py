"""Arguments checked before anything is loaded: counts, the device, renamed flags."""
from __future__ import annotations

import argparse
import os
import sys

from .common import CliError

__all__ = ["OneLineParser", "check_at_least", "parse_device", "layer_detail_of"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit status 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"stagetrace: error: {message} (see {self.prog} --help)\n")


def check_at_least(args: argparse.Namespace, **minimums: int) -> None:
    """Each named option, when given, is an integer >= its minimum (``max_new_tokens=1``)."""
    for name, low in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise CliError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def parse_device(name: str) -> str:
    """The device to profile on: ``auto``, ``cpu`` or an available ``cuda[:N]``; refused otherwise."""
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        # under torchrun each rank takes its own GPU
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0) % torch.cuda.device_count()}"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CliError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {name}: stagetrace times generate() on cpu or cuda, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: torch {torch.__version__} sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def layer_detail_of(args: argparse.Namespace) -> str:
    """``--layer-detail``, or the deprecated ``--layers`` it replaced (with a one-line note)."""
    old = getattr(args, "layers", None)
    if old is not None:
        if args.layer_detail is not None and args.layer_detail != old:
            raise CliError(f"--layers {old} and --layer-detail {args.layer_detail} disagree: give --layer-detail only")
        print("stagetrace: note: --layers is deprecated, use --layer-detail (same values)", file=sys.stderr)
    return args.layer_detail or old or "off"
