"""One run of ``profile`` in an ``--out`` folder: its samples, its fingerprint, what is done.

A run is resumable: records stream to ``records.jsonl`` and a rerun profiles only the
samples not recorded yet. The fingerprint (``stagetrace-run.json``) says which run the
folder holds, so a rerun with another model, prompt or setting is refused instead of mixed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Sequence

from .common import CliError, show

__all__ = ["RUN_FILE", "IMAGE_EXTS", "ImageRef", "Sample", "collect_prompts", "collect_images", "escape_id",
           "sample_id", "make_samples", "fingerprint", "check_resume", "write_fingerprint", "done_keys",
           "files_to_replace", "point_key", "PointKey"]

RUN_FILE = "stagetrace-run.json"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageRef:
    """One image of a sample: a file, or bytes a dataset holds. ``name`` says which in messages."""
    name: str
    path: Path | None
    data: bytes | None


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    images: tuple[ImageRef, ...] = ()
    max_new_tokens: int | None = None  # the dataset's own for this sample; None: --max-new-tokens


# A sweep point as a set member: its (setting, value) pairs, sorted; () outside a sweep.
PointKey = tuple[tuple[str, Any], ...]


def point_key(point: dict[str, Any] | None) -> PointKey:
    # bool is an int in Python: kept apart from 1/0 by its type
    return tuple(sorted((k, (type(v).__name__, v)) for k, v in (point or {}).items()))

# What must match for a rerun to continue a run (batch size and --n may change: they do
# not change what one sample is).
_KEYS = {"model_path": "model path", "config_sha256": "config.json", "dtype": "--dtype", "device": "device",
         "max_new_tokens": "--max-new-tokens", "min_new_tokens": "--min-new-tokens", "prompts_sha256": "prompts",
         "images": "--images", "layer_detail": "--layer-detail", "layer_marks": "--layer-marks",
         "layer_every": "--layer-every", "lead_every": "--lead-every",
         "layout": "--vision/--language-model/--lm-head", "dataset": "--dataset (its path or its contents)",
    "sweep_keys": "--sweep settings"}


def collect_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        try:
            text = Path(args.prompts).read_bytes().decode("utf-8-sig")
        except OSError as exc:
            raise CliError(f"prompt file {show(args.prompts)} cannot be read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise CliError(f"prompt file {show(args.prompts)} is not UTF-8 text (byte {exc.start})") from None
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not prompts:
            raise CliError(f"prompt file {show(args.prompts)} is empty")
        return prompts
    if args.prompt is None or not args.prompt.strip():
        raise CliError("give a prompt: --prompt TEXT or --prompts FILE")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise CliError(f"--prompt {show(args.prompt)} is not valid UTF-8 text") from None
    return [args.prompt]


def collect_images(items: Sequence[str]) -> tuple[Path, list[Path]]:
    """(the images' common root, the images): every file named, and each folder's images (not recursive)."""
    found: list[Path] = []
    dirs: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            dirs.append(os.path.abspath(p))
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        elif p.is_file():
            dirs.append(os.path.dirname(os.path.abspath(p)))
            found.append(p)
        else:
            raise CliError(f"image path {show(item)} does not exist")
    if not found:
        raise CliError(f"no images found in {show(', '.join(items))} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    return Path(os.path.commonpath(dirs)), found


def escape_id(text: str) -> str:
    """``text`` with ``%``, ``;`` (it joins the ids of a batch) and characters that are not
    printable (newlines, bytes that are not UTF-8) %-escaped, so no two texts give one id."""
    out = []
    for ch in text:
        if ch in "%;" or not ch.isprintable() or "\ud800" <= ch <= "\udfff":
            out.append("".join(f"%{b:02X}" for b in os.fsencode(ch)))
        else:
            out.append(ch)
    return "".join(out)


def sample_id(rel: str | PurePath, prompt_index: int) -> str:
    """``<path relative to the image root>#<prompt index>``, unique for every file name."""
    return f"{escape_id(PurePath(rel).as_posix())}#{prompt_index}"


def make_samples(images: list[Path] | None, root: Path | None, prompts: list[str]) -> list[Sample]:
    """The samples of ``--images`` and ``--prompt(s)``: each image with a prompt in turn, or each prompt alone."""
    if images is None:
        return [Sample(f"prompt-{i}", p) for i, p in enumerate(prompts)]
    samples: dict[str, Sample] = {}  # the same file named twice is one sample
    for i, img in enumerate(images):
        k = i % len(prompts)
        sid = sample_id(os.path.relpath(os.path.abspath(img), root), k)
        samples.setdefault(sid, Sample(sid, prompts[k], (ImageRef(show(img), img, None),)))
    return list(samples.values())


def fingerprint(args: argparse.Namespace, config: bytes, prompts: list[str], device: str,
                layer_detail: str, dataset: dict[str, Any] | None = None,
                sweep_keys: list[str] | None = None) -> dict[str, Any]:
    """What must match for a rerun to continue the run in ``--out``. A sweep's keys are in it,
    not its values: every record carries its point, so a rerun with more values adds points."""
    import torch

    fp = {"stagetrace_run": 1, "command": "profile", "model_path": os.path.abspath(args.model_path),
          "config_sha256": hashlib.sha256(config).hexdigest(), "dtype": args.dtype,
          "device": f"device_map={args.device_map}" if args.device_map else torch.device(device).type,
          "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
          "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "prompts": len(prompts),
          "images": [os.path.abspath(i) for i in args.images] if args.images else None,
          "layer_detail": layer_detail, "layer_marks": args.layer_marks,
          "layout": {"vision": args.vision, "language_model": args.language_model, "lm_head": args.lm_head},
          "dataset": dataset, "sweep_keys": sweep_keys,
          # only when sampled: a run started before --layer-every existed resumes unchanged
          **({"layer_every": args.layer_every} if getattr(args, "layer_every", 1) != 1 else {}),
          **({"lead_every": args.lead_every} if getattr(args, "lead_every", None) is not None else {})}
    return json.loads(json.dumps(fp))  # as it reads back from the file


def _records_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("records*.jsonl") if p.is_file() and p.stat().st_size > 0)


