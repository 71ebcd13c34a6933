"""`stagetrace profile --dataset` and `--sweep` end to end on tiny checkpoints (no downloads), and the
dataset reader on every format: JSONL, CSV, Parquet, save_to_disk, an image folder with metadata."""
from __future__ import annotations

import copy
import csv
import io
import json
import sys
from pathlib import Path

import pytest

from stagetrace.cli import main
from stagetrace.cli.common import CliError
from stagetrace.cli.dataset import read_dataset
from stagetrace.records import load_records, write_jsonl
from stagetrace.testing import checkpoints

from test_cli import digest, one_error_line
from trace_format import validate_trace


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    checkpoints.save_tiny_checkpoint(str(path), "llava")
    return path


def png(size=(24, 20), color=(200, 40, 90)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Images beside the dataset files: a.png, b.png, c.png in imgs/."""
    (tmp_path / "imgs").mkdir()
    for name, size in (("a", (24, 20)), ("b", (40, 33)), ("c", (16, 50))):
        (tmp_path / "imgs" / f"{name}.png").write_bytes(png(size))
    return tmp_path


# The same three samples in every format: one image, two images, and an image at a relative path.
ROWS = [{"id": "cat-1", "image": ["imgs/a.png"], "prompt": "describe this image", "max_new_tokens": 2},
        {"id": "dog-2", "image": ["imgs/b.png", "imgs/c.png"], "prompt": "what color ?", "max_new_tokens": 3},
        {"id": 7, "image": ["imgs/c.png"], "prompt": "what is this", "max_new_tokens": 4}]


def write_jsonl_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "image", "prompt", "max_new_tokens"])
        w.writeheader()
        for r in rows:  # several images in one cell: a JSON list
            w.writerow(dict(r, image=json.dumps(r["image"]) if len(r["image"]) > 1 else r["image"][0]))
    return path


def hf_dataset(folder: Path, rows: list[dict]):
    """The rows as a datasets.Dataset whose images are stored as bytes (an Image list feature)."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"id": datasets.Value("string"), "images": datasets.List(datasets.Image()),
                               "question": datasets.Value("string"), "max_new_tokens": datasets.Value("int32")})
    return datasets.Dataset.from_dict(
        {"id": [str(r["id"]) for r in rows], "question": [r["prompt"] for r in rows],
         "max_new_tokens": [r["max_new_tokens"] for r in rows],
         "images": [[{"bytes": (folder / p).read_bytes(), "path": None} for p in r["image"]] for r in rows]},
        features=feats)


