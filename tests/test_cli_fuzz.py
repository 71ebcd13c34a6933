"""The `stagetrace` command fuzzed: random and boundary values for every flag, random paths,
files of random bytes, truncated and wrong-typed records and traces.

Every run, whatever its command line, must: exit 0 or 2 (or 1: ``compare --fail-if-slower``
finding a stage slower); print no traceback; change no
input (sha256 before and after); write nothing outside the outputs it was given; and lose
no records (a records file that existed is only appended to, or moved aside by --fresh, or
is an earlier merge's output that merge replaces). Seeded and in-process (plus a few real
subprocesses); command lines that pass every check load a tiny checkpoint, so they are kept
short (few tokens, few samples).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from stagetrace.cli import main

ROOT = Path(__file__).resolve().parent.parent
N_IN_PROCESS = 240
N_SUBPROCESS = 4

WEIRD = os.fsdecode(b"we;ird \xff\nname")  # a ';', a space, a byte that is not UTF-8, a newline


@dataclass
class Sandbox:
    root: Path
    inp: Path    # inputs: must never change
    out: Path    # where outputs may go
    cwd: Path    # where the command runs (default output names land here)


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _make_inputs(inp: Path) -> None:
    from PIL import Image

    from stagetrace.testing import checkpoints
    from test_cli import png_header

    rng = random.Random(1234)
    checkpoints.save_tiny_checkpoint(str(inp / "llama"), "llama")
    checkpoints.save_tiny_checkpoint(str(inp / "llava"), "llava")
    (inp / "listcfg").mkdir()
    (inp / "listcfg" / "config.json").write_text("[1, 2]")
    (inp / "noweights").mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (inp / "noweights" / f).write_bytes((inp / "llama" / f).read_bytes())
    (inp / "images").mkdir()
    for i, size in enumerate([(30, 20), (24, 24)]):
        Image.new("RGB", size, (50 * i, 90, 200)).save(inp / "images" / f"img{i}.png")
    Image.new("RGB", (20, 20)).save(inp / "images" / f"{WEIRD}.png")
    (inp / "images" / "noise.png").write_bytes(_random_bytes(rng, 300))
    png_header(inp / "bomb.png", 15000, 15000)
    (inp / "bad_images").mkdir()
    for i in range(2):
        (inp / "bad_images" / f"b{i}.jpg").write_bytes(_random_bytes(rng, 200))
    (inp / "prompts.txt").write_text("what is this\n\nand this one\n")
    (inp / "empty.txt").write_text("\n \n")
    (inp / "noise.txt").write_bytes(_random_bytes(rng, 400))
    (inp / "long.txt").write_text("word " * 800 + "\n")
    (inp / "victim.txt").write_text("precious")
    _make_datasets(inp, rng)
    _make_records_and_traces(inp, rng)
    _make_models(inp)


def _make_datasets(inp: Path, rng: random.Random) -> None:
    """Dataset files for --dataset: good ones, ones with bad rows, and ones that are no dataset at all."""
    rows = [{"id": "a", "image": "images/img0.png", "prompt": "what is this", "max_new_tokens": 1},
            {"id": "b", "image": ["images/img0.png", "images/img1.png"], "prompt": "describe it"},
            {"id": "c", "image": "images/noise.png", "prompt": "hi"}, {"id": "d", "image": "gone.png", "prompt": "x"},
            {"id": "e", "prompt": ""}]
    (inp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (inp / "text.csv").write_text("id,prompt,max_new_tokens\nt1,hello there,2\nt2,what is this,x\n")
    (inp / "dup.jsonl").write_text('{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n')
    (inp / "noprompt.csv").write_text("id,q\n1,hello\n")
    (inp / "noise.parquet").write_bytes(_random_bytes(rng, 500))
    (inp / "saved").mkdir()
    (inp / "saved" / "dataset_info.json").write_text("{}")


def _make_records_and_traces(inp: Path, rng: random.Random) -> None:
    run = inp / "run"
    assert main(["profile", str(inp / "llama"), "--prompts", str(inp / "prompts.txt"), "--max-new-tokens", "2",
                 "--out", str(run), "--no-progress"]) == 0
    good = (run / "records.jsonl").read_bytes()
    lines = good.decode().splitlines()
    (inp / "good.jsonl").write_bytes(good)
    (inp / "truncated.jsonl").write_bytes(good[: len(good) // 2 + 7])
    d = json.loads(lines[0])
    wrong = [dict(d, total_ms="12"), dict(d, prefill_ms=math.nan), dict(d, decode_ms=math.inf),
             dict(d, batch_size=[1]), dict(d, spans="x"), dict(d, schema=99, total_ms=None), [1, 2, 3], 42]
    (inp / "wrongtype.jsonl").write_text("".join(json.dumps(w) + "\n" for w in wrong))
    (inp / "failed.jsonl").write_text(json.dumps(dict(d, error="boom")) + "\n")
    (inp / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good)
    (inp / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (inp / "noise.jsonl").write_bytes(_random_bytes(rng, 3000))
    (inp / "empty.jsonl").write_bytes(b"")
    (inp / f"{WEIRD}.jsonl").write_bytes(good)
    trace = (run / "trace.json").read_bytes()
    (inp / "trace.json").write_bytes(trace)
    (inp / "trace.json.gz").write_bytes(gzip.compress(trace))
    (inp / "truncated.json").write_bytes(trace[: len(trace) // 2])
    (inp / "truncated.json.gz").write_bytes(gzip.compress(trace)[:-20])
    (inp / "notgz.json.gz").write_bytes(_random_bytes(rng, 100))
    (inp / "nokeys.json").write_text('{"events": []}')
    (inp / "wrongtrace.json").write_text('{"traceEvents": [{"name": 1, "ph": "X", "pid": "a"}]}')
    ranks = inp / "ranks"
    ranks.mkdir()
    for r in (0, 1):
        (ranks / f"records.rank{r}.jsonl").write_text(lines[r] + "\n")
        t = json.loads(trace)
        t["otherData"]["ranks"] = [r]
        for ev in t["traceEvents"]:
            ev["pid"] = r
        (ranks / f"trace.rank{r}.json").write_text(json.dumps(t))


def _make_models(inp: Path) -> None:
    """Records of made-up calls (enough to fit and compare), a latency model and models that are not."""
    from stagetrace.fit import fit
    from stagetrace.records import write_jsonl
    from stagetrace.testing.synthetic import latency_records, scaled

    many = latency_records(40, seed=0)
    write_jsonl(many, inp / "many.jsonl")
    write_jsonl(scaled(many, 1.2, noise=0.02), inp / "many_slower.jsonl")
    write_jsonl(scaled(many, 0.9, ids=False), inp / "many_faster_no_ids.jsonl")
    fit(many).save(inp / "model.json")
    text = (inp / "model.json").read_text()
    (inp / "truncated_model.json").write_text(text[: len(text) // 2])
    (inp / "newer_model.json").write_text(text.replace('"version": 1', '"version": 2', 1))
    (inp / "nan_model.json").write_text(text.replace('"intercept_ms": ', '"intercept_ms": "x", "was": ', 1))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    root = tmp_path_factory.mktemp("fuzz")
    sb = Sandbox(root, root / "in", root / "out", root / "cwd")
    for d in (sb.inp, sb.out, sb.cwd):
        d.mkdir()
    _make_inputs(sb.inp)
    (sb.inp / "empty_victim.txt").write_bytes(b"")
    for name, target in (("linked", "victim.txt"), ("linked_empty", "empty_victim.txt")):
        (sb.out / name).mkdir()  # an --out whose records.jsonl is a link to a user's file
        (sb.out / name / "records.jsonl").symlink_to(sb.inp / target)
    return sb


# ---------------------------------------------------------------- command lines
def _count(rng: random.Random, huge: bool = False) -> str:
    pool = ["-1", "0", "1", "1", "2", "2", "abc", "", "1.5", "-0"] + (["99999999999999999999"] if huge else [])
    return rng.choice(pool)


def _maybe(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _out_dir(rng: random.Random, sb: Sandbox) -> str:
    return rng.choice([str(sb.out / "A"), str(sb.out / "A"), str(sb.out / "B"), str(sb.out / "linked"),
                       str(sb.out / "linked_empty"), str(sb.out / "linked_empty"),
                       str(sb.out / rng.choice("CDEF")), str(sb.inp / "prompts.txt" / "sub"), "",
                       str(sb.out / WEIRD), str(sb.inp / "run")])


def _records(rng: random.Random, sb: Sandbox) -> list[str]:
    pool = ["good.jsonl", "truncated.jsonl", "wrongtype.jsonl", "failed.jsonl", "bom.jsonl", "deep.jsonl",
            "noise.jsonl", "empty.jsonl", f"{WEIRD}.jsonl", "missing.jsonl", "images", "run/records.jsonl"]
    return [str(sb.inp / rng.choice(pool)) for _ in range(rng.randint(1, 3))]


def _profile_argv(rng: random.Random, sb: Sandbox) -> list[str]:
    """Half of them plausible (mostly valid values, so runs get as far as profiling, resuming or
    meeting another run's fingerprint), half drawn from every value, bad ones included."""
    inp, ok = sb.inp, rng.random() < 0.5
    pick = lambda good, bad: rng.choice(good if ok else good + bad)  # noqa: E731
    argv = ["profile", str(inp / pick(["llama", "llava"], ["listcfg", "noweights", "images", "missing",
                                                            "prompts.txt"]))]
    if _maybe(rng, 0.12):
        _sweep_argv(rng, argv, pick)
    if _maybe(rng, 0.25):  # a dataset instead of --images/--prompt(s); now and then mixed with them, refused
        argv += ["--dataset", str(inp / pick(["data.jsonl", "text.csv"], ["dup.jsonl", "noprompt.csv", "noise.parquet",
                                                                           "saved", "prompts.txt", "missing.jsonl",
                                                                           "images"]))]
        if _maybe(rng, 0.15):
            argv += ["--dataset-columns", pick(["prompt=prompt", "id=id,prompt=prompt"],
                                               ["prompt=nope", "bogus=x", "prompt", ""])]
        if ok or _maybe(rng, 0.7):
            argv += ["--max-new-tokens", "2", "--no-progress"]
            return argv + (["--out", str(sb.out / rng.choice("ABCDGH"))] if _maybe(rng, 0.9) else [])
    if _maybe(rng, 0.45):
        argv += ["--images", *[str(inp / pick(["images", "images/img0.png"], ["bad_images", "bomb.png",
                                                                              "missing.png", "prompts.txt"]))
                               for _ in range(rng.randint(1, 2))]]
    if rng.random() < 0.55:
        argv += ["--prompt", pick(["hi", "describe it", "a;b"], ["", "  ", "word " * 800, os.fsdecode(b"\xff\xfe"),
                                                               "x\ny"])]
    elif ok or rng.random() < 0.8:
        argv += ["--prompts", str(inp / pick(["prompts.txt"], ["empty.txt", "noise.txt", "long.txt", "missing.txt",
                                                               "images"]))]
    for flag, p, huge in (("--max-new-tokens", 0.8, True), ("--min-new-tokens", 0.2, False), ("--n", 0.5, True),
                          ("--batch-size", 0.3, True), ("--warmup", 0.4, False)):
        if _maybe(rng, p):
            argv += [flag, pick(["1", "2"], [_count(rng, huge)])]
    if "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", "2"]  # the default (16) only makes valid runs slower
    if _maybe(rng, 0.3):
        argv += ["--dtype", pick(["auto", "float32", "bfloat16"], ["float16", "float64"])]
    if _maybe(rng, 0.3):
        argv += ["--device", pick(["auto", "cpu", "cpu:0"], ["cuda", "cuda:3", "meta", "banana", "", "mps"])]
    if _maybe(rng, 0.05):
        argv += ["--device-map", pick(["cpu"], ["banana"])]
    if _maybe(rng, 0.9):
        argv += ["--out", str(sb.out / rng.choice([*"ABCDEFGH", "linked_empty"])) if ok else _out_dir(rng, sb)]
    argv += [f for f, p in (("--fresh", 0.15), ("--trust-remote-code", 0.05), ("--no-progress", 0.9)) if _maybe(rng, p)]
    if _maybe(rng, 0.2):
        argv += ["--layer-detail", *pick([[], ["off"], ["prefill"], ["all"]], [["banana"]])]
    if _maybe(rng, 0.1):
        argv += ["--layers", *rng.choice([[], ["prefill"], ["all"]])]
    if _maybe(rng, 0.1):
        argv += ["--layer-marks", pick(["pair", "shared", "matmul"], ["x"])]
    if _maybe(rng, 0.05):
        argv += rng.choice([["--vision", "model.nope"], ["--language-model", "x.y"], ["--lm-head", ""]])
    return argv