def read_fingerprint(out: Path) -> dict[str, Any] | None:
    try:
        fp = json.loads((out / RUN_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return fp if isinstance(fp, dict) else None


def check_resume(out: Path, fp: dict[str, Any]) -> None:
    """Refuses (one line) an ``--out`` holding records of another run, or of an unknown one."""
    if not _records_files(out):
        return
    old = read_fingerprint(out)
    hint = "pass --fresh to move its files aside into a replaced-<time>/ folder, or choose another --out"
    if old is None or old.get("command") != fp["command"]:
        raise CliError(f"{show(out)} holds records but no readable {RUN_FILE} of a profile run, so they cannot "
                       f"be resumed safely: {hint}")
    diff = [name for key, name in _KEYS.items() if old.get(key) != fp.get(key)]
    if diff:
        raise CliError(f"{show(out)} holds a run with other settings ({', '.join(diff)} differ): resuming it would mix two "
                       f"runs; {hint}")


def write_fingerprint(out: Path, fp: dict[str, Any]) -> None:
    from .safe_io import write_bytes_atomically

    write_bytes_atomically(out / RUN_FILE, (json.dumps(fp, indent=1) + "\n").encode())


def done_keys(out: Path) -> set[tuple[str, PointKey]]:
    """(sample id, sweep point) of every sample recorded without error, in every records file
    of the folder (all ranks). A batch's record names its samples joined by ``;`` (each id escaped)."""
    from stagetrace.records import load_records

    done: set[tuple[str, PointKey]] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _records_files(out):
            for r in load_records(path, on_error="ignore"):
                if r.error is None and r.sample_id:
                    point = point_key(r.sweep_point)
                    done.update((sid, point) for sid in r.sample_id.split(";"))
    return done


_OURS = re.compile(r"(records|trace)(?:\.rank(\d+))?\.(jsonl|json|json\.gz)", re.IGNORECASE)


def files_to_replace(out: Path, rank: int, world: int) -> list[Path]:
    """What ``--fresh`` moves aside: this rank's files; rank 0 also the fingerprint and the files
    of no current rank (so ranks started together never move each other's new files)."""
    sfx = f".rank{rank}" if world > 1 else ""
    mine = [out / f"records{sfx}.jsonl", out / f"trace{sfx}.json", out / f"trace{sfx}.json.gz"]
    if rank == 0:
        mine.append(out / RUN_FILE)
        for p in sorted(out.iterdir()):
            m = _OURS.fullmatch(p.name)
            if m and p not in mine and (world == 1 or m[2] is None or int(m[2]) >= world):
                mine.append(p)
    return mine
