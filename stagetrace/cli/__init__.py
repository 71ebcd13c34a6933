"""The ``stagetrace`` command: demo, profile, report, plot, merge, compare, fit. Thin: parse,
check, call the library.

Exit status: 0 done; 1 only ``compare --fail-if-slower`` finding a stage slower; 2 a bad
input (one line on stderr, ``stagetrace: error: ...``, and nothing of the user's changed);
130 interrupted (Ctrl-C; ``profile`` keeps every finished record and writes their trace);
anything else is a bug in stagetrace.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Sequence

from .args import OneLineParser
from .common import CliError, show

__all__ = ["main", "build_parser", "CliError"]


def _profile_parser(sub: Any) -> None:
    from .profile import cmd_profile

    p = sub.add_parser("profile", help="profile a local checkpoint on images and prompts, or a dataset")
    p.add_argument("model_path")
    p.add_argument("--images", nargs="+", metavar="DIR|FILE")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt")
    g.add_argument("--prompts", metavar="FILE", help="one prompt per line (UTF-8)")
    p.add_argument("--dataset", default=None, metavar="PATH",
                   help="one sample per row instead of --images/--prompt(s): a .jsonl, .csv or .parquet file, a "
                        "folder saved by datasets' save_to_disk, or an image folder with a metadata.jsonl/.csv; "
                        "columns image(s) (paths relative to the file, or bytes), prompt, optional id and "
                        "max_new_tokens (parquet and save_to_disk need pip install 'stagetrace[dataset]')")
    p.add_argument("--dataset-columns", default=None, metavar="ROLE=COL,...",
                   help="which column is which: roles image, prompt, id, max_new_tokens (default names: "
                        "images/image/image_path/file_name, prompt/text/question, id, max_new_tokens)")
    p.add_argument("--sweep", action="append", default=None, metavar="KEY=V1,V2,...",
                   help="profile every sample at every point of the cartesian product of these (repeatable): "
                        "max_new_tokens, min_new_tokens, batch_size, dtype, or a processor setting (an attribute "
                        "of the image processor or processor, e.g. do_resize, size.longest_edge, max_image_tiles); "
                        "each record carries its point (sweep_point)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--min-new-tokens", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="profile at most N samples (at every sweep point)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="place the model with transformers' device_map (e.g. 'auto' to split it over the GPUs; "
                        "needs accelerate); each layer mark is then recorded on the GPU whose work it waits for, "
                        "stage marks on every GPU of the model")
    p.add_argument("--out", default="stagetrace-out",
                   help="folder of the run; a rerun with the same settings resumes it, other settings are refused")
    p.add_argument("--fresh", action="store_true",
                   help="start the run anew: earlier results in --out are moved into --out/replaced-<time>/")
    p.add_argument("--layer-detail", nargs="?", const="all", choices=["off", "prefill", "all"], default=None,
                   help="a span per decoder layer: in prefill only, or in every step ('all', the default when "
                        "given without a value)")
    p.add_argument("--layers", nargs="?", const="all", choices=["prefill", "all"], help=argparse.SUPPRESS)
    p.add_argument("--layer-every", type=int, default=1, metavar="N",
                   help="with --layer-detail all: layers on the prefill and on every N-th decode step only "
                        "(records list which steps carry them: layer_steps)")
    p.add_argument("--lead-every", type=int, default=None, metavar="N",
                   help="the GPU lead's mark (each forward's return to generate()) on the prefill and on every "
                        "N-th decode step only; default: every step of an eager decode, every 8th of a compiled "
                        "one (records say which: lead_every, decode_step_lead_us is null on the others)")
    p.add_argument("--layer-marks", choices=["pair", "shared", "matmul"], default="pair",
                   help="with --layer-detail: 'shared' puts one mark per boundary between layers (half the cost; "
                        "work run between two layers counts to the earlier one); 'matmul' does the same, and inside "
                        "compiled decode moves each to the previous layer's last matmul so the compiler still fuses "
                        "across layers (records count those marks: layer_marks_after_matmul)")
    p.add_argument("--warmup", type=int, default=1, help="untraced generate() calls before the first traced one (of each sweep point)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    p.add_argument("--vision", nargs="+", default=None, help="override: vision module path(s)")
    p.add_argument("--language-model", default=None, help="override: language model path")
    p.add_argument("--lm-head", default=None, help="override: lm_head path")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_profile)


def build_parser() -> argparse.ArgumentParser:
    from .compare import add_compare_parser
    from .demo import cmd_demo
    from .fit import add_fit_parser
    from .merge import cmd_merge
    from .report import cmd_plot, cmd_report

    ap = OneLineParser(prog="stagetrace", description="Where the time of model.generate() goes.",
                       epilog="exit status: 0 done, 1 compare --fail-if-slower tripped, 2 bad input (one line on "
                              "stderr), 130 interrupted")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="trace a tiny random-weight VLM (no download) and write a trace")
    d.add_argument("--out", default="stagetrace-demo")
    d.add_argument("--device", default="auto")
    d.add_argument("--calls", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.set_defaults(fn=cmd_demo)

    _profile_parser(sub)

    r = sub.add_parser("report", help="summary table of records")
    r.add_argument("records", nargs="+")
    r.add_argument("--csv", default=None)
    r.add_argument("--json", action="store_true")
    r.add_argument("--point", action="append", default=None, metavar="KEY=VALUE",
                   help="only records of the sweep points with this setting (repeatable); records of several "
                        "points are summarized point by point")
    r.set_defaults(fn=cmd_report)

    pl = sub.add_parser("plot", help="picture of where the time goes (needs matplotlib)")
    pl.add_argument("records", nargs="+", metavar="RECORDS", help="records files or run folders")
    pl.add_argument("-o", "--output", default="stagetrace.png", help="its extension picks the format")
    pl.add_argument("--fit", default=None, metavar="MODEL",
                    help="a latency model (stagetrace fit): draw measured against predicted, stage by stage")
    pl.set_defaults(fn=cmd_plot)

    m = sub.add_parser("merge", help="join per-rank records and traces")
    m.add_argument("inputs", nargs="+", metavar="DIR|FILE")
    m.add_argument("-o", "--output", default="stagetrace-merged")
    m.set_defaults(fn=cmd_merge)

    add_compare_parser(sub)
    add_fit_parser(sub)
    return ap


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    print(f"stagetrace: warning: {show(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status (see the module doc), also for a bad command line."""
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line  # a warning is one line, without the source line under it
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, or a bad command line already said in one line
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        try:
            return int(args.fn(args) or 0)
        except CliError as exc:
            print(f"stagetrace: error: {show(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("stagetrace: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout went to `| head`, which has closed: the work itself is done
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
