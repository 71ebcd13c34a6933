"""``profile --dataset PATH``: the samples of a dataset file or folder, one per usable row.

Formats, told apart by suffix or by what a folder holds:

- ``.jsonl`` (or ``.json``: JSON lines or one array of objects) and ``.csv``: read with the
  standard library, so they need nothing installed;
- ``.parquet``, and a folder saved by ``datasets``' ``save_to_disk`` (it holds
  ``dataset_info.json`` / ``state.json``): read with ``datasets`` (``pip install 'stagetrace[dataset]'``),
  its image columns as stored (bytes or a path), never decoded here;
- an image folder with a ``metadata.jsonl`` / ``metadata.csv`` (or ``metadata.parquet``):
  one sample per metadata row, its ``file_name`` the image, relative to the folder.

A row gives a prompt, zero or more images (a path relative to the dataset's folder, image
bytes, or a ``{"bytes": ..., "path": ...}`` as ``datasets`` stores an ``Image``), and optionally
an id and a ``max_new_tokens``. A row that cannot be used (no prompt, an image that is not
there, a bad ``max_new_tokens``) is named, counted and skipped, never the whole run; images
that do not decode are found the same way later, by ``profile``, before the model loads.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .common import CliError, show
from .runs import ImageRef, Sample, escape_id

__all__ = ["Dataset", "read_dataset", "parse_columns", "ROLES", "DEFAULT_COLUMNS"]

# What a column is for, and the names looked for when --dataset-columns does not say.
ROLES = ("image", "prompt", "id", "max_new_tokens")
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("images", "image", "image_path", "image_paths", "file_name", "file_names"),
    "prompt": ("prompt", "text", "question"),
    "id": ("id",),
    "max_new_tokens": ("max_new_tokens",),
}
_LOAD_FROM_DISK = ("dataset_info.json", "state.json")
_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_NEEDS_DATASETS = "needs `pip install 'stagetrace[dataset]'`"


@dataclass
class Dataset:
    """What ``--dataset`` gave: its samples, the rows skipped ((row, why)), and how it is told apart."""
    path: Path
    kind: str                  # jsonl, csv, parquet, load_from_disk, imagefolder
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sha256: str = ""           # of the file(s) that make it: a resume never mixes two datasets
    rows: int = 0


def parse_columns(text: str | None) -> dict[str, str]:
    """``--dataset-columns image=col,prompt=col``: role -> column name."""
    if text is None:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        role, eq, column = item.partition("=")
        role, column = role.strip(), column.strip()
        if not eq or not column:
            raise CliError(f"--dataset-columns {show(text)}: give ROLE=COLUMN pairs separated by commas "
                           f"(roles: {', '.join(ROLES)})")
        if role not in ROLES:
            raise CliError(f"--dataset-columns: {show(role)} is not a role (roles: {', '.join(ROLES)})")
        if role in out:
            raise CliError(f"--dataset-columns names {role} twice")
        out[role] = column
    return out


# ---------------------------------------------------------------- reading rows, per format
def _need_datasets(path: Path, what: str) -> Any:
    """The ``datasets`` module (an optional extra), or one line saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise CliError(f"--dataset {show(path)}: reading {what} {_NEEDS_DATASETS}") from None
    datasets.disable_progress_bars()  # stderr carries our own progress and one-line errors only
    datasets.logging.set_verbosity_error()
    return datasets


def _arrow_rows(ds: Any, chunk: int = 1024) -> Iterator[dict[str, Any]]:
    """A ``datasets.Dataset``'s rows as stored: an ``Image`` is ``{"bytes", "path"}``, not decoded."""
    table = ds.with_format("arrow")
    for start in range(0, len(ds), chunk):
        yield from table[start:start + chunk].to_pylist()


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any] | str]:
    """Each line's object, or why that line is not one (a str). A ``.json`` may also be one array."""
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CliError(f"--dataset {show(path)} is not valid JSON ({show(exc)})") from None
        for row in rows:
            yield row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            yield f"not JSON ({show(exc)})"
            continue
        yield row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"


