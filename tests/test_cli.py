"""The `stagetrace` command end to end, on a tiny checkpoint saved to disk (no downloads)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from stagetrace.records import SCHEMA_VERSION
from stagetrace.testing import checkpoints
from stagetrace.cli import main
from stagetrace.records import load_records

from trace_format import validate_trace

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    checkpoints.save_tiny_checkpoint(str(path), "llava")
    return path


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    checkpoints.save_tiny_checkpoint(str(path), "llama")
    return path


@pytest.fixture()
def images(tmp_path) -> Path:
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    for i, size in enumerate([(40, 30), (64, 64), (20, 50), (33, 33), (50, 20)]):
        Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)).save(d / f"img{i}.png")
    return d


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_demo_end_to_end(tmp_path, capsys):
    assert run("demo", "--out", tmp_path / "demo", "--calls", "2", "--max-new-tokens", "4") == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "ui.perfetto.dev" in out
    recs = load_records(tmp_path / "demo" / "records.jsonl")
    assert len(recs) == 4 and [r.sample_id for r in recs] == ["image-0", "image-1", "text-only", "batch-2"]
    validate_trace(json.loads((tmp_path / "demo" / "trace.json").read_text()))


def test_profile_end_to_end_with_images_batches_and_resume(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["profile", checkpoint, "--images", images, "--prompt", "describe this image", "--max-new-tokens", "3",
            "--min-new-tokens", "3", "--out", out, "--no-progress", "--dtype", "float32"]
    assert run(*args, "--n", "3") == 0
    recs = load_records(out / "records.jsonl")
    assert [r.sample_id for r in recs] == ["img0.png#0", "img1.png#0", "img2.png#0"]
    assert all(r.vision_ms > 0 and r.output_tokens == 3 and len(r.decode_step_ms) == 2 for r in recs)
    assert recs[0].model_class == "LlavaForConditionalGeneration" and str(checkpoint) in recs[0].model_name
    validate_trace(json.loads((out / "trace.json").read_text()))
    capsys.readouterr()

    assert run(*args, "--batch-size", "2") == 0  # resumes: only img3, img4 remain, as one batch of 2
    assert "resuming: 3 of 5 samples already" in capsys.readouterr().out
    recs = load_records(out / "records.jsonl")
    assert len(recs) == 4 and recs[-1].sample_id == "img3.png#0;img4.png#0" and recs[-1].batch_size == 2


def test_profile_text_only_checkpoint_with_a_prompt_file_and_layers(text_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is this\n\n a b c d\n")
    out = tmp_path / "run"
    assert run("profile", text_checkpoint, "--prompts", prompts, "--max-new-tokens", "2", "--min-new-tokens", "2",
               "--out", out, "--no-progress", "--layer-detail", "--layer-marks", "shared") == 0
    recs = load_records(out / "records.jsonl")
    assert [r.sample_id for r in recs] == ["prompt-0", "prompt-1"]
    assert all(r.vision_ms is None and r.layer_detail == "all" and r.layer_marks == "shared" for r in recs)


def test_profile_places_the_model_with_a_device_map(text_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert run("profile", text_checkpoint, "--prompt", "hello there", "--max-new-tokens", "2",
               "--device-map", "cpu", "--out", out, "--no-progress") == 0
    (rec,) = load_records(out / "records.jsonl")
    assert rec.error is None and rec.device == "cpu" and rec.output_tokens == 2


def test_a_bad_image_is_named_skipped_and_counted(checkpoint, images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "run"
    assert run("profile", checkpoint, "--images", images, "--prompt", "what color ?", "--max-new-tokens", "2",
               "--out", out, "--no-progress") == 0
    captured = capsys.readouterr()
    assert "skipped image" in captured.out + captured.err and "broken.png" in captured.out + captured.err
    assert "1 image(s) could not be decoded" in captured.out
    assert len(load_records(out / "records.jsonl")) == 5


@pytest.mark.parametrize("case", ["missing_model", "not_a_checkpoint", "empty_prompts", "no_prompt",
                                  "unwritable_out", "missing_image", "bad_layout", "remote_code"])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(case, checkpoint, images, tmp_path, capsys):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n  \n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoModel": "m.M"}}))
    base = ["--prompt", "hi", "--out", tmp_path / "o", "--no-progress"]
    argv, expect = {
        "missing_model": (["profile", tmp_path / "nope", *base], "does not exist"),
        "not_a_checkpoint": (["profile", tmp_path, *base], "no readable config.json"),
        "empty_prompts": (["profile", checkpoint, "--prompts", prompts, "--out", tmp_path / "o"], "is empty"),
        "no_prompt": (["profile", checkpoint, "--out", tmp_path / "o"], "give a prompt"),
        "unwritable_out": (["profile", checkpoint, "--prompt", "hi", "--out", blocker / "sub"], "cannot be written"),
        "missing_image": (["profile", checkpoint, "--images", tmp_path / "no.png", *base], "does not exist"),
        "bad_layout": (["profile", checkpoint, "--images", images, "--vision", "model.nope", *base],
                       "stagetrace.trace(model, vision="),
        "remote_code": (["profile", remote, *base], "--trust-remote-code"),
    }[case]
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("stagetrace: error: ") and expect in err
    assert err.count("\n") == 1, err


def test_report_and_csv(tmp_path, capsys):
    run("demo", "--out", tmp_path, "--calls", "1", "--max-new-tokens", "3")
    capsys.readouterr()
    assert run("report", tmp_path / "records.jsonl", "--csv", tmp_path / "s.csv") == 0
    out = capsys.readouterr().out
    assert out.startswith("3 records") and "prefill" in out
    assert (tmp_path / "s.csv").read_text().startswith("stage,count,mean")
    assert run("report", tmp_path / "records.jsonl", "--json") == 0
    assert json.loads(capsys.readouterr().out)["total_ms"]["count"] == 3
    assert run("report", tmp_path / "missing.jsonl") == 2


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    run("demo", "--out", tmp_path, "--calls", "2", "--max-new-tokens", "3")
    assert run("plot", tmp_path / "records.jsonl", "-o", tmp_path / "p.png") == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run("plot", tmp_path, "-o", tmp_path / "q.png") == 0  # the run folder stands for its records
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_torchrun_ranks_profile_their_shards_and_merge(checkpoint, images, tmp_path, monkeypatch):
    out = tmp_path / "run"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert run("profile", checkpoint, "--images", images, "--prompt", "hi", "--max-new-tokens", "2",
                   "--out", out, "--no-progress") == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    r0, r1 = load_records(out / "records.rank0.jsonl"), load_records(out / "records.rank1.jsonl")
    assert [r.sample_id for r in r0] == ["img0.png#0", "img2.png#0", "img4.png#0"]
    assert [r.sample_id for r in r1] == ["img1.png#0", "img3.png#0"] and all(r.rank == 1 for r in r1)
    assert run("merge", out, "-o", tmp_path / "merged") == 0
    assert len(load_records(tmp_path / "merged" / "records.jsonl")) == 5
    trace = json.loads((tmp_path / "merged" / "trace.json").read_text())
    assert {pid for pid, _ in validate_trace(trace)} == {0, 1}


def test_python_dash_m_runs_the_same_command():
    out = subprocess.run([sys.executable, "-m", "stagetrace", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "profile" in out.stdout


# ---------------------------------------------------------------- data safety (issue 12)
def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (the files themselves, not what links point to)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_error_line(capsys, expect: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("stagetrace: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expect in err, err
    return err


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (PIL refuses it at open, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails the test if the command gets as far as loading the model."""
    import stagetrace.cli.profile as prof

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(prof, "load_model", refuse)