def make(kind: str, folder: Path, rows: list[dict] = ROWS) -> Path:
    if kind == "jsonl":
        return write_jsonl_rows(folder / "data.jsonl", rows)
    if kind == "csv":
        return write_csv_rows(folder / "data.csv", rows)
    if kind == "parquet":  # raw image bytes in a binary column
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        table = pa.table({"id": [str(r["id"]) for r in rows], "prompt": [r["prompt"] for r in rows],
                          "max_new_tokens": [r["max_new_tokens"] for r in rows],
                          "image": [[(folder / p).read_bytes() for p in r["image"]] for r in rows]})
        pq.write_table(table, folder / "data.parquet")
        return folder / "data.parquet"
    if kind == "load_from_disk":
        hf_dataset(folder, rows).save_to_disk(str(folder / "saved"))
        return folder / "saved"
    if kind in ("imagefolder_jsonl", "imagefolder_csv"):  # file_name relative to the folder holding metadata
        d = folder / "imgs"
        meta = [{"file_name": r["image"][0].removeprefix("imgs/"), "text": r["prompt"], "id": r["id"],
                 "max_new_tokens": r["max_new_tokens"]} for r in rows]
        if kind == "imagefolder_jsonl":
            write_jsonl_rows(d / "metadata.jsonl", meta)
        else:
            with open(d / "metadata.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(meta[0]))
                w.writeheader()
                w.writerows(meta)
        return d
    raise AssertionError(kind)


FORMATS = ["jsonl", "csv", "parquet", "load_from_disk", "imagefolder_jsonl", "imagefolder_csv"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_gives_its_samples_with_ids_images_and_max_new_tokens(kind, folder):
    ds = read_dataset(str(make(kind, folder)), {})
    assert ds.kind == kind.removesuffix("_jsonl").removesuffix("_csv") and not ds.skipped and ds.rows == 3
    assert [s.id for s in ds.samples] == ["cat-1", "dog-2", "7"]
    assert [s.prompt for s in ds.samples] == [r["prompt"] for r in ROWS]
    assert [s.max_new_tokens for s in ds.samples] == [2, 3, 4]
    one_image = kind.startswith("imagefolder")  # a metadata row names one file
    assert [len(s.images) for s in ds.samples] == ([1, 1, 1] if one_image else [1, 2, 1])
    expected = (folder / "imgs" / "b.png").read_bytes()
    second = ds.samples[1].images[0]
    got = second.data if second.data is not None else second.path.read_bytes()
    assert got == expected  # bytes, or a relative path resolved against the dataset's folder
    if kind in ("parquet", "load_from_disk"):
        assert second.path is None  # held as bytes, never written out
    elif kind in ("jsonl", "csv"):
        assert second.path == folder / "imgs" / "b.png"


def test_jsonl_csv_and_an_image_folder_need_no_datasets_and_parquet_says_how_to_get_it(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    for kind in ("jsonl", "csv", "imagefolder_jsonl"):
        assert len(read_dataset(str(make(kind, folder)), {}).samples) == 3
    (folder / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(CliError, match=r"needs `pip install 'stagetrace\[dataset\]'`"):
        read_dataset(str(folder / "x.parquet"), {})


def test_bad_rows_are_skipped_named_and_counted(folder):
    rows = [{"prompt": "ok one", "image": "imgs/a.png"},
            {"prompt": "", "image": "imgs/a.png"},               # no prompt
            {"prompt": "gone", "image": "imgs/missing.png"},     # image not found
            {"prompt": "bad count", "image": "imgs/a.png", "max_new_tokens": "many"},
            {"prompt": "ok two"}]                                 # no image: a text sample
    path = write_jsonl_rows(folder / "d.jsonl", rows)
    with path.open("a") as fh:
        fh.write("{not json\n[1, 2]\n")
    ds = read_dataset(str(path), {})
    assert [s.id for s in ds.samples] == ["row-0", "row-4"] and ds.rows == 7  # ids: row numbers from 0
    whys = dict(ds.skipped)
    assert whys["row 1"] == "no prompt" and "imgs/missing.png not found" in whys["row 2"]
    assert "not an integer" in whys["row 3"] and "not JSON" in whys["row 5"] and "not an object" in whys["row 6"]


def test_column_overrides(folder):
    path = write_jsonl_rows(folder / "d.jsonl", [{"q": "hello there", "pic": "imgs/a.png", "key": "k1",
                                                  "prompt": "not this one"}])
    (s,) = read_dataset(str(path), {"prompt": "q", "image": "pic", "id": "key"}).samples
    assert (s.id, s.prompt, s.images[0].path) == ("k1", "hello there", folder / "imgs" / "a.png")
    with pytest.raises(CliError, match="has no such column"):
        read_dataset(str(path), {"prompt": "nope"})


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("kind", ["parquet", "load_from_disk", "csv"])
def test_profile_a_dataset_honours_each_samples_images_and_max_new_tokens(kind, checkpoint, folder):
    out = folder / "run"
    assert run("profile", checkpoint, "--dataset", make(kind, folder), "--out", out, "--no-progress") == 0
    recs = {r.sample_id: r for r in load_records(out / "records.jsonl")}
    assert set(recs) == {"cat-1", "dog-2", "7"}
    assert [recs[i].output_tokens for i in ("cat-1", "dog-2", "7")] == [2, 3, 4]
    assert [recs[i].images for i in ("cat-1", "dog-2", "7")] == [1, 2, 1]
    assert recs["dog-2"].image_tokens == 2 * recs["cat-1"].image_tokens > 0  # both images reached the model
    assert all(r.sweep_point is None and r.error is None for r in recs.values())
    fp = json.loads((out / "stagetrace-run.json").read_text())
    assert fp["dataset"]["kind"] == kind and len(fp["dataset"]["sha256"]) == 64


def test_bad_rows_and_undecodable_bytes_are_skipped_and_counted_end_to_end(checkpoint, folder, capsys):
    pytest.importorskip("datasets")
    rows = ROWS + [{"id": "broken", "image": ["imgs/a.png"], "prompt": "x", "max_new_tokens": 2},
                   {"id": "no-prompt", "image": ["imgs/a.png"], "prompt": "", "max_new_tokens": 2}]
    ds = hf_dataset(folder, rows)
    ds = ds.map(lambda r: {"images": [{"bytes": b"not an image", "path": None}]} if r["id"] == "broken" else {})
    ds.save_to_disk(str(folder / "saved"))
    out = folder / "run"
    assert run("profile", checkpoint, "--dataset", folder / "saved", "--out", out, "--no-progress") == 0
    text = capsys.readouterr().out
    assert "1 dataset row(s) could not be used and were skipped: row 4 of" in text and "no prompt" in text
    assert "1 image(s) could not be decoded and were skipped: 0 of row 3 (12 bytes)" in text
    assert sorted(r.sample_id for r in load_records(out / "records.jsonl")) == ["7", "cat-1", "dog-2"]


@pytest.mark.parametrize("case", ["mixed", "duplicate", "nothing_usable", "not_a_dataset", "splits", "columns_alone",
                                  "unknown_column", "unknown_sweep_key", "bad_sweep_value", "sweep_twice"])
def test_bad_dataset_or_sweep_is_one_line_and_exit_2(case, checkpoint, folder, capsys, monkeypatch):
    import stagetrace.cli.profile as prof

    monkeypatch.setattr(prof, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    good = make("jsonl", folder)
    argv, expect = {
        "mixed": (["--dataset", good, "--prompt", "hi"], "--dataset gives the images and prompts: drop --prompt"),
        "duplicate": (["--dataset", write_jsonl_rows(folder / "dup.jsonl", [{"id": 1, "prompt": "a"},
                                                                            {"id": "1", "prompt": "b"}])],
                      "id 1 is on rows 0 and 1"),
        "nothing_usable": (["--dataset", write_jsonl_rows(folder / "bad.jsonl", [{"prompt": ""}, {"prompt": None}])],
                           "none of its 2 row(s) can be profiled"),
        "not_a_dataset": (["--dataset", folder / "imgs" / "a.png"], "not a dataset file"),
        "splits": (["--dataset", _dataset_dict(folder)], "holds several splits (train, test)"),
        "columns_alone": (["--prompt", "hi", "--dataset-columns", "prompt=q"], "give --dataset PATH"),
        "unknown_column": (["--dataset", good, "--dataset-columns", "prompt=nope"], "has no such column"),
        "unknown_sweep_key": (["--dataset", good, "--sweep", "banana=1,2"], "--sweep banana: not a generation setting"),
        "bad_sweep_value": (["--dataset", good, "--sweep", "batch_size=1,0"], "batch_size must be an integer >= 1"),
        "sweep_twice": (["--dataset", good, "--sweep", "dtype=float32", "--sweep", "dtype=bfloat16"],
                        "names dtype twice"),
    }[case]
    before = digest(folder)
    assert run("profile", checkpoint, *argv, "--out", folder / "o", "--no-progress") == 2
    one_error_line(capsys, expect)
    assert digest(folder) == before  # (the --out folder may be made, empty)


def _dataset_dict(folder: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    ds = hf_dataset(folder, ROWS)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(folder / "dd"))
    return folder / "dd"


def test_a_changed_dataset_is_refused_on_resume(checkpoint, folder, capsys):
    data, out = make("jsonl", folder), folder / "run"
    assert run("profile", checkpoint, "--dataset", data, "--out", out, "--no-progress", "--n", "1") == 0
    write_jsonl_rows(data, [dict(ROWS[0], prompt="another prompt")] + ROWS[1:])
    before = digest(out)
    capsys.readouterr()
    assert run("profile", checkpoint, "--dataset", data, "--out", out, "--no-progress") == 2
    one_error_line(capsys, "--dataset (its path or its contents) differ")
    assert digest(out) == before


# ---------------------------------------------------------------- sweeps
def same_length_rows(n: int) -> list[dict]:
    return [{"id": f"s{i}", "image": "imgs/a.png", "prompt": "describe this image"} for i in range(n)]


def test_a_sweep_tags_every_record_with_its_point_and_the_records_differ_as_it_says(checkpoint, folder, capsys):
    data = write_jsonl_rows(folder / "d.jsonl", same_length_rows(3))
    out = folder / "run"
    assert run("profile", checkpoint, "--dataset", data, "--out", out, "--no-progress", "--min-new-tokens", "2",
               "--sweep", "max_new_tokens=2,3", "--sweep", "batch_size=1,2", "--sweep", "crop_size.height=32,48") == 0
    text = capsys.readouterr().out
    recs = load_records(out / "records.jsonl")
    by_point: dict[tuple, list] = {}
    for r in recs:
        by_point.setdefault(tuple(sorted(r.sweep_point.items())), []).append(r)
    # a crop height of 48 reached the processor: the model (32 px positions) refused those batches, said and counted
    assert all(p["crop_size.height"] == 32 for r in recs for p in [r.sweep_point])
    assert "Input image size (48*32) doesn't match model" in text and "batch(es) skipped" in text
    assert len(by_point) == 4
    for point, these in by_point.items():
        p = dict(point)
        assert sorted(s for r in these for s in r.sample_id.split(";")) == ["s0", "s1", "s2"]  # each once
        assert all(r.output_tokens == p["max_new_tokens"] for r in these)
        assert sorted(r.batch_size for r in these) == ([1, 1, 1] if p["batch_size"] == 1 else [1, 2])
        assert all(r.image_tokens == 16 * r.batch_size and r.image_sizes == [[32, 32]] * r.batch_size for r in these)
    assert "4 sweep points, summarized one by one" in text


def test_a_sweep_resumes_after_a_partial_run_and_takes_new_values(checkpoint, folder, capsys):
    data = write_jsonl_rows(folder / "d.jsonl", same_length_rows(3))
    out = folder / "run"
    argv = ["profile", checkpoint, "--dataset", data, "--out", out, "--no-progress", "--sweep", "batch_size=1,2"]
    assert run(*argv, "--n", "2") == 0  # a partial run: 2 samples at 2 points
    assert len(load_records(out / "records.jsonl")) == 3  # (1, 1) at batch 1, (2) at batch 2
    capsys.readouterr()
    assert run(*argv[:-1], "batch_size=1,2,3") == 0
    assert "resuming: 4 of 9 (sample, sweep point) items already" in capsys.readouterr().out
    seen = [(s, r.sweep_point["batch_size"]) for r in load_records(out / "records.jsonl")
            for s in r.sample_id.split(";")]
    assert sorted(seen) == sorted((f"s{i}", b) for i in range(3) for b in (1, 2, 3))  # each exactly once
    assert run(*argv[:-1], "max_new_tokens=2") == 2  # other sweep keys: another run
    one_error_line(capsys, "--sweep settings differ")


def test_two_ranks_shard_samples_and_points_and_merge_gives_each_once(checkpoint, folder, monkeypatch):
    data = write_jsonl_rows(folder / "d.jsonl", same_length_rows(3))
    out = folder / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert run("profile", checkpoint, "--dataset", data, "--out", out, "--no-progress",
                   "--sweep", "dtype=float32,bfloat16", "--sweep", "max_new_tokens=2,3") == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    r0, r1 = load_records(out / "records.rank0.jsonl"), load_records(out / "records.rank1.jsonl")
    assert len(r0) == 6 and len(r1) == 6 and all(r.rank == 1 for r in r1)
    assert run("merge", out, "-o", folder / "merged") == 0
    merged = load_records(folder / "merged" / "records.jsonl")
    keys = [(r.sample_id, r.sweep_point["dtype"], r.sweep_point["max_new_tokens"]) for r in merged]
    assert sorted(keys) == sorted((f"s{i}", d, m) for i in range(3) for d in ("float32", "bfloat16") for m in (2, 3))
    assert all(r.output_tokens == r.sweep_point["max_new_tokens"] for r in merged)


# ---------------------------------------------------------------- report, compare, fit over points
@pytest.fixture()
def swept(tmp_path) -> Path:
    """Made-up records of two dtypes at two batch sizes."""
    from stagetrace.testing.synthetic import latency_records

    recs = []
    for k, (dtype, bs) in enumerate([("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]):
        for r in latency_records(20, seed=k):
            r = copy.copy(r)
            r.sweep_point = {"dtype": dtype, "batch_size": bs}
            recs.append(r)
    write_jsonl(recs, tmp_path / "swept.jsonl")
    return tmp_path / "swept.jsonl"


def test_report_summarizes_point_by_point(swept, tmp_path, capsys):
    assert run("report", swept) == 0
    text = capsys.readouterr().out
    assert "4 sweep points" in text and "20 records at dtype=bfloat16 batch_size=2" in text
    assert run("report", swept, "--point", "dtype=float32", "--csv", tmp_path / "s.csv") == 0
    rows = list(csv.DictReader((tmp_path / "s.csv").read_text().splitlines()))
    assert {r["sweep_point"] for r in rows} == {"dtype=float32 batch_size=1", "dtype=float32 batch_size=2"}
    capsys.readouterr()
    assert run("report", swept, "--point", "dtype=float32", "--point", "batch_size=2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["total_ms"]["count"] == 20
    assert run("report", swept, "--point", "dtype=float64") == 2
    one_error_line(capsys, "no record of the records has it")


def test_compare_and_fit_do_not_mix_points_unless_told(swept, tmp_path, capsys):
    assert run("compare", swept, swept, "--reps", "100") == 2
    one_error_line(capsys, "holds records of 4 sweep points")
    assert run("compare", swept, swept, "--reps", "100", "--point", "dtype=float32", "--point", "batch_size=1") == 0
    capsys.readouterr()
    assert run("fit", swept, "-o", tmp_path / "m.json") == 2
    one_error_line(capsys, "sweep points of 2 dtypes (bfloat16, float32)")
    assert run("fit", swept, "-o", tmp_path / "m.json", "--point", "dtype=bfloat16") == 0  # batch sizes: a feature
    assert "fitting 40 records of 2 sweep point(s)" in capsys.readouterr().out


# ---------------------------------------------------------------- a processor setting that changes what the model sees
@pytest.fixture(scope="module")
def idefics3(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-idefics3"
    checkpoints.save_tiny_checkpoint(str(path), "idefics3")
    return path


# Three images of different shapes (width, height): the pixel budget (size.longest_edge) decides
# how many 32-pixel tiles, of 4 image tokens each, each one becomes.
SHAPES = {"wide": (48, 40), "tall": (30, 100), "big": (80, 66)}


def processor_image_tokens(checkpoint: Path, image: Path, prompt: str, longest_edge: int) -> int:
    """What the checkpoint's own processor makes of ``image`` under that budget: its image tokens."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    proc.image_processor.size = {"longest_edge": longest_edge}
    with Image.open(image) as im:
        enc = proc(text=[f"<image>\n{prompt}"], images=[im.convert("RGB")], return_tensors="pt")
    return int((enc["input_ids"] == proc.image_token_id).sum())


def test_a_processor_sweep_changes_the_image_tokens_the_model_sees(idefics3, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for name, size in SHAPES.items():
        (tmp_path / "imgs" / f"{name}.png").write_bytes(png(size))
    data = write_jsonl_rows(tmp_path / "d.jsonl", [{"id": n, "image": f"imgs/{n}.png", "prompt": "describe this image"}
                                                   for n in SHAPES])
    out = tmp_path / "run"
    argv = ["profile", idefics3, "--dataset", data, "--out", out, "--no-progress", "--min-new-tokens", "2",
            "--sweep", "size.longest_edge=32,64,96", "--sweep", "max_new_tokens=2,3"]
    assert run(*argv, "--n", "2") == 0  # a partial run: 2 of the 3 samples at every point
    assert len(load_records(out / "records.jsonl")) == 12
    capsys.readouterr()
    assert run(*argv) == 0
    text = capsys.readouterr().out
    assert "resuming: 12 of 18 (sample, sweep point) items already" in text and "skipped" not in text
    recs = load_records(out / "records.jsonl")
    seen = [(r.sample_id, r.sweep_point["size.longest_edge"], r.sweep_point["max_new_tokens"]) for r in recs]
    assert sorted(seen) == sorted((n, e, m) for n in SHAPES for e in (32, 64, 96) for m in (2, 3))  # each once
    assert all(list(r.sweep_point) == ["size.longest_edge", "max_new_tokens"] and r.error is None for r in recs)
    assert all(r.output_tokens == r.sweep_point["max_new_tokens"] for r in recs)
    # Idefics3's pixel values are (batch, crops, C, H, W): how many images, of what size, is not
    # in them — unknown (None), never the batch size or a crop's size
    assert all(r.images is None and r.image_sizes == [] for r in recs)

    tokens = {(r.sample_id, r.sweep_point["size.longest_edge"]): r.image_tokens for r in recs}  # same at both lengths
    assert len(tokens) == 9 and all(r.image_tokens == tokens[r.sample_id, r.sweep_point["size.longest_edge"]]
                                    for r in recs)
    expected = {(n, e): processor_image_tokens(idefics3, tmp_path / "imgs" / f"{n}.png", "describe this image", e)
                for n in SHAPES for e in (32, 64, 96)}
    assert tokens == expected
    # one 32-pixel tile at the smallest budget; a larger budget, more tiles, more tokens
    assert all(tokens[n, 32] == 4 < tokens[n, 64] < tokens[n, 96] for n in SHAPES)
    assert tokens["wide", 64] == 4 * (2 * 2 + 1) and tokens["tall", 96] == 4 * (3 * 1 + 1)  # tiles, and the whole
    prompt = {(r.sample_id, r.sweep_point["size.longest_edge"]): r.prompt_tokens for r in recs}
    assert all(prompt[n, 32] < prompt[n, 64] < prompt[n, 96] for n in SHAPES)  # the prefill grows with them

    # the trace (rebuilt from every record of the run) says each call's point, as a field
    trace = json.loads((out / "trace.json").read_text())
    validate_trace(trace)
    calls = [e["args"] for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "stage"
             and "sample_id" in e.get("args", {})]
    assert sorted((a["sample_id"], a["sweep_point"]["size.longest_edge"], a["sweep_point"]["max_new_tokens"])
                  for a in calls) == sorted(seen)
    assert all(a["image_tokens"] == tokens[a["sample_id"], a["sweep_point"]["size.longest_edge"]] for a in calls)

    assert "6 sweep points, summarized one by one" in text
    assert "3 records at size.longest_edge=96 max_new_tokens=3" in text
    capsys.readouterr()
    assert run("report", out / "records.jsonl", "--json") == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["sweep_point"] for s in summaries] == [{"size.longest_edge": e, "max_new_tokens": m}
                                                    for e in (32, 64, 96) for m in (2, 3)]
    assert all(s["summary"]["total_ms"]["count"] == 3 for s in summaries)


def test_images_with_a_processor_that_does_not_load_are_one_line_not_a_text_only_run(idefics3, tmp_path, capsys,
                                                                                     monkeypatch):
    """Its tokenizer alone would feed the model the prompts without the images (as a Qwen2-VL checkpoint
    was profiled where its processor needs torchvision), and the records would not say so."""
    import shutil

    import stagetrace.cli.profile as prof

    broken = tmp_path / "broken"
    shutil.copytree(idefics3, broken)
    cfg = json.loads((broken / "processor_config.json").read_text())
    cfg["image_processor"]["image_processor_type"] = "NoSuchImageProcessor"
    (broken / "processor_config.json").write_text(json.dumps(cfg))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    data = write_jsonl_rows(tmp_path / "d.jsonl", [{"id": "a", "image": "imgs/a.png", "prompt": "describe this"}])
    monkeypatch.setattr(prof, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert run("profile", broken, "--dataset", data, "--out", tmp_path / "o", "--no-progress") == 2
    one_error_line(capsys, "cannot load the processor of")
    assert not (tmp_path / "o" / "records.jsonl").exists()