def _csv_rows(path: Path) -> Iterator[dict[str, Any] | str]:
    try:
        reader = csv.DictReader(_read_text(path).splitlines())
        for row in reader:
            if None in row:  # more cells than the header names
                yield f"{len(row[None]) + len(reader.fieldnames or [])} cells under {len(reader.fieldnames or [])} columns"
                continue
            yield {k: (None if v == "" else v) for k, v in row.items()}
    except csv.Error as exc:
        raise CliError(f"--dataset {show(path)} is not readable CSV ({show(exc)})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise CliError(f"--dataset {show(path)} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"--dataset {show(path)} is not UTF-8 text (byte {exc.start})") from None


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    datasets = _need_datasets(path, "Parquet")
    # a throw-away cache: nothing is left in the user's ~/.cache, the rows are held in memory
    with tempfile.TemporaryDirectory(prefix="stagetrace-dataset-") as cache:
        try:
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a file that is not Parquet
            raise CliError(f"--dataset {show(path)} is not a readable Parquet file ({_first_line(exc)})") from None
        yield from _arrow_rows(ds)


def _disk_rows(path: Path) -> Iterator[dict[str, Any]]:
    datasets = _need_datasets(path, "a dataset saved with save_to_disk")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged folder raises whatever datasets meets first
        raise CliError(f"--dataset {show(path)} cannot be loaded with datasets.load_from_disk "
                       f"({_first_line(exc)})") from None
    if not isinstance(ds, datasets.Dataset):
        raise CliError(f"--dataset {show(path)} holds several splits ({', '.join(map(show, ds))}): give one "
                       f"split's folder, e.g. {show(path / next(iter(ds)))}")
    yield from _arrow_rows(ds)


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return show(f"{type(exc).__name__}: {lines[0][:200] if lines else ''}".rstrip(": "))


# ---------------------------------------------------------------- rows to samples
def _cell_images(value: Any, base: Path, where: str) -> tuple[list[ImageRef], str | None]:
    """The images of one cell, or why the cell cannot be used. Bytes are named by their row (``where``)."""
    if value is None:
        return [], None
    if isinstance(value, str) and value.strip().startswith("["):  # a list in a CSV cell, as JSON
        try:
            value = json.loads(value)
        except ValueError:
            return [], f"image cell {show(value[:60])} is neither a path nor a JSON list of paths"
    items = value if isinstance(value, list) else [value]
    refs: list[ImageRef] = []
    for k, item in enumerate(items):
        if isinstance(item, dict):  # how datasets stores an Image: bytes, or else a path
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray)):
            refs.append(ImageRef(f"{k} of {where} ({len(item)} bytes)", None, bytes(item)))
        elif isinstance(item, str) and item.strip():
            p = Path(item) if os.path.isabs(item) else base / item
            if not p.is_file():
                return [], f"image {show(item)} not found (looked for {show(p)})"
            refs.append(ImageRef(show(p), p, None))
        elif item is not None:
            return [], f"image cell holds a {type(item).__name__}, not a path or bytes"
    return refs, None


