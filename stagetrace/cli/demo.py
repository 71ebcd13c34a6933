"""``stagetrace demo``: a tiny random-weight LLaVA traced end to end, no download."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .args import check_at_least, parse_device
from .common import CliError, show
from .runs import RUN_FILE, read_fingerprint
from .safe_io import check_output, replacing_path, writable_dir, write_bytes_atomically

__all__ = ["cmd_demo"]

_DEMO_IDS = re.compile(r"image-\d+|text-only|batch-2")


def _check_folder(out: Path) -> None:
    """The demo replaces an earlier demo's files, and refuses to touch any other run's records."""
    from stagetrace.records import load_records

    records = [p for p in out.glob("records*.jsonl") if p.is_file() and p.stat().st_size > 0]
    if not records:
        return
    fp = read_fingerprint(out)
    if fp is not None and fp.get("command") == "demo":
        return
    if fp is None:  # a demo folder from before fingerprints: every record is a demo sample
        ids = [r.sample_id or "" for p in records for r in load_records(p, on_error="ignore")]
        if ids and all(_DEMO_IDS.fullmatch(i) for i in ids):
            return
    raise CliError(f"{show(out)} holds records that are not a demo's: the demo does not replace them; "
                   "choose another --out")


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import stagetrace
    from stagetrace.testing import tiny
    check_at_least(args, calls=1, max_new_tokens=1)
    device = parse_device(args.device)
    out = writable_dir(args.out)
    records_path, trace_path = check_output(out / "records.jsonl"), check_output(out / "trace.json")
    check_output(out / RUN_FILE)
    _check_folder(out)
    case = tiny.build("llava", num_hidden_layers=4)
    limit = case.model.config.get_text_config().max_position_embeddings
    if case.inputs["input_ids"].shape[1] + args.max_new_tokens > limit:
        raise CliError(f"--max-new-tokens {args.max_new_tokens} does not fit the demo model's {limit} positions")
    case.model.to(device)
    move = lambda inputs: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}  # noqa: E731
    inputs = move(case.inputs)
    text_only = move(tiny.build("llava", images=False).inputs)
    batch2 = move(tiny.build("llava", batch=2, left_pad=2).inputs)
    gk = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
              **case.generate_kwargs)
    case.model.generate(**inputs, **gk)  # warm-up, untraced
    print(f"stagetrace demo: tiny random-weight LLaVA on {device} ({stagetrace.backend_info()})")
    with stagetrace.trace(case.model, layer_detail="all") as tracer:
        for i in range(args.calls):
            with tracer.sample(f"image-{i}"):
                case.model.generate(**inputs, **gk)
        with tracer.sample("text-only"):
            case.model.generate(**text_only, **gk)
        with tracer.sample("batch-2"):
            case.model.generate(**batch2, **gk)
    _write(tracer.records, records_path, trace_path)
    return _report(tracer.records, args, records_path, trace_path)


def _write(records: list, records_path: Path, trace_path: Path) -> None:
    from stagetrace.export.chrome import write_chrome_trace
    from stagetrace.records import write_jsonl

    with replacing_path(records_path) as tmp:  # whole or not at all, never through a link
        write_jsonl(records, tmp)
    write_chrome_trace(records, trace_path)
    write_bytes_atomically(records_path.parent / RUN_FILE,
                           (json.dumps({"stagetrace_run": 1, "command": "demo"}) + "\n").encode())


def _report(records: list, args: argparse.Namespace, records_path: Path, trace_path: Path) -> int:
    from .report import print_summary

    print_summary(records, f"\n{len(records)} generate() calls, {args.max_new_tokens} new tokens each")
    first = records[0]
    print(f"\none call: vision {first.vision_ms:.3f} + prefill {first.prefill_ms:.3f} + decode {first.decode_ms:.3f} "
          f"+ other {first.other_ms:.3f} = total {first.total_ms:.3f} ms; "
          f"{len(first.decode_step_ms)} decode steps")
    print(f"\nwrote {show(records_path)} and {show(trace_path)} ({trace_path.stat().st_size / 1024:.1f} KiB)")
    print("open the trace: https://ui.perfetto.dev -> 'Open trace file' (or chrome://tracing -> Load)")
    return 0
