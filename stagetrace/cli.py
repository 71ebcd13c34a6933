"""The ``stagetrace`` command: demo, profile, report, plot, merge. Thin: parse, call the library."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class CliError(Exception):
    """A bad input: printed as one line, exit status 2."""


# ---------------------------------------------------------------- helpers
def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".stagetrace-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CliError(f"output directory {path} cannot be written: {exc.strerror or exc}") from None
    return path


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def _suffix(rank: int, world: int) -> str:
    return f".rank{rank}" if world > 1 else ""


def _pick_device(name: str) -> str:
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        # under torchrun each rank takes its own GPU
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0) % torch.cuda.device_count()}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    return name


def _print_summary(records: list[Any], title: str) -> None:
    from .export.table import format_summary, summarize

    print(format_summary(summarize(records), title=title))


# ---------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import stagetrace
    from stagetrace.testing import tiny

    out = _writable_dir(Path(args.out))
    device = _pick_device(args.device)
    case = tiny.build("llava", num_hidden_layers=4)
    case.model.to(device)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.inputs.items()}
    text_only = {k: v for k, v in tiny.build("llava", images=False).inputs.items()}
    text_only = {k: v.to(device) for k, v in text_only.items()}
    batch2 = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in tiny.build("llava", batch=2, left_pad=2).inputs.items()}
    gk = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
              **case.generate_kwargs)
    case.model.generate(**inputs, **gk)  # warm-up, untraced
    records_path = out / "records.jsonl"
    records_path.unlink(missing_ok=True)
    print(f"stagetrace demo: tiny random-weight LLaVA on {device} ({stagetrace.backend_info()})")
    with stagetrace.trace(case.model, jsonl=records_path, layer_detail="all") as tracer:
        for i in range(args.calls):
            with tracer.sample(f"image-{i}"):
                case.model.generate(**inputs, **gk)
        with tracer.sample("text-only"):
            case.model.generate(**text_only, **gk)
        with tracer.sample("batch-2"):
            case.model.generate(**batch2, **gk)
    trace_path = tracer.save_chrome_trace(out / "trace.json")
    _print_summary(tracer.records, f"\n{len(tracer.records)} generate() calls, {args.max_new_tokens} new tokens each")
    last = tracer.records[0]
    print(f"\none call: vision {last.vision_ms:.3f} + prefill {last.prefill_ms:.3f} + decode {last.decode_ms:.3f} "
          f"+ other {last.other_ms:.3f} = total {last.total_ms:.3f} ms; "
          f"{len(last.decode_step_ms)} decode steps")
    print(f"\nwrote {records_path} and {trace_path} ({trace_path.stat().st_size / 1024:.1f} KiB)")
    print("open the trace: https://ui.perfetto.dev -> 'Open trace file' (or chrome://tracing -> Load)")
    return 0


# ---------------------------------------------------------------- profile
def _collect_images(items: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            found.append(p)
        else:
            raise CliError(f"image path {item} does not exist")
    if not found:
        raise CliError(f"no images found in {', '.join(items)} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    return found


def _collect_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise CliError(f"prompt file {args.prompts} cannot be read: {exc.strerror or exc}") from None
        prompts = [ln.strip() for ln in lines if ln.strip()]
        if not prompts:
            raise CliError(f"prompt file {args.prompts} is empty")
        return prompts
    if args.prompt is None or not args.prompt.strip():
        raise CliError("give a prompt: --prompt TEXT or --prompts FILE")
    return [args.prompt]


def _load(path: Path, args: argparse.Namespace, device: str) -> tuple[Any, Any, str]:
    """The model, its processor, and the device its inputs go to (the input embeddings')."""
    import torch
    import transformers

    if not path.is_dir():
        raise CliError(f"model path {path} does not exist or is not a directory")
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except OSError:
        raise CliError(f"model path {path} has no readable config.json: is it a transformers checkpoint?") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{cfg_file} is not valid JSON: {exc}") from None
    if cfg.get("auto_map") and not args.trust_remote_code:
        raise CliError(f"{path} ships its own model code (auto_map in config.json); pass --trust-remote-code "
                       "to run it")
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    common = dict(local_files_only=True, trust_remote_code=args.trust_remote_code)
    if args.device_map:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise CliError("--device-map needs accelerate (pip install 'stagetrace[multi-gpu]')") from None
        common["device_map"] = args.device_map
    # stderr carries our own progress bar and one-line errors only
    transformers.utils.logging.disable_progress_bar()
    model = None
    errors = []
    for cls_name in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(path, dtype=dtype, **common)
            break
        except (ValueError, KeyError) as exc:
            errors.append(f"{cls_name}: {str(exc).splitlines()[0]}")
    if model is None:
        raise CliError(f"cannot load a generating model from {path}: {'; '.join(errors)}")
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, **common)
    except (OSError, ValueError, KeyError, TypeError):
        try:
            processor = transformers.AutoTokenizer.from_pretrained(path, **common)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CliError(f"cannot load a processor or tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if args.device_map:  # placed by the map; inputs go where the embeddings are
        emb = model.get_input_embeddings()
        return model.eval(), processor, str(next(emb.parameters()).device)
    return model.to(device).eval(), processor, device


def _encode(processor: Any, prompts: list[str], images: list[Any] | None, device: str) -> dict[str, Any]:
    tok = getattr(processor, "tokenizer", processor)
    if getattr(tok, "padding_side", "left") != "left":
        tok.padding_side = "left"  # decoder-only batches pad on the left
    if images is None:
        texts = prompts
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True)
    else:
        if getattr(processor, "chat_template", None):
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                add_generation_prompt=True, tokenize=False) for p in prompts]
        else:
            token = getattr(processor, "image_token", None) or "<image>"
            texts = [f"{token}\n{p}" for p in prompts]
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in enc.items()}