def _max_new_tokens(value: Any) -> tuple[int | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None, f"max_new_tokens {show(value)} is not an integer"
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return None, f"max_new_tokens {show(value)} is not an integer >= 1"
    return value, None


def _sample_id(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value) if isinstance(value, (str, int, float)) else None
    return escape_id(text) if text and text.strip() else None


def _pick_columns(names: list[str], given: dict[str, str], path: Path) -> dict[str, str]:
    """Role -> column of this dataset: as --dataset-columns says, else the first default name it has."""
    cols: dict[str, str] = {}
    for role in ROLES:
        if role in given:
            if given[role] not in names:
                raise CliError(f"--dataset-columns {role}={show(given[role])}: {show(path)} has no such column "
                               f"(it has: {show(', '.join(names))})")
            cols[role] = given[role]
            continue
        found = next((n for n in DEFAULT_COLUMNS[role] if n in names), None)
        if found is not None:
            cols[role] = found
    if "prompt" not in cols:
        raise CliError(f"--dataset {show(path)} has no prompt column (looked for "
                       f"{', '.join(DEFAULT_COLUMNS['prompt'])}; it has: {show(', '.join(names)) or 'none'}): "
                       "name it with --dataset-columns prompt=COLUMN")
    return cols


def _samples(rows: Iterable[dict[str, Any] | str], base: Path, given: dict[str, str], path: Path,
             names: list[str] | None = None) -> tuple[list[Sample], list[tuple[str, str]], int]:
    """(samples, skipped rows (row, why), rows read). Row numbers count from 0, as ids do."""
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    rows = list(rows)
    if names is None:  # JSON rows need not all have every key: the columns are all the keys met
        names = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    cols = _pick_columns(names, given, path)
    n = 0
    for n, row in enumerate(rows, 1):
        i, where = n - 1, f"row {n - 1}"
        if isinstance(row, str):
            skipped.append((where, row))
            continue
        prompt = row.get(cols["prompt"])
        if not isinstance(prompt, str) or not prompt.strip():
            skipped.append((where, "no prompt" if prompt is None or isinstance(prompt, str)
                            else f"prompt is a {type(prompt).__name__}, not text"))
            continue
        images, why = _cell_images(row.get(cols["image"]), base, where) if "image" in cols else ([], None)
        new, why_new = _max_new_tokens(row.get(cols["max_new_tokens"])) if "max_new_tokens" in cols else (None, None)
        sid = _sample_id(row.get(cols["id"])) if "id" in cols else f"row-{i}"
        if why or why_new or sid is None:
            skipped.append((where, why or why_new or f"no id in column {show(cols['id'])}"))
            continue
        if sid in seen:
            raise CliError(f"--dataset {show(path)}: id {show(sid)} is on rows {seen[sid]} and {i}: sample ids "
                           "must be unique")
        seen[sid] = i
        samples.append(Sample(sid, prompt, tuple(images), new))
    return samples, skipped, n


# ---------------------------------------------------------------- the dataset's identity
def _sha256_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(os.fsencode(os.path.relpath(f, root)) + b"\0")
        try:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            raise CliError(f"--dataset: {show(f)} cannot be read: {exc.strerror or exc}") from None
        h.update(b"\0")
    return h.hexdigest()


def _imagefolder_sha256(folder: Path, metadata: Path) -> str:
    """The metadata's bytes and every file's name and size: images are not read twice for a hash."""
    h = hashlib.sha256(bytes.fromhex(_sha256_files([metadata], folder)))
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p != metadata:
            h.update(os.fsencode(os.path.relpath(p, folder)) + b"\0" + str(p.stat().st_size).encode() + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------- the one entry point
def read_dataset(name: str, columns: dict[str, str]) -> Dataset:
    """The samples of ``--dataset name``; one line and exit 2 for a dataset that cannot be used at all."""
    path = Path(name)
    if not str(name).strip() or not path.exists():
        raise CliError(f"--dataset {show(name)} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # datasets' and pyarrow's deprecation notes are not about this run
        if path.is_dir():
            ds = _read_folder(path, columns)
        else:
            ds = _read_file(path, columns)
    if not ds.samples:
        first = f" (first: {ds.skipped[0][0]}: {ds.skipped[0][1]})" if ds.skipped else ""
        raise CliError(f"--dataset {show(path)}: none of its {ds.rows} row(s) can be profiled{first}")
    return ds


def _read_file(path: Path, columns: dict[str, str]) -> Dataset:
    suffix = path.suffix.lower()
    readers = {".jsonl": ("jsonl", _jsonl_rows), ".json": ("jsonl", _jsonl_rows), ".csv": ("csv", _csv_rows),
               ".parquet": ("parquet", _parquet_rows)}
    if suffix not in readers:
        raise CliError(f"--dataset {show(path)}: not a dataset file (.jsonl, .json, .csv or .parquet) nor a folder "
                       "saved with datasets' save_to_disk or holding images and a metadata.jsonl/.csv")
    kind, reader = readers[suffix]
    names = _csv_header(path) if kind == "csv" else None
    samples, skipped, rows = _samples(reader(path), path.parent, columns, path, names)
    return Dataset(path, kind, samples, skipped, _sha256_files([path], path.parent), rows)


def _csv_header(path: Path) -> list[str]:
    try:
        return next(csv.reader(_read_text(path).splitlines()), [])
    except csv.Error as exc:
        raise CliError(f"--dataset {show(path)} is not readable CSV ({show(exc)})") from None


def _read_folder(path: Path, columns: dict[str, str]) -> Dataset:
    if any((path / f).is_file() for f in _LOAD_FROM_DISK) or (path / "dataset_dict.json").is_file():
        samples, skipped, rows = _samples(_disk_rows(path), path, columns, path)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return Dataset(path, "load_from_disk", samples, skipped, _sha256_files(files, path), rows)
    metadata = next((path / m for m in _METADATA if (path / m).is_file()), None)
    if metadata is None:
        raise CliError(f"--dataset {show(path)}: a folder must be saved with datasets' save_to_disk (it holds "
                       f"dataset_info.json) or hold images with a {' / '.join(_METADATA)}")
    reader = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[metadata.suffix]
    names = _csv_header(metadata) if metadata.suffix == ".csv" else None
    # an image folder's images are named by file_name, relative to the folder (as datasets' imagefolder reads it)
    samples, skipped, rows = _samples(reader(metadata), path, columns, metadata, names)
    return Dataset(path, "imagefolder", samples, skipped, _imagefolder_sha256(path, metadata), rows)