def profile_args(ckpt, out, *extra, prompt="hi"):
    return ["profile", ckpt, "--prompt", prompt, "--max-new-tokens", "2", "--out", out, "--no-progress", *extra]


def test_merge_into_its_own_folder_is_refused_and_loses_nothing(text_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*profile_args(text_checkpoint, out)) == 0
    before = digest(out)
    capsys.readouterr()
    assert run("merge", out, "-o", out) == 2
    one_error_line(capsys, "is also an input")
    assert digest(out) == before and len(load_records(out / "records.jsonl")) == 1


def test_merging_a_torchrun_folder_into_itself_twice_changes_nothing(checkpoint, images, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert run("profile", checkpoint, "--images", images, "--prompt", "hi", "--max-new-tokens", "2",
                   "--out", out, "--no-progress") == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    inputs = digest(*out.glob("*.rank*.json*"))
    assert run("merge", out, "-o", out) == 0
    first = digest(out / "records.jsonl", out / "trace.json")
    assert run("merge", out, "-o", out) == 0
    assert digest(out / "records.jsonl", out / "trace.json") == first  # the same bytes, not twice the calls
    assert digest(*out.glob("*.rank*.json*")) == inputs
    trace = json.loads((out / "trace.json").read_text())
    calls = [e for e in trace["traceEvents"] if e["name"] == "generate"]
    assert len(calls) == 5 and trace["otherData"]["calls"] == 5 and trace["otherData"]["ranks"] == [0, 1]
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "stagetrace rank 0", 1: "stagetrace rank 1"}
    assert len(load_records(out / "records.jsonl")) == 5