def cmd_profile(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import stagetrace
    from stagetrace.layouts import LayoutError
    from stagetrace.records import load_records

    prompts = _collect_prompts(args)
    images = _collect_images(args.images) if args.images else None
    out = _writable_dir(Path(args.out))
    device = _pick_device(args.device)
    rank, world = _rank_world()
    sfx = _suffix(rank, world)

    if images:
        samples = [(f"{img.name}#{i % len(prompts)}", img, prompts[i % len(prompts)]) for i, img in enumerate(images)]
    else:
        samples = [(f"prompt-{i}", None, p) for i, p in enumerate(prompts)]
    if args.n:
        samples = samples[: args.n]
    samples = samples[rank::world]

    records_path = out / f"records{sfx}.jsonl"
    done: set[str] = set()
    if records_path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for r in load_records(records_path, on_error="ignore"):
                if r.error is None and r.sample_id:
                    done.update(r.sample_id.split(";"))
    todo = [s for s in samples if s[0] not in done]
    if done:
        print(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples already in {records_path}")

    model, processor, device = _load(Path(args.model_path), args, device)
    overrides = dict(vision=args.vision, language_model=args.language_model, lm_head=args.lm_head)
    try:
        tracer = stagetrace.trace(model, jsonl=records_path, layer_detail=args.layers or "off",
                                  layer_marks=args.layer_marks, **overrides)
    except LayoutError as exc:
        raise CliError(" ".join(line.strip() for line in str(exc).splitlines())) from None

    gen_kw: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if args.min_new_tokens is not None:
        gen_kw["min_new_tokens"] = args.min_new_tokens
    tok = getattr(processor, "tokenizer", processor)
    if getattr(model.generation_config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        gen_kw["pad_token_id"] = tok.pad_token_id
    image_token_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    if image_token_id is not None:
        gen_kw["suppress_tokens"] = [image_token_id]

    bad_images: list[str] = []

    def load_batch(batch: list[tuple[str, Path | None, str]]) -> tuple[list, list[str], list[Any] | None]:
        from PIL import Image

        if images is None:
            return batch, [b[2] for b in batch], None
        kept, pil = [], []
        for sid, path, prompt in batch:
            try:
                with Image.open(path) as im:
                    pil.append(im.convert("RGB"))
                kept.append((sid, path, prompt))
            except (OSError, ValueError) as exc:
                bad_images.append(str(path))
                tqdm.write(f"stagetrace: skipped image {path}: cannot decode it ({exc})")
        return kept, [b[2] for b in kept], pil

    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    warmed = False
    with tracer, torch.no_grad():
        for batch in tqdm(batches, desc=f"profiling{f' rank {rank}' if world > 1 else ''}", unit="batch",
                          disable=args.no_progress):
            kept, texts, pil = load_batch(batch)
            if not kept:
                continue
            enc = _encode(processor, texts, pil, device)
            if not warmed and args.warmup:
                tracer.stop()  # warm-up runs untraced: first-call costs are not the model's
                for _ in range(args.warmup):
                    model.generate(**enc, **gen_kw)
                tracer.start()
                warmed = True
            with tracer.sample(";".join(k[0] for k in kept)):
                model.generate(**enc, **gen_kw)
    trace_path = tracer.save_chrome_trace(out / f"trace{sfx}.json")
    all_records = load_records(records_path, on_error="warn")
    _print_summary(all_records, f"{len(all_records)} records in {records_path}")
    if bad_images:
        print(f"{len(bad_images)} image(s) could not be decoded and were skipped: {', '.join(bad_images)}")
    print(f"wrote {records_path} and {trace_path}")
    return 0


# ---------------------------------------------------------------- report, plot, merge
def _load_many(paths: Sequence[str]) -> list[Any]:
    from stagetrace.records import load_records

    recs: list[Any] = []
    for p in paths:
        if not Path(p).is_file():
            raise CliError(f"records file {p} does not exist")
        recs += load_records(p)
    if not recs:
        raise CliError(f"no readable records in {', '.join(paths)}")
    return recs


def cmd_report(args: argparse.Namespace) -> int:
    from .export.table import format_summary, summarize, write_csv

    recs = _load_many(args.records)
    summary = summarize(recs)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        failed = sum(r.error is not None for r in recs)
        print(format_summary(summary, title=f"{len(recs)} records" + (f" ({failed} not timed)" if failed else "")))
    if args.csv:
        write_csv(summary, args.csv)
        print(f"wrote {args.csv}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .export.plot import plot_records

    recs = _load_many(args.records)
    try:
        path = plot_records(recs, args.output)
    except ImportError:
        raise CliError("plotting needs matplotlib: pip install 'stagetrace[plot]'") from None
    print(f"wrote {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .export.chrome import merge_chrome_traces

    record_files, trace_files = [], []
    for item in args.inputs:
        p = Path(item)
        if p.is_dir():
            record_files += sorted(p.glob("records*.jsonl"))
            trace_files += sorted(list(p.glob("trace*.json")) + list(p.glob("trace*.json.gz")))
        elif p.name.endswith(".jsonl"):
            record_files.append(p)
        elif p.name.endswith((".json", ".json.gz")):
            trace_files.append(p)
        else:
            raise CliError(f"{item} is neither a directory, a records .jsonl nor a trace .json")
    if not record_files and not trace_files:
        raise CliError(f"nothing to merge in {', '.join(args.inputs)}")
    out = _writable_dir(Path(args.output))
    if record_files:
        n = 0
        with open(out / "records.jsonl", "w", encoding="utf-8") as fh:
            for f in record_files:
                for line in Path(f).read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        fh.write(line + "\n")
                        n += 1
        print(f"wrote {out / 'records.jsonl'} ({n} lines from {len(record_files)} files)")
    if trace_files:
        path = merge_chrome_traces(trace_files, out / "trace.json")
        print(f"wrote {path} ({len(trace_files)} traces, one process per rank)")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stagetrace", description="Where the time of model.generate() goes.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="trace a tiny random-weight VLM (no download) and write a trace")
    d.add_argument("--out", default="stagetrace-demo")
    d.add_argument("--device", default="auto")
    d.add_argument("--calls", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.set_defaults(fn=cmd_demo)

    p = sub.add_parser("profile", help="profile a local checkpoint on images and prompts")
    p.add_argument("model_path")
    p.add_argument("--images", nargs="+", metavar="DIR|FILE")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt")
    g.add_argument("--prompts", metavar="FILE", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--min-new-tokens", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="profile at most N samples")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="place the model with transformers' device_map (e.g. 'auto' to split it over the GPUs; "
                        "needs accelerate); each mark is then recorded on every GPU of the model")
    p.add_argument("--out", default="stagetrace-out")
    p.add_argument("--layers", nargs="?", const="all", choices=["prefill", "all"],
                   help="marks at every decoder layer (default: all steps)")
    p.add_argument("--layer-marks", choices=["pair", "shared"], default="pair",
                   help="with --layers: 'shared' puts one mark per boundary between layers (half the cost; "
                        "work run between two layers counts to the earlier one)")
    p.add_argument("--warmup", type=int, default=1, help="untraced generate() calls before the first traced one")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    p.add_argument("--vision", nargs="+", default=None, help="override: vision module path(s)")
    p.add_argument("--language-model", default=None, help="override: language model path")
    p.add_argument("--lm-head", default=None, help="override: lm_head path")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_profile)

    r = sub.add_parser("report", help="summary table of records")
    r.add_argument("records", nargs="+")
    r.add_argument("--csv", default=None)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_report)

    pl = sub.add_parser("plot", help="picture of where the time goes (needs matplotlib)")
    pl.add_argument("records", nargs="+")
    pl.add_argument("-o", "--output", default="stagetrace.png")
    pl.set_defaults(fn=cmd_plot)

    m = sub.add_parser("merge", help="join per-rank records and traces")
    m.add_argument("inputs", nargs="+", metavar="DIR|FILE")
    m.add_argument("-o", "--output", default="stagetrace-merged")
    m.set_defaults(fn=cmd_merge)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("stagetrace: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args) or 0)
    except CliError as exc:
        print(f"stagetrace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