def _sweep_argv(rng: random.Random, argv: list[str], pick) -> None:
    for _ in range(rng.randint(1, 2)):
        argv += ["--sweep", pick(["max_new_tokens=1,2", "batch_size=1,2", "dtype=float32,bfloat16", "do_resize=true,false"],
                                 ["banana=1", "batch_size=0", "max_new_tokens=1,1", "dtype=float64", "=1", "x=", "a.b=1",
                                  "size.nope=3", "min_new_tokens=5"])]


def _point_flags(rng: random.Random, argv: list[str]) -> list[str]:
    if _maybe(rng, 0.15):
        argv += ["--point", rng.choice(["dtype=float32", "batch_size=1", "bogus", "x=y", ""])]
    return argv


def _argv(rng: random.Random, sb: Sandbox) -> list[str]:
    command = rng.choice(["profile"] * 5 + ["demo", "report", "report", "plot", "merge", "merge", "bogus"])
    inp = sb.inp
    if command == "profile":
        argv = _profile_argv(rng, sb)
    elif command == "demo":
        argv = ["demo", "--calls", rng.choice(["-1", "0", "1", "abc"]), "--max-new-tokens", _count(rng, huge=True)]
        argv += ["--out", _out_dir(rng, sb)] if _maybe(rng, 0.9) else []
        argv += ["--device", rng.choice(["cpu", "meta", "banana"])] if _maybe(rng, 0.3) else []
    elif command == "report":
        argv = ["report", *_records(rng, sb)]
        if _maybe(rng, 0.5):
            argv += ["--csv", rng.choice([str(sb.out / "s.csv"), str(inp / "good.jsonl"), str(sb.out / "A"),
                                          str(inp / "prompts.txt" / "s.csv"), "", str(sb.out / WEIRD)])]
        argv += ["--json"] if _maybe(rng, 0.3) else []
        _point_flags(rng, argv)
    elif command == "plot":
        argv = ["plot", *_records(rng, sb)]
        if _maybe(rng, 0.8):
            argv += ["-o", rng.choice([str(sb.out / "p.png"), str(sb.out / "p.svg"), str(sb.out / "p.banana"),
                                       str(sb.out / "p"), str(inp / "prompts.txt" / "p.png"), ""])]
    elif command == "merge":
        pool = ["run", "ranks", "trace.json", "trace.json.gz", "truncated.json", "truncated.json.gz",
                "notgz.json.gz", "nokeys.json", "wrongtrace.json", "good.jsonl", "noise.jsonl", "missing.json",
                "prompts.txt", "ranks/trace.rank0.json"]
        argv = ["merge", *[str(inp / rng.choice(pool)) for _ in range(rng.randint(1, 3))]]
        if _maybe(rng, 0.9):
            argv += ["-o", rng.choice([str(sb.out / "M"), str(sb.out / "M"), str(sb.out / "A"), str(inp / "run"),
                                       str(inp / "prompts.txt" / "m"), ""])]
    else:
        argv = [rng.choice(["bogus", "", "--bogus", "profile"])] + (["--no-such-flag"] if _maybe(rng, 0.5) else [])
    if _maybe(rng, 0.03):
        argv.insert(rng.randrange(1, len(argv) + 1), "--no-such-flag")
    return argv