@pytest.mark.parametrize("change", ["prompt", "max_new_tokens", "model", "dtype", "layer_detail", "images"])
def test_a_rerun_with_other_settings_is_refused_and_the_run_kept(change, checkpoint, text_checkpoint, images,
                                                                  tmp_path, capsys, monkeypatch):
    import stagetrace.cli.profile as prof

    out = tmp_path / "run"

    def argv(ckpt=checkpoint, prompt="describe", new="2", imgs=(images,), extra=()):
        return ["profile", ckpt, "--images", *imgs, "--prompt", prompt, "--max-new-tokens", new, "--out", out,
                "--no-progress", "--n", "2", *extra]

    assert run(*argv()) == 0
    monkeypatch.setattr(prof, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    before = digest(out)
    capsys.readouterr()
    other = {"prompt": dict(prompt="another prompt"), "max_new_tokens": dict(new="3"),
             "model": dict(ckpt=text_checkpoint), "dtype": dict(extra=("--dtype", "bfloat16")),
             "layer_detail": dict(extra=("--layer-detail",)), "images": dict(imgs=(images / "img0.png",))}[change]
    assert run(*argv(**other)) == 2
    err = one_error_line(capsys, "holds a run with other settings")
    assert "--fresh" in err and "another --out" in err
    assert digest(out) == before


def test_records_without_a_fingerprint_are_not_resumed(text_checkpoint, tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    (out / "records.jsonl").write_text('{"schema": 1}\n')
    assert run(*profile_args(text_checkpoint, out)) == 2
    one_error_line(capsys, "no readable stagetrace-run.json")
    assert (out / "records.jsonl").read_text() == '{"schema": 1}\n'


def test_fresh_moves_the_earlier_run_aside_and_deletes_nothing(text_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*profile_args(text_checkpoint, out, prompt="first")) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(old) == {"records.jsonl", "trace.json", "stagetrace-run.json"}
    capsys.readouterr()
    assert run(*profile_args(text_checkpoint, out, "--fresh", prompt="second")) == 0
    (aside,) = out.glob("replaced-*")
    assert f"moved the earlier results to {aside}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == old
    (rec,) = load_records(out / "records.jsonl")
    assert rec.prompt_tokens != load_records(aside / "records.jsonl")[0].prompt_tokens or rec.sample_id == "prompt-0"
    assert json.loads((out / "stagetrace-run.json").read_text())["prompts_sha256"] != \
        json.loads(old["stagetrace-run.json"])["prompts_sha256"]
    capsys.readouterr()
    assert run(*profile_args(text_checkpoint, out, prompt="second")) == 0  # the new run resumes
    assert "resuming: 1 of 1" in capsys.readouterr().out


def test_sample_ids_are_unique_for_any_file_name():
    from stagetrace.cli.runs import sample_id

    names = ["a;b.png", "a%3Bb.png", "a%253Bb.png", "a\nb.png", "a%0Ab.png", "dupA/1.png", "dupB/1.png", "1.png",
             "x#0.png", "x", os.fsdecode(b"\xff.png"), "%FF.png", "caf\u00e9.png"]
    ids = [sample_id(n, k) for n in names for k in (0, 1, 10)]
    assert len(set(ids)) == len(ids)
    assert all(";" not in i and "\n" not in i and i.isprintable() for i in ids)
    assert sample_id("dupA/1.png", 0) == "dupA/1.png#0" and sample_id("a;b.png", 2) == "a%3Bb.png#2"
    json.dumps(ids).encode("ascii")  # and they survive a records file


def test_same_names_in_two_folders_and_a_semicolon_are_each_profiled_once(checkpoint, tmp_path, capsys):
    from PIL import Image

    for d in ("dupA", "dupB"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (30, 30), (10, 200, 30)).save(tmp_path / d / "1.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "dupA" / "a;b.png")
    Image.new("RGB", (20, 30)).save(tmp_path / "dupA" / "a%3Bb.png")
    out = tmp_path / "run"
    args = ["profile", checkpoint, "--images", tmp_path / "dupA", tmp_path / "dupB", "--prompt", "hi",
            "--max-new-tokens", "2", "--out", out, "--no-progress", "--batch-size", "2"]
    assert run(*args) == 0
    ids = [i for r in load_records(out / "records.jsonl") for i in r.sample_id.split(";")]
    assert sorted(ids) == ["dupA/1.png#0", "dupA/a%253Bb.png#0", "dupA/a%3Bb.png#0", "dupB/1.png#0"]
    capsys.readouterr()
    assert run(*args) == 0
    assert "resuming: 4 of 4 samples already" in capsys.readouterr().out
    assert len(load_records(out / "records.jsonl")) == 2  # nothing profiled twice


def test_after_a_resume_the_trace_covers_every_record_of_the_run(checkpoint, images, tmp_path):
    out = tmp_path / "run"
    args = ["profile", checkpoint, "--images", images, "--prompt", "hi", "--max-new-tokens", "2", "--out", out,
            "--no-progress"]
    assert run(*args, "--n", "2") == 0
    assert run(*args, "--n", "4") == 0
    assert run(*args) == 0
    recs = load_records(out / "records.jsonl")
    trace = json.loads((out / "trace.json").read_text())
    validate_trace(trace)
    calls = [e for e in trace["traceEvents"] if e["name"] == "generate"]
    assert sorted(e["args"]["sample_id"] for e in calls) == sorted(r.sample_id for r in recs)
    assert len(calls) == 5 == trace["otherData"]["calls"]
    assert run(*args) == 0  # nothing left to do: the trace is still the whole run's
    assert json.loads((out / "trace.json").read_text())["otherData"]["calls"] == 5


def test_an_oversized_image_is_skipped_named_and_counted_and_resumes_survive_it(checkpoint, images, tmp_path,
                                                                                 capsys):
    png_header(images / "huge.png", 15000, 15000)
    out = tmp_path / "run"
    args = ["profile", checkpoint, "--images", images, "--prompt", "hi", "--max-new-tokens", "2", "--out", out,
            "--no-progress"]
    assert run(*args) == 0
    cap = capsys.readouterr()
    assert "huge.png" in cap.out and "DecompressionBombError" in cap.out
    assert "1 image(s) could not be decoded" in cap.out and "Traceback" not in cap.err
    assert len(load_records(out / "records.jsonl")) == 5
    assert run(*args) == 0  # the resume meets it again, skips it again, and is done
    assert len(load_records(out / "records.jsonl")) == 5


def test_every_image_bad_is_a_failed_run(checkpoint, tmp_path, capsys, no_model_load):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    png_header(tmp_path / "imgs" / "b.png", 15000, 15000)
    assert run("profile", checkpoint, "--images", tmp_path / "imgs", "--prompt", "hi", "--out", tmp_path / "o",
               "--no-progress") == 2
    err = capsys.readouterr().err
    assert "none of the 2 images to profile decodes" in err and err.count("stagetrace: error") == 1


@pytest.mark.parametrize("name", ["records.jsonl", "trace.json", "stagetrace-run.json"])
def test_links_in_out_are_never_written_through(name, text_checkpoint, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(victim)
    assert run(*profile_args(text_checkpoint, out)) == 2
    one_error_line(capsys, "is a symbolic link")
    assert victim.read_text() == "precious"


def test_the_write_probe_never_opens_a_file_already_there(text_checkpoint, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".stagetrace-write-test").symlink_to(victim)
    assert run(*profile_args(text_checkpoint, out)) == 0
    assert victim.read_text() == "precious"


def test_merge_and_report_outputs_are_not_written_through_links(tmp_path, capsys):
    run("demo", "--out", tmp_path / "d", "--calls", "1", "--max-new-tokens", "2")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "records.jsonl").symlink_to(victim)
    (tmp_path / "s.csv").symlink_to(victim)
    capsys.readouterr()
    assert run("merge", tmp_path / "d", "-o", tmp_path / "m") == 2
    one_error_line(capsys, "is a symbolic link")
    assert run("report", tmp_path / "d" / "records.jsonl", "--csv", tmp_path / "s.csv") == 2
    one_error_line(capsys, "is a symbolic link")
    assert victim.read_text() == "precious"


def test_ctrl_c_keeps_finished_records_writes_their_trace_and_exits_130(text_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(2000)))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "stagetrace", "profile", str(text_checkpoint), "--prompts",
                             str(prompts), "--max-new-tokens", "2", "--out", str(out), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "records.jsonl").exists() and (out / "records.jsonl").read_bytes().count(b"\n") >= 3):
            assert time.time() < deadline and proc.poll() is None, "the run wrote no records"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "stagetrace: interrupted" in err and err.count("\n") == 1, err
    recs = load_records(out / "records.jsonl")
    trace = json.loads((out / "trace.json").read_text())
    assert 3 <= len(recs) < 2000 and trace["otherData"]["calls"] == len(recs)
    assert sorted(e["args"]["sample_id"] for e in trace["traceEvents"] if e["name"] == "generate") == \
        sorted(r.sample_id for r in recs)


