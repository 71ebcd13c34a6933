"""``stagetrace profile``: a local checkpoint on images and prompts (or a dataset), over the points
of a sweep, resumable, one record per call.

Order of work: every argument and path is checked before the model loads (a sweep's processor
settings once the processor is loaded, before the model); the run's fingerprint is checked
against what ``--out`` holds; the work is (sweep point, sample) items, ``dtype`` outermost so
each dtype's model loads once; records stream to ``records.jsonl`` with their spans and their
point, so ``trace.json`` is rebuilt from every record of the run at the end, also after a
resume or Ctrl-C.
"""
from __future__ import annotations

import argparse
import io
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .args import check_at_least, layer_detail_of, parse_device
from .common import CliError, rank_suffix, rank_world, show
from .dataset import Dataset, parse_columns, read_dataset
from .loading import check_prompt_lengths, encode, load_model, load_processor, max_positions, read_config
from .runs import (RUN_FILE, ImageRef, PointKey, Sample, check_resume, collect_images, collect_prompts, done_keys,
                   files_to_replace, fingerprint, make_samples, point_key, write_fingerprint)
from .safe_io import check_output, move_aside, writable_dir
from .sweep import (GENERATION_KEYS, ProcessorSettings, Value, parse_sweeps, point_label, resolve_processor_settings,
                    sweep_points)

__all__ = ["cmd_profile"]

# Lists of skipped inputs longer than this are cut short in the summary (each was named as it was met).
_SHOWN = 20


@dataclass(frozen=True)
class WorkItem:
    """One sample at one sweep point (``{}`` outside a sweep): what one record's call covers, batched."""
    point: dict[str, Value]
    sample: Sample

    @property
    def key(self) -> tuple[str, PointKey]:
        return (self.sample.id, point_key(self.point))


@dataclass(frozen=True)
class Skip:
    kind: str  # "row" (of --dataset), "image" (does not decode), "batch" (processor, positions or model refused it)
    what: str  # the row, the image's name, the batch's samples
    why: str


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
    prompts: list[str] | None  # --prompt / --prompts (None with --dataset: rows too long are skipped instead)
    fp: dict[str, Any]
    sweep: dict[str, list[Value]]
    todo: list[WorkItem]
    with_images: bool
    recorded: int  # items of the run recorded by earlier processes
    skipped: list[Skip] = field(default_factory=list)

    def max_new_tokens(self, item: WorkItem) -> int:
        """A point's max_new_tokens, else the sample's own (from the dataset), else --max-new-tokens."""
        return int(item.point.get("max_new_tokens") or item.sample.max_new_tokens or self.args.max_new_tokens)

    def min_new_tokens(self, item: WorkItem) -> int | None:
        value = item.point.get("min_new_tokens", self.args.min_new_tokens)
        return None if value is None else int(value)

    def batch_size(self, point: dict[str, Value]) -> int:
        return int(point.get("batch_size", self.args.batch_size))

    def skip(self, kind: str, what: str, why: str, say: bool = True) -> None:
        self.skipped.append(Skip(kind, what, why))
        if say:
            from tqdm import tqdm

            tqdm.write(f"stagetrace: skipped {'image ' if kind == 'image' else ''}{what}: {why}")


def _check_sources(args: argparse.Namespace) -> None:
    if args.dataset is not None:
        mixed = [flag for flag, v in (("--images", args.images), ("--prompt", args.prompt),
                                      ("--prompts", args.prompts)) if v is not None]
        if mixed:
            raise CliError(f"--dataset gives the images and prompts: drop {' and '.join(mixed)}")
    elif args.dataset_columns is not None:
        raise CliError("--dataset-columns names the columns of a --dataset: give --dataset PATH")


def _samples(args: argparse.Namespace) -> tuple[list[Sample], list[str] | None, Dataset | None]:
    """(samples, the --prompt(s) prompts or None, the dataset or None)."""
    if args.dataset is not None:
        ds = read_dataset(args.dataset, parse_columns(args.dataset_columns))
        return ds.samples, None, ds
    prompts = collect_prompts(args)
    root, images = collect_images(args.images) if args.images else (None, None)
    return make_samples(images, root, prompts), prompts, None


