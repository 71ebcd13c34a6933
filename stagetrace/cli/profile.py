"""``stagetrace profile``: a local checkpoint on images and prompts, resumable, one record per call.

Order of work: every argument and path is checked before the model loads; the run's
fingerprint is checked against what ``--out`` holds; records stream to ``records.jsonl``
with their spans, so ``trace.json`` is rebuilt from every record of the run at the end,
also after a resume or Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .args import check_at_least, layer_detail_of, parse_device
from .common import CliError, rank_suffix, rank_world, show
from .loading import check_prompt_lengths, encode, load_model, max_positions, read_config
from .runs import (RUN_FILE, Sample, check_resume, collect_images, collect_prompts, done_ids, files_to_replace,
                   fingerprint, make_samples, write_fingerprint)
from .safe_io import check_output, move_aside, writable_dir

__all__ = ["cmd_profile"]


@dataclass
class Plan:
    args: argparse.Namespace
    out: Path
    records: Path
    trace: Path
    rank: int
    world: int
    device: str
    layer_detail: str
    prompts: list[str]
    fp: dict[str, Any]
    todo: list[Sample]
    with_images: bool
    recorded: int  # samples of the run recorded by earlier processes
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why) for images and batches not run


def _plan(args: argparse.Namespace) -> Plan:
    """Everything checked and decided before the model loads."""
    check_at_least(args, max_new_tokens=1, min_new_tokens=0, n=1, batch_size=1, warmup=0)
    if args.min_new_tokens is not None and args.min_new_tokens > args.max_new_tokens:
        raise CliError(f"--min-new-tokens {args.min_new_tokens} is above --max-new-tokens {args.max_new_tokens}")
    detail = layer_detail_of(args)
    device = parse_device(args.device)
    prompts = collect_prompts(args)
    root, images = collect_images(args.images) if args.images else (None, None)
    rank, world = rank_world()
    config = read_config(Path(args.model_path), args)
    out = writable_dir(args.out)
    sfx = rank_suffix(rank, world)
    records, trace = out / f"records{sfx}.jsonl", out / f"trace{sfx}.json"
    for p in (records, trace, out / RUN_FILE):
        check_output(p)
    fp = fingerprint(args, config, prompts, device, detail)
    if args.fresh:
        aside = move_aside(out, files_to_replace(out, rank, world))
        if aside is not None:
            print(f"--fresh: moved the earlier results to {show(aside)}")
    else:
        check_resume(out, fp)
    samples = make_samples(images, root, prompts)[: args.n][rank::world]
    done = set() if args.fresh else done_ids(out)
    todo = [s for s in samples if s[0] not in done]
    if len(todo) < len(samples):
        print(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples already in {show(out)}")
    return Plan(args, out, records, trace, rank, world, device, detail, prompts, fp, todo, images is not None,
                len(samples) - len(todo))


def _image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be profiled (its header does not decode), or None. Cheap: no pixels read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.size  # noqa: B018
    # PIL raises many types for a bad file (OSError, SyntaxError, DecompressionBombError, ...)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _decode(batch: list[Sample], plan: Plan) -> tuple[list[Sample], list[Any]]:
    from PIL import Image
    from tqdm import tqdm

    kept, pil = [], []
    for sample in batch:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(sample[1]) as im:
                    pil.append(im.convert("RGB"))
            kept.append(sample)
        except Exception as exc:  # noqa: BLE001 - any image that does not decode is skipped, named, counted
            plan.skipped.append((f"image {show(sample[1])}", f"cannot decode it ({show(exc)})"))
            tqdm.write(f"stagetrace: skipped image {show(sample[1])}: cannot decode it ({show(exc)})")
    return kept, pil


class _Sink:
    """Appends the tracer's new records, with their spans, to the run's records file."""

    def __init__(self, tracer: Any, path: Path):
        from stagetrace.records import JsonlWriter

        self.tracer, self.written = tracer, len(tracer.records)
        self.writer = JsonlWriter(path, spans=True)

    def flush(self) -> int:
        new = self.tracer.records[self.written:]
        for rec in new:
            self.writer.write(rec)
        self.written += len(new)
        return len(new)


def _generation_kwargs(args: argparse.Namespace, model: Any, processor: Any) -> dict[str, Any]:
    gen_kw: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if args.min_new_tokens is not None:
        gen_kw["min_new_tokens"] = args.min_new_tokens
    tok = getattr(processor, "tokenizer", processor)
    if getattr(model.generation_config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        gen_kw["pad_token_id"] = tok.pad_token_id
    image_token_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    if image_token_id is not None:
        gen_kw["suppress_tokens"] = [image_token_id]
    return gen_kw


def _encode_batch(kept: list[Sample], pil: list[Any] | None, processor: Any, model: Any, plan: Plan) -> Any:
    """The batch's inputs, or None when it cannot run (said and counted)."""
    from tqdm import tqdm

    ids = ", ".join(show(s[0]) for s in kept)
    try:
        enc = encode(processor, [s[2] for s in kept], pil, plan.device)
    except Exception as exc:  # noqa: BLE001 - the processor refused these inputs: skip them, not the run
        plan.skipped.append((f"sample(s) {ids}", f"the processor refused them ({show(exc)})"))
        tqdm.write(f"stagetrace: skipped sample(s) {ids}: the processor refused them ({show(exc)})")
        return None
    limit, n = max_positions(model), int(enc["input_ids"].shape[-1]) if "input_ids" in enc else 0
    if limit is not None and n + plan.args.max_new_tokens > limit:
        why = f"{n} prompt tokens + {plan.args.max_new_tokens} new exceed the model's {limit} positions"
        plan.skipped.append((f"sample(s) {ids}", why))
        tqdm.write(f"stagetrace: skipped sample(s) {ids}: {why}")
        return None
    return enc