def _outputs(argv: list[str], sb: Sandbox) -> list[Path]:
    """Where this command line may write: its --out / -o / --csv (or their defaults, in the cwd)."""
    defaults = {"profile": "stagetrace-out", "demo": "stagetrace-demo", "merge": "stagetrace-merged",
                "plot": "stagetrace.png"}
    given = [argv[i + 1] for i, a in enumerate(argv[:-1])
             if a in ("--out", "-o", "--output", "--csv", "--json", "--markdown")]
    if argv and argv[0] in defaults and not any(a in ("--out", "-o", "--output") for a in argv):
        given.append(defaults[argv[0]])
    return [Path(os.path.abspath(sb.cwd / g)) for g in given]


# ---------------------------------------------------------------- checks
def _state(root: Path) -> dict[str, str]:
    """Every path under root: a link's target, or a file's sha256 (links are not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[p] = "link->" + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _records_bytes(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("records*.jsonl") if p.is_file() and not p.is_symlink()}


def _merge_outputs(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / "stagetrace-merge.json").read_text())["written"])
    except (OSError, ValueError, KeyError):
        return set()


def _check_run(argv: list[str], rc: object, err: str, sb: Sandbox, before: dict[str, str],
               records_before: dict[str, bytes]) -> None:
    shown = [os.fsencode(a) for a in argv]
    fail_if_slower = argv[:1] == ["compare"] and "--fail-if-slower" in argv
    assert rc in ((0, 1, 2) if fail_if_slower else (0, 2)), (shown, rc, err[-2000:])
    assert "Traceback" not in err, (shown, err[-3000:])
    after = _state(sb.root)
    allowed = _outputs(argv, sb)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    outside = [p for p in changed if not any(Path(p) == a or a in Path(p).parents for a in allowed)]
    assert not outside, (shown, outside)
    assert not [p for p in changed if p in before and Path(p).is_relative_to(sb.inp)], shown  # no input changed
    moved_aside = {after[p] for p in after if "/replaced-" in p}
    for path, old in records_before.items():  # nothing lost
        new = Path(path).read_bytes() if Path(path).is_file() else None
        if new is not None and new.startswith(old):
            continue
        if hashlib.sha256(old).hexdigest() in moved_aside:
            continue
        assert Path(path).name in _merge_outputs(Path(path).parent), (shown, f"{path} lost records")


def _one_run(argv: list[str], sb: Sandbox, subprocess_run: bool = False) -> object:
    before, records_before = _state(sb.root), _records_bytes(sb.out)
    if subprocess_run:
        proc = subprocess.run([sys.executable, "-m", "stagetrace", *argv], cwd=sb.cwd, capture_output=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path])),
                              timeout=300)
        rc, err = proc.returncode, proc.stderr.decode("utf-8", "replace")
    else:
        buf_err, buf_out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(buf_err), contextlib.redirect_stdout(buf_out):
            rc = main(argv)
        err = buf_err.getvalue()
    _check_run(argv, rc, err, sb, before, records_before)
    return rc


def test_fuzzed_command_lines_exit_0_or_2_and_keep_every_input(sandbox, monkeypatch):
    monkeypatch.chdir(sandbox.cwd)
    outcomes: dict[object, int] = {}
    for seed in range(N_IN_PROCESS):
        rng = random.Random(seed)
        env = rng.choice([{}] * 8 + [{"RANK": "1", "WORLD_SIZE": "2"}, {"RANK": "x"}, {"RANK": "3", "WORLD_SIZE": "2"}])
        with monkeypatch.context() as m:
            for k in ("RANK", "WORLD_SIZE"):
                m.delenv(k, raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            rc = _one_run(_argv(rng, sandbox), sandbox)
        outcomes[rc] = outcomes.get(rc, 0) + 1
    # the fuzz reaches both sides: runs that do their work and runs refused
    assert outcomes.get(0, 0) >= 15 and outcomes.get(2, 0) >= 100, outcomes
    assert any(p.is_file() and not p.is_symlink() for p in sandbox.out.rglob("records*.jsonl"))
    assert (sandbox.inp / "victim.txt").read_text() == "precious"
    assert (sandbox.inp / "empty_victim.txt").read_bytes() == b""


@pytest.mark.parametrize("seed", range(N_SUBPROCESS))
def test_fuzzed_command_lines_as_real_processes(sandbox, seed):
    rng = random.Random(10_000 + seed)
    argv = _argv(rng, sandbox)
    _one_run(argv, sandbox, subprocess_run=True)


# ---------------------------------------------------------------- compare, fit, plot --fit
N_MODEL_COMMANDS = 100
_RUNS = (["many.jsonl", "many_slower.jsonl", "many_faster_no_ids.jsonl"],  # plausible
         ["good.jsonl", "run", "ranks", "failed.jsonl", "truncated.jsonl", "noise.jsonl", "empty.jsonl",
          f"{WEIRD}.jsonl", "missing.jsonl", "images", "model.json"])
_MODELS = (["model.json"], ["truncated_model.json", "newer_model.json", "nan_model.json", "trace.json", "missing.json",
                            "prompts.txt", "images", "many.jsonl"])


class _Picker:
    """Half the command lines plausible (good values only, so they get as far as the work), half
    drawn from every value, bad ones included."""

    def __init__(self, rng: random.Random):
        self.rng, self.ok = rng, rng.random() < 0.5

    def __call__(self, good: list, bad: list):
        return self.rng.choice(good if self.ok else good + bad)

    def flag(self, argv: list[str], flag: str, p: float, good: list[str], bad: list[str]) -> None:
        if _maybe(self.rng, p):
            argv += [flag, self(good, bad)]

    def runs(self, sb: Sandbox, n: int) -> list[str]:
        return [str(sb.inp / self(*_RUNS)) for _ in range(n)]


def _compare_argv(rng: random.Random, sb: Sandbox) -> list[str]:
    from stagetrace.compare import STAGES

    pick, out = _Picker(rng), sb.out
    if pick.ok:  # B against the run it was made from: slower, faster or the same
        argv = ["compare", str(sb.inp / "many.jsonl"), str(sb.inp / rng.choice(_RUNS[0]))]
    else:
        argv = ["compare", *pick.runs(sb, 2 if rng.random() < 0.7 else rng.choice([1, 3]))]
    pick.flag(argv, "--csv", 0.3, [str(out / "c.csv"), str(out / WEIRD)],
              [str(sb.inp / "many.jsonl"), "", "-", str(out / "A"), str(sb.inp / "prompts.txt" / "c.csv")])
    pick.flag(argv, "--json", 0.3, [str(out / "c.json"), "-"],
              [str(sb.inp / "trace.json"), str(out / "c.csv"), str(sb.inp / "many.jsonl"),
               str(out / "linked" / "records.jsonl")])
    pick.flag(argv, "--markdown", 0.2, [str(out / "c.md"), "-"], [str(out / "c.json"), ""])
    if _maybe(rng, 0.3):
        argv += ["--stage", *rng.sample([*STAGES] + ([] if pick.ok else ["bogus"]), rng.randint(1, 3))]
    pick.flag(argv, "--fail-if-slower", 0.6, ["0", "5", "50"], ["-1", "nan", "inf", "abc", "1e308"])
    pick.flag(argv, "--seed", 0.3, ["0", "7", "99999999999999999999"], ["-1", "abc"])
    pick.flag(argv, "--reps", 0.6, ["100", "200"], ["5", "0", "-3", "abc", "100000"])
    return _point_flags(rng, argv + (["--unpaired"] if _maybe(rng, 0.2) else []))


def _model_argv(rng: random.Random, sb: Sandbox) -> list[str]:
    pick, inp, out = _Picker(rng), sb.inp, sb.out
    records = pick.runs(sb, rng.randint(1, 2))
    if rng.random() < 0.6:
        argv = ["fit", *records]
        pick.flag(argv, "-o", 0.95 if pick.ok else 0.8, [str(out / "m.json"), str(out / WEIRD)],
                  [str(inp / "many.jsonl"), str(inp / "trace.json"), str(out / "A"), "",
                   str(inp / "prompts.txt" / "m.json"), str(out / "linked" / "records.jsonl")])
        pick.flag(argv, "--seed", 0.3, ["0", "3"], ["-1", "x"])
        pick.flag(argv, "--folds", 0.3, ["2", "5", "10"], ["1", "11", "0", "abc"])
        return _point_flags(rng, argv)
    argv = ["plot", "--fit", str(inp / pick(*_MODELS)), *records]
    pick.flag(argv, "-o", 0.9, [str(out / "f.png"), str(out / "f.svg")],
              [str(out / "f.banana"), "", str(inp / "model.json"), str(inp / "prompts.txt" / "f.png")])
    return argv


def test_fuzzed_compare_fit_and_plot_fit_exit_0_1_or_2_and_keep_every_input(sandbox, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(sandbox.cwd)
    outcomes: dict[object, int] = {}
    for seed in range(N_MODEL_COMMANDS):
        rng = random.Random(50_000 + seed)
        argv = _compare_argv(rng, sandbox) if rng.random() < 0.55 else _model_argv(rng, sandbox)
        if _maybe(rng, 0.03):
            argv.insert(rng.randrange(1, len(argv) + 1), "--no-such-flag")
        rc = _one_run(argv, sandbox)
        outcomes[(argv[0], rc)] = outcomes.get((argv[0], rc), 0) + 1
    # every command reaches both sides, and --fail-if-slower trips
    assert all(outcomes.get((c, rc), 0) >= 3 for c in ("compare", "fit", "plot") for rc in (0, 2)), outcomes
    assert outcomes.get(("compare", 1), 0) >= 1, outcomes