def _plan(args: argparse.Namespace) -> Plan:
    """Everything checked and decided before the model loads."""
    check_at_least(args, max_new_tokens=1, min_new_tokens=0, n=1, batch_size=1, warmup=0, layer_every=1,
                   lead_every=1)
    _check_sources(args)
    sweep = parse_sweeps(args.sweep)
    points = sweep_points(sweep)
    for p in points:
        low, high = p.get("min_new_tokens", args.min_new_tokens), p.get("max_new_tokens", args.max_new_tokens)
        if low is not None and low > high:
            raise CliError(f"--min-new-tokens {low} is above --max-new-tokens {high}" if not p else
                           f"min_new_tokens {low} is above max_new_tokens {high} at the sweep point {point_label(p)}")
    detail = layer_detail_of(args)
    if args.layer_every != 1 and detail != "all":
        raise CliError(f"--layer-every {args.layer_every} samples the decode steps' layers: it needs --layer-detail all")
    device = parse_device(args.device)
    samples, prompts, ds = _samples(args)
    rank, world = rank_world()
    config = read_config(Path(args.model_path), args)
    out = writable_dir(args.out)
    sfx = rank_suffix(rank, world)
    records, trace = out / f"records{sfx}.jsonl", out / f"trace{sfx}.json"
    for p in (records, trace, out / RUN_FILE):
        check_output(p)
    ident = None if ds is None else {"path": str(ds.path.resolve()), "kind": ds.kind, "sha256": ds.sha256,
                                     "columns": parse_columns(args.dataset_columns)}
    fp = fingerprint(args, config, prompts if prompts is not None else [s.prompt for s in samples], device, detail,
                     dataset=ident, sweep_keys=sorted(sweep) or None)
    if args.fresh:
        aside = move_aside(out, files_to_replace(out, rank, world))
        if aside is not None:
            print(f"--fresh: moved the earlier results to {show(aside)}")
    else:
        check_resume(out, fp)
    # (point, sample) items, points outermost, sharded over the ranks item by item: every rank
    # meets the dtypes in the same order, so it loads each at most once
    items = [WorkItem(p, s) for p in points for s in samples[: args.n]][rank::world]
    done = set() if args.fresh else done_keys(out)
    todo = [it for it in items if it.key not in done]
    if len(todo) < len(items):
        unit = "samples" if not sweep else "(sample, sweep point) items"
        print(f"resuming: {len(items) - len(todo)} of {len(items)} {unit} already in {show(out)}")
    plan = Plan(args, out, records, trace, rank, world, device, detail, prompts, fp, sweep, todo,
                any(s.images for s in samples), len(items) - len(todo))
    if ds is not None and rank == 0:  # the dataset's rows, said once however many ranks read them
        for where, why in ds.skipped:
            plan.skip("row", f"{where} of {show(ds.path)}", why)
    _drop_min_above_max(plan)
    return plan


def _drop_min_above_max(plan: Plan) -> None:
    """A dataset row asking fewer new tokens than --min-new-tokens cannot honour both: skipped, said."""
    todo, said = [], set()
    for it in plan.todo:
        low = plan.min_new_tokens(it)
        if low is None or low <= plan.max_new_tokens(it):
            todo.append(it)
        elif it.sample.id not in said:
            said.add(it.sample.id)
            plan.skip("row", f"sample {show(it.sample.id)}",
                      f"its max_new_tokens {plan.max_new_tokens(it)} is below min_new_tokens {low}")
    plan.todo = todo


def _open_image(ref: ImageRef) -> Any:
    from PIL import Image

    return Image.open(ref.path if ref.path is not None else io.BytesIO(ref.data or b""))