def test_a_prompt_longer_than_the_model_is_refused_up_front(text_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "long.txt"
    prompts.write_text("short one\n" + "word " * 800 + "\n")
    t0 = time.perf_counter()
    assert run("profile", text_checkpoint, "--prompts", prompts, "--out", tmp_path / "o", "--no-progress") == 2
    one_error_line(capsys, "prompt 2 is 80")
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "o" / "records.jsonl").exists()


def test_layer_detail_flag_and_its_deprecated_alias(text_checkpoint, tmp_path, capsys):
    assert run(*profile_args(text_checkpoint, tmp_path / "a", "--layer-detail", "prefill")) == 0
    assert load_records(tmp_path / "a" / "records.jsonl")[0].layer_detail == "prefill"
    assert "deprecated" not in capsys.readouterr().err
    assert run(*profile_args(text_checkpoint, tmp_path / "b", "--layers", "prefill")) == 0
    err = capsys.readouterr().err
    assert err == "stagetrace: note: --layers is deprecated, use --layer-detail (same values)\n"
    assert load_records(tmp_path / "b" / "records.jsonl")[0].layer_detail == "prefill"


def test_demo_replaces_a_demo_and_refuses_a_profile_run(text_checkpoint, tmp_path, capsys):
    assert run("demo", "--out", tmp_path / "d", "--calls", "1", "--max-new-tokens", "2") == 0
    assert run("demo", "--out", tmp_path / "d", "--calls", "2", "--max-new-tokens", "2") == 0
    assert len(load_records(tmp_path / "d" / "records.jsonl")) == 4
    assert run(*profile_args(text_checkpoint, tmp_path / "p")) == 0
    before = digest(tmp_path / "p")
    capsys.readouterr()
    assert run("demo", "--out", tmp_path / "p", "--calls", "1") == 2
    one_error_line(capsys, "not a demo's")
    assert digest(tmp_path / "p") == before


