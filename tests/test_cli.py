"""The `stagetrace` command end to end, on a tiny checkpoint saved to disk (no downloads)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stagetrace.testing import tiny
from stagetrace.cli import main
from stagetrace.records import load_records

from trace_format import validate_trace

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    tiny.save_tiny_checkpoint(str(path), "llava")
    return path


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    tiny.save_tiny_checkpoint(str(path), "llama")
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
               "--out", out, "--no-progress", "--layers", "--layer-marks", "shared") == 0
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