def _image_problem(ref: ImageRef) -> str | None:
    """Why ``ref`` cannot be profiled (its header does not decode), or None. Cheap: no pixels read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_image(ref) as im:
                im.size  # noqa: B018
    # PIL raises many types for a bad file (OSError, SyntaxError, DecompressionBombError, ...)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _decode(batch: list[WorkItem], plan: Plan) -> tuple[list[WorkItem], list[list[Any]]]:
    from PIL import Image

    kept, pil = [], []
    for it in batch:
        ref = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                images = []
                for ref in it.sample.images:
                    with _open_image(ref) as im:
                        images.append(im.convert("RGB"))
            kept.append(it)
            pil.append(images)
        except Exception as exc:  # noqa: BLE001 - any image that does not decode is skipped, named, counted
            plan.skip("image", ref.name if ref else "?", f"cannot decode it ({show(exc)})")
    return kept, pil


class _Sink:
    """Appends the tracer's new records, with their spans and sweep point, to the run's records file."""

    def __init__(self, path: Path):
        self.path = path
        self.tracer: Any = None
        self.written = 0
        self.point: dict[str, Value] = {}  # the point the calls now made run at
        self.writer: Any = None  # opened at the first record: a run refused before it leaves no file

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def follow(self, tracer: Any) -> None:
        """Records from now on come from ``tracer`` (a model of another dtype)."""
        self.tracer, self.written = tracer, len(tracer.records)

    def flush(self) -> int:
        if self.tracer is None:
            return 0
        new = self.tracer.records[self.written:]
        if new and self.writer is None:
            from stagetrace.records import JsonlWriter

            self.writer = JsonlWriter(self.path, spans=True)
        for rec in new:
            rec.sweep_point = dict(self.point) or None  # the CLI ran the call at this point: said in its record
            self.writer.write(rec)
        self.written += len(new)
        return len(new)


def _generation_kwargs(model: Any, processor: Any) -> dict[str, Any]:
    """What every call of this model gets; the new-token counts are the batch's own."""
    gen_kw: dict[str, Any] = dict(do_sample=False)
    tok = getattr(processor, "tokenizer", processor)
    if getattr(model.generation_config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        gen_kw["pad_token_id"] = tok.pad_token_id
    image_token_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    if image_token_id is not None:
        gen_kw["suppress_tokens"] = [image_token_id]
    return gen_kw


def _encode_batch(kept: list[WorkItem], pil: list[list[Any]] | None, processor: Any, model: Any, plan: Plan,
                  processor_kwargs: dict[str, Any], max_new: int) -> Any:
    """The batch's inputs, or None when it cannot run (said and counted)."""
    ids = ", ".join(show(it.sample.id) for it in kept)
    try:
        enc = encode(processor, [it.sample.prompt for it in kept], pil, plan.device, processor_kwargs)
    except Exception as exc:  # noqa: BLE001 - the processor refused these inputs: skip them, not the run
        plan.skip("batch", f"sample(s) {ids}", f"the processor refused them ({show(exc)})")
        return None
    limit, n = max_positions(model), int(enc["input_ids"].shape[-1]) if "input_ids" in enc else 0
    if limit is not None and n + max_new > limit:
        plan.skip("batch", f"sample(s) {ids}", f"{n} prompt tokens + {max_new} new exceed the model's {limit} positions")
        return None
    return enc


def _batches(plan: Plan) -> list[list[WorkItem]]:
    """The todo items in batches of their point's batch size; a batch shares its point, its new-token
    counts and whether it has images (one generate() call takes one of each). Points stay in order."""
    groups: dict[tuple[Any, ...], list[WorkItem]] = {}
    for it in plan.todo:
        groups.setdefault((point_key(it.point), plan.max_new_tokens(it), plan.min_new_tokens(it),
                           bool(it.sample.images)), []).append(it)
    return [g[i:i + plan.batch_size(g[0].point)] for g in groups.values()
            for i in range(0, len(g), plan.batch_size(g[0].point))]


@dataclass
class _Loaded:
    processor: Any
    settings: ProcessorSettings
    sink: _Sink
    model: Any = None
    tracer: Any = None
    dtype: str | None = None


def _load_dtype(plan: Plan, state: _Loaded, dtype: str) -> None:
    """The model in ``dtype``, traced; the one loaded before is let go first (one model in memory)."""
    import gc

    if state.tracer is not None:
        state.tracer.stop()
    state.model = state.tracer = None
    gc.collect()
    state.model, plan.device = load_model(Path(plan.args.model_path), plan.args, plan.device, dtype)
    if plan.prompts is not None and state.dtype is None:
        longest = max([plan.args.max_new_tokens] + [int(v) for v in plan.sweep.get("max_new_tokens", [])])
        check_prompt_lengths(state.processor, state.model, plan.prompts, longest, plan.with_images)
    state.tracer = _make_tracer(plan, state.model).start()
    state.sink.follow(state.tracer)
    if state.dtype is None:
        write_fingerprint(plan.out, plan.fp)  # once a model loaded: the run is about to write records
    state.dtype = dtype


def _run_batches(plan: Plan, state: _Loaded) -> int:
    """Profiles the plan's items, point by point; returns how many generate() calls were recorded."""
    import torch
    from tqdm import tqdm

    args, calls, point_now, warmed = plan.args, 0, None, set()
    call_kwargs: dict[str, Any] = {}
    with torch.no_grad():
        for batch in tqdm(_batches(plan), desc=f"profiling{f' rank {plan.rank}' if plan.world > 1 else ''}",
                          unit="batch", disable=args.no_progress):
            point = batch[0].point
            dtype = str(point.get("dtype", args.dtype))
            if state.dtype != dtype:
                _load_dtype(plan, state, dtype)
            if point_key(point) != point_now:
                point_now, call_kwargs = point_key(point), state.settings.apply(point)
                state.sink.point = point
            kept, pil = _decode(batch, plan) if batch[0].sample.images else (batch, None)
            max_new, min_new = plan.max_new_tokens(batch[0]), plan.min_new_tokens(batch[0])
            enc = _encode_batch(kept, pil, state.processor, state.model, plan, call_kwargs, max_new) if kept else None
            if enc is None:
                continue
            gen_kw = dict(_generation_kwargs(state.model, state.processor), max_new_tokens=max_new)
            if min_new is not None:
                gen_kw["min_new_tokens"] = min_new
            # warm-up runs untraced, once per point and model: first-call costs (a new shape, a new
            # dtype) are not the model's
            try:
                if args.warmup and (dtype, point_now) not in warmed:
                    state.tracer.stop()
                    for _ in range(args.warmup):
                        state.model.generate(**enc, **gen_kw)
                    state.tracer.start()
                    warmed.add((dtype, point_now))
                with state.tracer.sample(";".join(it.sample.id for it in kept)):
                    state.model.generate(**enc, **gen_kw)
            except Exception as exc:  # noqa: BLE001 - inputs the model refuses (a sweep point's image size it
                # cannot take): that batch is skipped and said, the run goes on with a fresh tracer
                _after_failed_call(plan, state, kept, exc)
                continue
            calls += state.sink.flush()
    return calls


def _after_failed_call(plan: Plan, state: _Loaded, kept: list[WorkItem], exc: Exception) -> None:
    from .loading import _first_line

    plan.skip("batch", f"sample(s) {', '.join(show(it.sample.id) for it in kept)}",
              f"generate() failed ({_first_line(exc)})")
    state.tracer.stop()  # whatever the failed call left half-marked is dropped with its hooks
    state.tracer.start()
    state.sink.follow(state.tracer)


def _finish(plan: Plan, interrupted: bool) -> list[Any]:
    """Rebuilds the trace from every record of the run (earlier processes' too) and prints the summary."""
    from stagetrace.export.chrome import write_chrome_trace
    from stagetrace.records import load_records

    from .report import print_summaries

    records = load_records(plan.records, on_error="warn") if plan.records.exists() else []
    write_chrome_trace(records, plan.trace, rank=plan.rank)
    if not interrupted:
        print_summaries(records, f"{len(records)} records in {show(plan.records)}")
    for kind, words in (("row", "dataset row(s) could not be used and were skipped"),
                        ("image", "image(s) could not be decoded and were skipped"), ("batch", "batch(es) skipped")):
        these = [s for s in plan.skipped if s.kind == kind]
        if not these:
            continue
        named = [s.what if kind == "image" else f"{s.what}: {s.why}" for s in these[:_SHOWN]]
        more = f"; and {len(these) - _SHOWN} more" if len(these) > _SHOWN else ""
        print(f"{len(these)} {words}: {(', ' if kind == 'image' else '; ').join(named)}{more}")
    return records


def _drop_undecodable(plan: Plan) -> None:
    """Headers only, before the model loads: every sample with an image that does not decode leaves
    the run (at every point), named once; a run of bad images stops here."""
    bad: dict[str, str] = {}
    checked: set[str] = set()
    images = 0
    for it in plan.todo:
        if it.sample.id in checked:
            continue
        checked.add(it.sample.id)
        images += len(it.sample.images)
        for ref in it.sample.images:
            why = _image_problem(ref)
            if why is not None:
                bad[it.sample.id] = why
                plan.skip("image", ref.name, f"cannot decode it ({show(why)})", say=False)
                print(f"stagetrace: skipped image {ref.name}: cannot decode it ({show(why)})")
                break
    todo = [it for it in plan.todo if it.sample.id not in bad]
    if plan.todo and not todo and not plan.recorded:  # (on a resume the rest of the run is done)
        first = next(s for s in plan.skipped if s.kind == "image")
        raise CliError(f"none of the {images} images to profile decodes (first: image {first.what}: "
                       f"{first.why})")
    plan.todo = todo


def cmd_profile(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if plan.with_images:
        _drop_undecodable(plan)
    calls, interrupted = 0, False
    if plan.todo:
        processor = load_processor(Path(args.model_path), args, images=plan.with_images)
        # a sweep's processor keys are checked on the processor, before any model loads
        settings = resolve_processor_settings(processor, [k for k in plan.sweep if k not in GENERATION_KEYS])
        state = _Loaded(processor, settings, _Sink(plan.records))
        try:
            calls = _run_batches(plan, state)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            calls += state.sink.flush()  # a record made as Ctrl-C came
            state.sink.close()
            if state.tracer is not None:
                state.tracer.stop()
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
        return stagetrace.trace(model, layer_detail=plan.layer_detail, layer_marks=a.layer_marks,
                                layer_every=a.layer_every, lead_every=a.lead_every, keep_marks=False,
                                vision=a.vision, language_model=a.language_model, lm_head=a.lm_head)
    except LayoutError as exc:
        raise CliError(" ".join(line.strip() for line in str(exc).splitlines())) from None