def test_report_of_random_bytes_is_one_line_per_file(tmp_path, capsys):
    run("demo", "--out", tmp_path / "d", "--calls", "1", "--max-new-tokens", "2")
    rng = random.Random(3)
    for name in ("noise1.jsonl", "noise2.jsonl"):
        (tmp_path / name).write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    capsys.readouterr()
    assert run("report", tmp_path / "d" / "records.jsonl", tmp_path / "noise1.jsonl", tmp_path / "noise2.jsonl") == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(ln.startswith("stagetrace: warning: ") for ln in err)
    assert run("report", tmp_path / "noise1.jsonl") == 2
    one_error_line(capsys, "no readable records")


def test_report_reads_a_records_file_with_a_byte_order_mark(tmp_path, capsys):
    run("demo", "--out", tmp_path / "d", "--calls", "1", "--max-new-tokens", "2")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "d" / "records.jsonl").read_bytes())
    capsys.readouterr()
    assert run("report", bom) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("3 records") and cap.err == ""


def _bad_inputs(tmp: Path, ckpt: Path) -> dict[str, tuple[list, str]]:
    """case -> (argv, what its one error line says). Made lazily: each case writes what it needs."""
    def write(name: str, data: bytes | str) -> Path:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def checkpoint_with(name: str, files: dict[str, bytes]) -> Path:
        d = tmp / name
        d.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (d / f).write_bytes((ckpt / f).read_bytes())
        for f, data in files.items():
            write(f"{name}/{f}", data)
        return d

    o = ["--out", tmp / "o", "--no-progress"]
    return {
        "no weights": lambda: (["profile", checkpoint_with("nw", {}), "--prompt", "hi", *o], "no file named"),
        "config is a list": lambda: (["profile", write("lc/config.json", "[1, 2]").parent, "--prompt", "hi", *o],
                                     "holds a JSON list"),
        "weights_only refuses": lambda: (["profile", checkpoint_with("pk", {"pytorch_model.bin": pickle.dumps(
            {"w": pickle.PickleBuffer}, protocol=4)}), "--prompt", "hi", *o], "Weights only load failed"),
        "prompt file not utf-8": lambda: (["profile", ckpt, "--prompts", write("p.txt", b"\xff\xfe hi"), *o],
                                          "not UTF-8"),
        "trace.json is a dir": lambda: ((tmp / "o" / "trace.json").mkdir(parents=True) or
                                        ["profile", ckpt, "--prompt", "hi", *o], "is a directory"),
        "records.jsonl is a dir": lambda: ((tmp / "o" / "records.jsonl").mkdir(parents=True) or
                                           ["profile", ckpt, "--prompt", "hi", *o], "is a directory"),
        "max-new-tokens 0": lambda: (["profile", ckpt, "--prompt", "hi", "--max-new-tokens", "0", *o], ">= 1"),
        "max-new-tokens -5": lambda: (["profile", ckpt, "--prompt", "hi", "--max-new-tokens", "-5", *o], ">= 1"),
        "device banana": lambda: (["profile", ckpt, "--prompt", "hi", "--device", "banana", *o], "not a device"),
        "device meta": lambda: (["profile", ckpt, "--prompt", "hi", "--device", "meta", *o], "not meta"),
        "n -1": lambda: (["profile", ckpt, "--prompt", "hi", "--n", "-1", *o], "--n must be >= 1"),
        "warmup -1": lambda: (["profile", ckpt, "--prompt", "hi", "--warmup", "-1", *o], "--warmup must be >= 0"),
        "min above max": lambda: (["profile", ckpt, "--prompt", "hi", "--min-new-tokens", "5", "--max-new-tokens",
                                   "4", *o], "is above --max-new-tokens"),
        "empty out": lambda: (["profile", ckpt, "--prompt", "hi", "--out", ""], "--out is empty"),
        "batch size 0": lambda: (["profile", ckpt, "--prompt", "hi", "--batch-size", "0", *o], ">= 1"),
        "not an int": lambda: (["profile", ckpt, "--prompt", "hi", "--n", "1.5", *o], "invalid int value"),
        "demo calls 0": lambda: (["demo", "--calls", "0", "--out", tmp / "d"], "--calls must be >= 1"),
        "demo max-new-tokens 0": lambda: (["demo", "--max-new-tokens", "0", "--out", tmp / "d"], ">= 1"),
        "records not objects": lambda: (["report", write("r.jsonl", "[1,2,3]\n42\n")], "not an object"),
        "records nested deep": lambda: (["report", write("r.jsonl", "[" * 200_000 + "]" * 200_000 + "\n")],
                                        "nested too deeply"),
        "csv under a file": lambda: (["report", write("r.jsonl", json.dumps(GOOD) + "\n"), "--csv",
                                      tmp / "r.jsonl" / "s.csv"], "is a file, not a directory"),
        "merge truncated trace": lambda: (["merge", write("t.json", '{"traceEvents": [{"ph": "X"'), "-o",
                                           tmp / "m"], "truncated or not JSON"),
        "merge not gzip": lambda: (["merge", write("t.json.gz", '{"traceEvents": []'), "-o", tmp / "m"],
                                   "not gzip"),
        "merge no traceEvents": lambda: (["merge", write("t.json", '{"events": []}'), "-o", tmp / "m"],
                                         "without a traceEvents list"),
        "plot all failed": lambda: (["plot", write("r.jsonl", json.dumps(dict(GOOD, error="x")) + "\n"), "-o",
                                     tmp / "p.png"], "no timed records"),
        "plot under a file": lambda: (["plot", write("r.jsonl", json.dumps(GOOD) + "\n"), "-o",
                                       tmp / "r.jsonl" / "p.png"], "is a file, not a directory"),
        "plot unknown extension": lambda: (["plot", write("r.jsonl", json.dumps(GOOD) + "\n"), "-o",
                                            tmp / "p.banana"], "must end in one of"),
    }