def _run_batches(plan: Plan, model: Any, processor: Any, tracer: Any, sink: _Sink) -> int:
    """Profiles the plan's samples; returns how many generate() calls were recorded."""
    import torch
    from tqdm import tqdm

    args, gen_kw, warmed, calls = plan.args, _generation_kwargs(plan.args, model, processor), False, 0
    batches = [plan.todo[i:i + args.batch_size] for i in range(0, len(plan.todo), args.batch_size)]
    with tracer, torch.no_grad():
        for batch in tqdm(batches, desc=f"profiling{f' rank {plan.rank}' if plan.world > 1 else ''}",
                          unit="batch", disable=args.no_progress):
            kept, pil = _decode(batch, plan) if plan.with_images else (batch, None)
            enc = _encode_batch(kept, pil, processor, model, plan) if kept else None
            if enc is None:
                continue
            if not warmed and args.warmup:
                tracer.stop()  # warm-up runs untraced: first-call costs are not the model's
                for _ in range(args.warmup):
                    model.generate(**enc, **gen_kw)
                tracer.start()
                warmed = True
            with tracer.sample(";".join(s[0] for s in kept)):
                model.generate(**enc, **gen_kw)
            calls += sink.flush()
    return calls


def _finish(plan: Plan, interrupted: bool) -> list[Any]:
    """Rebuilds the trace from every record of the run (earlier processes' too) and prints the summary."""
    from stagetrace.export.chrome import write_chrome_trace
    from stagetrace.records import load_records

    from .report import print_summary

    records = load_records(plan.records, on_error="warn") if plan.records.exists() else []
    write_chrome_trace(records, plan.trace, rank=plan.rank)
    if not interrupted:
        print_summary(records, f"{len(records)} records in {show(plan.records)}")
    images = [what.removeprefix("image ") for what, _ in plan.skipped if what.startswith("image ")]
    if images:
        print(f"{len(images)} image(s) could not be decoded and were skipped: {', '.join(images)}")
    if len(images) < len(plan.skipped):
        print(f"{len(plan.skipped) - len(images)} batch(es) skipped: "
              + "; ".join(f"{what}: {why}" for what, why in plan.skipped if not what.startswith("image ")))
    return records


def _drop_undecodable(plan: Plan) -> None:
    todo = []
    for s in plan.todo:
        why = _image_problem(s[1])
        if why is None:
            todo.append(s)
            continue
        plan.skipped.append((f"image {show(s[1])}", f"cannot decode it ({show(why)})"))
        print(f"stagetrace: skipped image {show(s[1])}: cannot decode it ({show(why)})")
    if plan.todo and not todo and not plan.recorded:  # (on a resume the rest of the run is done)
        raise CliError(f"none of the {len(plan.todo)} images to profile decodes (first: "
                       f"{plan.skipped[0][0]}: {plan.skipped[0][1]})")
    plan.todo = todo


def cmd_profile(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if plan.with_images:  # headers only, before the model loads: a run of bad images stops here
        _drop_undecodable(plan)
    calls, interrupted = 0, False
    if plan.todo:
        model, processor, plan.device = load_model(Path(args.model_path), args, plan.device)
        check_prompt_lengths(processor, model, plan.prompts, args.max_new_tokens, plan.with_images)
        tracer = _make_tracer(plan, model)
        write_fingerprint(plan.out, plan.fp)
        sink = _Sink(tracer, plan.records)
        try:
            calls = _run_batches(plan, model, processor, tracer, sink)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            calls += sink.flush()  # a record made as Ctrl-C came
            sink.writer.close()
    records = _finish(plan, interrupted)
    if interrupted:
        print(f"stagetrace: interrupted: {len(records)} finished record(s) kept in {show(plan.records)}, "
              f"their trace in {show(plan.trace)}", file=sys.stderr)
        return 130
    if plan.todo and calls == 0 and plan.skipped and not plan.recorded:
        raise CliError(f"no sample could be profiled: {len(plan.skipped)} input(s) skipped (see above)")
    print(f"wrote {show(plan.records)} and {show(plan.trace)}")
    return 0


def _make_tracer(plan: Plan, model: Any) -> Any:
    import stagetrace
    from stagetrace.layouts import LayoutError

    a = plan.args
    try:
        return stagetrace.trace(model, layer_detail=plan.layer_detail, layer_marks=a.layer_marks, keep_marks=False,
                                vision=a.vision, language_model=a.language_model, lm_head=a.lm_head)
    except LayoutError as exc:
        raise CliError(" ".join(line.strip() for line in str(exc).splitlines())) from None