GOOD = {"schema": SCHEMA_VERSION, "total_ms": 10.0, "vision_ms": None, "prefill_ms": 6.0, "decode_ms": 3.0, "other_ms": 1.0,
        "ttft_ms": 7.0, "decode_step_ms": [1.5, 1.5], "batch_size": 1, "prompt_tokens": 4, "output_tokens": 3}
BAD_INPUTS = list(_bad_inputs(Path("."), Path(".")))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_each_bad_input_of_issue_12_is_one_line_and_exit_2(case, text_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib") if case.startswith("plot") else None
    argv, expect = _bad_inputs(tmp_path, text_checkpoint)[case]()
    inputs = digest(tmp_path)
    assert run(*argv) == 2
    one_error_line(capsys, expect)
    after = digest(tmp_path)
    assert {k: v for k, v in after.items() if k in inputs} == inputs  # no input changed
    assert not (tmp_path / "o" / "records.jsonl").is_file() and not (tmp_path / "m" / "records.jsonl").exists()


def test_merge_replaces_only_what_an_earlier_merge_wrote(text_checkpoint, tmp_path, capsys):
    assert run(*profile_args(text_checkpoint, tmp_path / "a")) == 0
    assert run(*profile_args(text_checkpoint, tmp_path / "b", prompt="other")) == 0
    before = digest(tmp_path / "b")
    capsys.readouterr()
    assert run("merge", tmp_path / "a", "-o", tmp_path / "b") == 2  # b holds a profile run's records
    one_error_line(capsys, "that no earlier merge wrote")
    assert digest(tmp_path / "b") == before
    assert run("merge", tmp_path / "a", "-o", tmp_path / "m") == 0
    assert run("merge", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "m") == 0  # its own earlier output
    assert len(load_records(tmp_path / "m" / "records.jsonl")) == 2
    (tmp_path / "m" / "records.jsonl").write_text((tmp_path / "m" / "records.jsonl").read_text()[:50])
    capsys.readouterr()
    assert run("merge", tmp_path / "a", "-o", tmp_path / "m") == 2  # changed since: the user's now
    one_error_line(capsys, "that no earlier merge wrote")


def test_report_does_not_write_its_csv_over_records(tmp_path, capsys):
    run("demo", "--out", tmp_path / "d", "--calls", "1", "--max-new-tokens", "2")
    other = tmp_path / "other.jsonl"
    other.write_bytes((tmp_path / "d" / "records.jsonl").read_bytes())
    capsys.readouterr()
    assert run("report", tmp_path / "d" / "records.jsonl", "--csv", other) == 2
    one_error_line(capsys, "named like records")
    assert other.read_bytes() == (tmp_path / "d" / "records.jsonl").read_bytes()


def test_layer_every_samples_the_steps_records_which_and_the_report_says_so(text_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("profile", text_checkpoint, "--prompt", "hello there", "--max-new-tokens", "7", "--min-new-tokens", "7",
               "--out", out, "--no-progress", "--layer-detail", "all", "--layer-every", "3") == 0
    (rec,) = load_records(out / "records.jsonl")
    assert rec.layer_every == 3 and rec.layer_steps == [0, 3] and len(rec.decode_step_ms) == 6
    capsys.readouterr()
    assert run("report", out / "records.jsonl") == 0
    assert "the prefill and 2 of 6 decode steps (layer_every=3)" in capsys.readouterr().out
    # a rerun with another sampling would mix two runs: refused
    assert run("profile", text_checkpoint, "--prompt", "hello there", "--max-new-tokens", "7", "--min-new-tokens", "7",
               "--out", out, "--no-progress", "--layer-detail", "all") == 2
    one_error_line(capsys, "--layer-every")
    for bad in (["--layer-every", "0", "--layer-detail", "all"], ["--layer-every", "2"]):
        assert run(*profile_args(text_checkpoint, tmp_path / "bad", *bad)) == 2
        one_error_line(capsys, "--layer-every")


def test_lead_every_samples_the_leads_records_which_and_the_report_says_so(text_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("profile", text_checkpoint, "--prompt", "hello there", "--max-new-tokens", "7", "--min-new-tokens", "7",
               "--out", out, "--no-progress", "--lead-every", "4") == 0
    (rec,) = load_records(out / "records.jsonl")
    assert rec.lead_every == 4 and len(rec.decode_step_ms) == 6 and rec.lead["decode"]["steps_read"] == 2
    assert [lead is not None for lead in rec.decode_step_lead_us] == [True, False, False, False, True, False]
    capsys.readouterr()
    assert run("report", out / "records.jsonl") == 0
    assert "read on 2 of their 6 decode steps (lead_every=4" in capsys.readouterr().out
    # a rerun with another sampling would mix two runs: refused
    assert run("profile", text_checkpoint, "--prompt", "hello there", "--max-new-tokens", "7", "--min-new-tokens", "7",
               "--out", out, "--no-progress") == 2
    one_error_line(capsys, "--lead-every")
    assert run(*profile_args(text_checkpoint, tmp_path / "bad", "--lead-every", "0")) == 2
    one_error_line(capsys, "--lead-every")


def test_images_for_a_checkpoint_without_an_image_processor_are_refused_not_dropped(text_checkpoint, images, tmp_path,
                                                                                    capsys):
    out = tmp_path / "run"
    assert run("profile", text_checkpoint, "--images", images, "--prompt", "what is it", "--out", out,
               "--no-progress") == 2
    one_error_line(capsys, "has no image processor")
    assert not (out / "records.jsonl").exists()


def test_the_cli_offers_exactly_the_tracers_layer_marks():
    """The CLI lists them itself (importing the tracer would import torch for --help)."""
    from stagetrace.cli import build_parser
    from stagetrace.tracing import LAYER_MARKS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    (action,) = [a for a in sub.choices["profile"]._actions if "--layer-marks" in a.option_strings]
    assert tuple(action.choices) == LAYER_MARKS


def test_the_report_says_where_layer_marks_sat_after_the_last_matmul(tmp_path, capsys):
    """layer_marks='matmul' under compiled decode: the boundary moved, and the report says so."""
    run("demo", "--out", tmp_path / "d", "--calls", "1", "--max-new-tokens", "2")
    capsys.readouterr()
    assert run("report", tmp_path / "d" / "records.jsonl") == 0
    assert "last matmul" not in capsys.readouterr().out
    line = json.loads((tmp_path / "d" / "records.jsonl").read_text().splitlines()[0])
    line.update(layer_marks="matmul", layer_marks_after_matmul=6)
    moved = tmp_path / "moved" / "records.jsonl"
    moved.parent.mkdir()
    moved.write_text(json.dumps(line) + "\n")
    assert run("report", moved) == 0
    assert "a layer ends right after its last matmul" in capsys.readouterr().out
