"""Image-caption data in the shapes people already hold, read as one kind of table.

* ``hf``: a Hugging Face dataset: a hub id (``data.hf_id``), a ``save_to_disk`` folder, or Parquet / Arrow / JSON
  Lines files (split names from the file names, as the hub names them: ``train-00000-of-00002.parquet``,
  ``validation.parquet``); an imagefolder given to ``hf`` is read as ``imagefolder``.
* ``imagefolder``: images with a ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + columns) in the folder, or
  in one folder per split (``train/``, ``validation/``, ...): the layout ``datasets.load_dataset("imagefolder")``
  reads, so the same folder trains here and there.
* ``jsonl`` / ``parquet``: a manifest of (image path, caption) rows, one file per split (``train.jsonl``,
  ``val.parquet``, ``train-00000.parquet`` ...) or one file (the train split); img2dataset-like column names are
  found by themselves or named with ``data.image_column`` / ``data.text_column``.

An image cell may be a path (relative to the file that lists it, or absolute), encoded bytes, or the dataset's
``Image`` feature (bytes kept in the Arrow file and read when needed, never all in memory). A caption cell may be
a list: each of its captions is a pair with the image. Every row is checked when the data is opened, as the
folder layout is (:func:`validate_rows`): every problem is reported at once, each with its row (or line).

A split the data does not have (``data.val_split``: ``val``, also found as validation/valid/dev/test) is carved from
train: ``data.val_carve`` of its images (a fraction, or a count), drawn with ``data.val_carve_seed``.

Streaming (``data.streaming``) is in ``stream.py``; it reads the same files through ``datasets`` without loading them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..progress import Progress
from .dataset import EncodedImage, Problem, readable
from .transforms import ImageTooLarge, load_image
from .validate import SplitReport, long_captions_note, require_usable

log = logging.getLogger(__name__)

FORMATS = ("hf", "imagefolder", "jsonl", "parquet")
# Column names tried, in order, when data.image_column / data.text_column are not set (HF datasets, imagefolder
# metadata, img2dataset and open_clip manifests).
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "file_name", "filename", "image_path", "filepath", "path")
TEXT_COLUMNS = ("caption", "captions", "text", "sentences", "sentence", "txt", "title", "alt_text", "raw")
VAL_NAMES = ("validation", "val", "valid", "dev", "test")  # data.val_split 'val' finds any of these
METADATA = ("metadata.jsonl", "metadata.csv")
HF_EXTRA = "pip install 'finderpartner[hf]'"


def hf_datasets() -> Any:
    """The ``datasets`` package, or a DataError naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"this data needs the Hugging Face datasets package: {HF_EXTRA}") from None
    return datasets


@dataclass(frozen=True)
class RowSpec:
    """Where a table-shaped data set is and how to read it (``data.*``, or validate-data's flags)."""

    format: str
    root: Path
    hf_id: str | None = None
    hf_config: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    streaming: bool = False
    val_carve: float = 0.05
    val_carve_seed: int = 0
    max_pixels: int | None = None

    @classmethod
    def from_data(cls, d: Any) -> RowSpec:
        """From the config's ``data`` section."""
        return cls(
            d.format,
            Path(d.root),
            d.hf_id,
            d.hf_config,
            d.image_column,
            d.text_column,
            d.streaming,
            d.val_carve,
            d.val_carve_seed,
            d.max_image_pixels,
        )

    @property
    def where(self) -> str:
        return (
            f"hub dataset {self.hf_id}" + (f" ({self.hf_config})" if self.hf_config else "")
            if self.hf_id
            else str(self.root)
        )


# ---------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class RowTable:
    """Pairs of one split: ``captions[i]`` with image ``pair_image[i]`` of ``refs``; the same interface as the
    folder layout's ``PairTable`` where training and evaluation read it (``source``, ``images``, ``select``)."""

    name: str  # the split, for messages: a file, or a dataset and its split
    refs: tuple[Any, ...]  # per image: a Path, an EncodedImage (held in memory), or an int (a row of ``column``)
    captions: tuple[str, ...]
    pair_image: tuple[int, ...]
    lines: tuple[int, ...]  # per pair: its line or row (``unit``), for messages
    unit: str = "line"
    column: Any = field(default=None, repr=False)  # datasets.Dataset of the image column (decode=False)
    column_name: str = ""

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, k: int) -> Path | EncodedImage:
        """Image ``k``: its file, or its encoded bytes (read from the Arrow data when it holds them)."""
        ref = self.refs[k]
        if not isinstance(ref, int):
            return ref
        cell = self.column[ref][self.column_name]
        if cell.get("bytes") is not None:
            return EncodedImage(f"{self.name}, row {ref}", cell["bytes"])
        return Path(cell["path"])

    def source(self, i: int) -> Path | EncodedImage:
        return self.image(self.pair_image[i])

    def image_source(self, key: int) -> Path | EncodedImage:
        return self.image(key)

    def images(self) -> tuple[list[int], list[int]]:
        """Images of the pairs (first-seen order) and, for each pair, the index of its image in that list."""
        unique: dict[int, int] = {}
        row_to_image = [unique.setdefault(k, len(unique)) for k in self.pair_image]
        return list(unique), row_to_image

    def select(self, keep: Sequence[int]) -> RowTable:
        return replace(
            self,
            captions=tuple(self.captions[i] for i in keep),
            pair_image=tuple(self.pair_image[i] for i in keep),
            lines=tuple(self.lines[i] for i in keep),
        )

    def problem(self, i: int, kind: str, message: str) -> Problem:
        return Problem(self.name, self.lines[i], kind, message, unit=self.unit)


@dataclass
class Rows:
    """The raw cells of one split as read from its files, before they are checked."""

    name: str
    unit: str  # "line" (JSONL / CSV: file lines, 1-based) or "row" (Arrow / Parquet: 0-based, as ds[row])
    columns: list[str]
    labels: list[int]  # per record: its line or row
    records: list[dict[str, Any]] | None  # per record: its cells (JSONL, CSV, Parquet manifests)
    base: Path  # relative image paths are from here
    problems: list[Problem] = field(default_factory=list)  # records that could not be read (a bad JSON line)
    dataset: Any = None  # instead of records: a datasets.Dataset (map-style)
    features: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Splits of each format


def detect_format(root: Path) -> str | None:
    """The layout of a local data set: 'csv', 'webdataset'-like shards are not guessed; None when unknown."""
    if root.is_file():
        return {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "hf"}.get(root.suffix.lower())
    if not root.is_dir():
        return None
    if any(root.glob("captions_*.csv")):
        return "csv"
    if _imagefolder_splits(root):
        return "imagefolder"
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return "hf"
    if any(root.glob("*.jsonl")):
        return "jsonl"
    if any(root.rglob("*.parquet")) or any(root.rglob("*.arrow")):
        return "hf"
    return None


def _imagefolder_splits(root: Path) -> dict[str, Path]:
    """Split name -> the folder whose metadata file lists it: the root itself (one split: train), or its sub-folders."""
    if any((root / m).is_file() for m in METADATA):
        return {"train": root}
    return {
        d.name: d
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".") and any((d / m).is_file() for m in METADATA)
    }


def _manifest_splits(root: Path, ext: str) -> dict[str, list[Path]]:
    """Split name -> manifest files: ``<split>.<ext>`` or ``<split>-*.<ext>`` in a folder; a single file is train."""
    if root.is_file():
        return {"train": [root]}
    found: dict[str, list[Path]] = {}
    for f in sorted(root.glob(f"*.{ext}")):
        if f.name.startswith("."):
            continue
        split = f.stem.split("-", 1)[0]  # train.jsonl, train-00001.jsonl
        found.setdefault(split, []).append(f)
    return found


def _hf_file_splits(root: Path) -> tuple[str, dict[str, list[str]]] | None:
    """The ``datasets`` builder and its split -> files for a folder (or file) of Parquet / Arrow / JSON Lines."""
    for builder, ext in (("parquet", "parquet"), ("arrow", "arrow"), ("json", "jsonl")):
        files = [root] if root.is_file() and root.suffix == f".{ext}" else sorted(root.rglob(f"*.{ext}"))
        files = [f for f in files if not any(p.startswith(".") for p in f.parts[-3:])]
        if not files:
            continue
        splits: dict[str, list[str]] = {}
        for f in files:
            stem = f.stem.lower()
            head = stem.split("-", 1)[0]  # the hub's train-00000-of-00002, validation
            split = head if head in ("train", *VAL_NAMES) else "train"
            splits.setdefault(split, []).append(str(f))
        return builder, splits
    return None


def _is_saved(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def split_readers(spec: RowSpec) -> dict[str, Callable[[], Rows]]:
    """Split name -> a function that reads it, for the data ``spec`` names (streaming aside)."""
    fmt, root = spec.format, spec.root
    if spec.hf_id:
        return _hf_readers(spec, _hub_dict(spec), spec.hf_id)
    if not root.exists():
        raise DataError(f"not found: the data {root} does not exist (data.root)")
    if fmt in ("imagefolder", "hf") and root.is_dir() and (folders := _imagefolder_splits(root)):
        return {s: (lambda d=d: _read_metadata(d)) for s, d in folders.items()}
    if fmt == "imagefolder":
        raise DataError(
            f"{root} is not an imagefolder: it holds no metadata.jsonl or metadata.csv, neither itself nor in a "
            "folder per split (train/metadata.jsonl, validation/metadata.jsonl)"
        )
    if fmt in ("jsonl", "parquet"):
        files = _manifest_splits(root, fmt)
        if not files:
            raise DataError(f"{root} holds no .{fmt} manifest (train.{fmt}, val.{fmt}, ...)")
        read = _read_jsonl if fmt == "jsonl" else _read_parquet
        return {s: (lambda fs=fs: read(fs)) for s, fs in files.items()}
    # hf: a save_to_disk folder, or data files
    if root.is_dir() and _is_saved(root):
        loaded = hf_datasets().load_from_disk(str(root))
        return _hf_readers(spec, loaded if hasattr(loaded, "keys") else {"train": loaded}, str(root))
    found = _hf_file_splits(root)
    if found is None:
        raise DataError(
            f"{root} is not a Hugging Face dataset: no save_to_disk folder (dataset_dict.json), no metadata.jsonl "
            "(imagefolder), no .parquet / .arrow / .jsonl files; for the folder layout use data.format: csv"
        )
    builder, files = found
    loaded = hf_datasets().load_dataset(builder, data_files=files)
    return _hf_readers(spec, loaded, str(root))


def _hub_dict(spec: RowSpec) -> Any:
    datasets = hf_datasets()
    try:
        loaded = datasets.load_dataset(spec.hf_id, spec.hf_config)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise DataError(f"cannot load the dataset {spec.where}: {e}") from None
    return loaded


def _hf_readers(spec: RowSpec, loaded: Any, where: str) -> dict[str, Callable[[], Rows]]:
    base = spec.root if not spec.hf_id else Path(".")
    return {s: (lambda ds=ds, s=s: _hf_rows(ds, f"{where} [{s}]", base)) for s, ds in loaded.items()}


def find_split(readers: dict[str, Any], split: str) -> str | None:
    """The name ``split`` has in the data: itself, or for a validation name (val, validation...) any of them."""
    if split in readers:
        return split
    if split in VAL_NAMES:
        return next((s for s in VAL_NAMES if s in readers), None)
    return None


def missing_split(spec: RowSpec, readers: dict[str, Any], split: str) -> DataError:
    return DataError(
        f"not found: {spec.where} has no split {split!r} (its splits: {', '.join(readers) or 'none'}); "
        "set data.train_split / data.val_split to one of them"
    )


# ---------------------------------------------------------------------------------------------------------------
# Readers: cells of each record


def _read_jsonl(files: list[Path]) -> Rows:
    """JSON Lines (a manifest or imagefolder's metadata.jsonl): one object per line; a bad line is a problem."""
    name = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1})"
    rows = Rows(name, "line", [], [], [], files[0].parent)
    columns: dict[str, None] = {}
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    rows.problems.append(Problem(str(f), number, "bad_json", f"not valid JSON ({e})"))
                    continue
                if not isinstance(record, dict):
                    rows.problems.append(
                        Problem(str(f), number, "bad_json", f"expected an object {{...}}, got {type(record).__name__}")
                    )
                    continue
                columns.update(dict.fromkeys(record))
                rows.labels.append(number)
                assert rows.records is not None
                rows.records.append(record)
    rows.columns = list(columns)
    return rows


def _read_csv(path: Path) -> Rows:
    rows = Rows(str(path), "line", [], [], [], path.parent)
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        rows.columns = list(reader.fieldnames or [])
        for record in reader:
            rows.labels.append(reader.line_num)
            assert rows.records is not None
            rows.records.append(record)
    return rows


def _read_metadata(folder: Path) -> Rows:
    jsonl, csv_path = folder / METADATA[0], folder / METADATA[1]
    return _read_jsonl([jsonl]) if jsonl.is_file() else _read_csv(csv_path)


def _read_parquet(files: list[Path]) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"Parquet manifests need pyarrow: {HF_EXTRA}") from None
    name = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1})"
    rows = Rows(name, "row", [], [], [], files[0].parent)
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises its own error types for a damaged file
            raise DataError(f"{f} cannot be read as Parquet ({type(e).__name__}: {e})") from None
        rows.columns = rows.columns or table.column_names
        start = len(rows.labels)
        assert rows.records is not None
        rows.records += table.to_pylist()
        rows.labels += range(start, start + table.num_rows)
    return rows


def _hf_rows(ds: Any, name: str, base: Path) -> Rows:
    return Rows(name, "row", list(ds.column_names), list(range(len(ds))), None, base, dataset=ds, features=ds.features)


# ---------------------------------------------------------------------------------------------------------------
# From cells to a checked table


def pick_column(columns: list[str], wanted: str | None, candidates: Sequence[str], what: str, key: str) -> str | None:
    """The column to read: ``wanted`` when given, else the first of ``candidates`` present; None when absent."""
    if wanted:
        return wanted if wanted in columns else None
    return next((c for c in candidates if c in columns), None)


def column_problem(rows: Rows, wanted: str | None, what: str, key: str, candidates: Sequence[str]) -> Problem:
    have = ", ".join(rows.columns) or "none"
    asked = f"no column {wanted!r}" if wanted else f"no {what} column (looked for {', '.join(candidates)})"
    return Problem(
        rows.name,
        None,
        "missing_column",
        f"{asked}; its columns: {have}; set {key} to the column that holds the {what}",
    )


@dataclass
class _Builder:
    """Turns checked cells into a RowTable: images by identity (one per path, one per row otherwise)."""

    rows: Rows
    refs: list[Any] = field(default_factory=list)
    by_path: dict[str, int] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)
    pair_image: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def add(self, ref: Any, captions: list[str], label: int) -> None:
        if isinstance(ref, Path):
            k = self.by_path.setdefault(str(ref), len(self.refs))
            if k == len(self.refs):
                self.refs.append(ref)
        else:
            k = len(self.refs)
            self.refs.append(ref)
        for c in captions:
            self.captions.append(c)
            self.pair_image.append(k)
            self.lines.append(label)


def build_table(rows: Rows, image_column: str | None, text_column: str | None) -> tuple[RowTable, list[Problem]]:
    """The pairs of ``rows`` whose cells are usable, and a problem for each row that is not (named by its row)."""
    problems = list(rows.problems)
    image_col = pick_column(rows.columns, image_column, IMAGE_COLUMNS, "image", "data.image_column")
    text_col = pick_column(rows.columns, text_column, TEXT_COLUMNS, "caption", "data.text_column")
    empty = RowTable(rows.name, (), (), (), (), rows.unit)
    if image_col is None:
        problems.append(column_problem(rows, image_column, "image", "data.image_column", IMAGE_COLUMNS))
    if text_col is None:
        problems.append(column_problem(rows, text_column, "caption", "data.text_column", TEXT_COLUMNS))
    if image_col is None or text_col is None:
        return empty, problems
    builder, column = _Builder(rows), None
    image_cells, text_cells = _cells(rows, image_col, text_col)
    if rows.dataset is not None and _is_image_feature(rows.features.get(image_col)):
        column = rows.dataset.select_columns([image_col]).cast_column(image_col, hf_datasets().Image(decode=False))
    for label, image_cell, text_cell in zip(rows.labels, image_cells, text_cells):
        captions, why = _captions(text_cell, text_col)
        ref, image_why = _image_ref(image_cell, image_col, rows.base, label if column is not None else None)
        if isinstance(ref, EncodedImage):
            ref = EncodedImage(f"{rows.name}, {rows.unit} {label}", ref.data)
        why = image_why or why
        if why is not None:
            problems.append(Problem(rows.name, label, why[0], why[1], unit=rows.unit))
            continue
        builder.add(ref, captions, label)
    table = RowTable(
        rows.name,
        tuple(builder.refs),
        tuple(builder.captions),
        tuple(builder.pair_image),
        tuple(builder.lines),
        rows.unit,
        column,
        image_col,
    )
    return table, problems


def _is_image_feature(feature: Any) -> bool:
    return type(feature).__name__ == "Image"


def _cells(rows: Rows, image_col: str, text_col: str) -> tuple[Sequence[Any], Sequence[Any]]:
    if rows.records is not None:
        return [r.get(image_col) for r in rows.records], [r.get(text_col) for r in rows.records]
    ds = rows.dataset
    texts = ds[text_col] if hasattr(ds, "__getitem__") else []
    texts = list(texts)
    if _is_image_feature(rows.features.get(image_col)):
        column = ds.select_columns([image_col]).cast_column(image_col, hf_datasets().Image(decode=False))
        images: list[Any] = []
        for batch in column.iter(batch_size=512):
            # bytes held in the data stay there (read again when needed): only their presence is recorded here
            images += [
                None if c is None else {"in_data": c.get("bytes") is not None, "path": c.get("path")}
                for c in batch[image_col]
            ]
        return images, texts
    return list(ds[image_col]), texts


def _captions(cell: Any, column: str) -> tuple[list[str], tuple[str, str] | None]:
    """The captions of a cell (a list: several) or the problem with it."""
    cells = cell if isinstance(cell, (list, tuple)) else [cell]
    if not cells:
        return [], ("empty_caption", f"the {column!r} list is empty: no caption for this image")
    out = []
    for c in cells:
        if c is None or (isinstance(c, float) and c != c):  # None / NaN: a missing value
            return [], ("empty_caption", f"no caption (the {column!r} cell is empty)")
        if not isinstance(c, str):
            return [], ("not_text", f"the {column!r} cell is not text: {type(c).__name__} {str(c)[:40]!r}")
        if not c.strip():
            return [], ("empty_caption", f"empty caption in column {column!r}")
        out.append(c.strip())
    return out, None


def _image_ref(cell: Any, column: str, base: Path, row: int | None) -> tuple[Any, tuple[str, str] | None]:
    """What identifies the image of a cell (a Path, EncodedImage, or the row holding its bytes), or its problem."""
    if cell is None:
        return None, ("no_image", f"no image (the {column!r} cell is empty)")
    if isinstance(cell, dict):
        if cell.get("in_data") and row is not None:
            return row, None
        if cell.get("bytes") is not None:
            return EncodedImage(f"row {row}", bytes(cell["bytes"])), None
        cell = cell.get("path")
        if not cell:
            return None, ("no_image", f"no image (the {column!r} cell holds neither bytes nor a path)")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return EncodedImage("bytes", bytes(cell)), None
    if isinstance(cell, str):
        if "://" in cell:
            return None, (
                "url",
                f"{cell[:80]!r} is a URL: images are not downloaded; fetch them first (e.g. img2dataset) and list "
                "their paths",
            )
        path = Path(cell) if os.path.isabs(cell) else base / cell
        if not path.is_file():
            return None, (
                "missing_file",
                f"image {cell!r} not found" + (f" in {base}" if not os.path.isabs(cell) else ""),
            )
        return path, None
    return None, (
        "not_an_image",
        f"the {column!r} cell is not an image nor a path: {type(cell).__name__} {str(cell)[:40]!r}",
    )


def check_images(table: RowTable, max_pixels: int | None, progress: bool) -> dict[int, tuple[str, str]]:
    """Image index -> (kind, message) for each image that cannot be decoded (each is decoded once, in threads)."""

    def check(k: int) -> tuple[int, tuple[str, str] | None]:
        try:
            source = table.image(k)
            if isinstance(source, Path) and os.path.getsize(source) == 0:
                return k, ("empty_file", "zero-byte file")
            load_image(readable(source), max_pixels)
        except ImageTooLarge as e:
            return k, ("decompression_bomb", str(e))
        except Exception as e:
            kind = "truncated_image" if "truncated" in str(e).lower() else "not_an_image"
            return k, (kind, f"cannot be decoded as an image ({type(e).__name__}: {e})")
        return k, None

    used = sorted(set(table.pair_image))
    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = Progress(
            pool.map(check, used),
            total=len(used),
            desc="checking images",
            unit="img",
            disable=not progress,
            leave=False,
        )
        return {k: why for k, why in results if why is not None}


def checked(rows: Rows, spec: RowSpec, *, progress: bool = False) -> tuple[RowTable, list[Problem], int]:
    """The usable pairs of ``rows``, every problem (cells and images), and the number of records read."""
    table, problems = build_table(rows, spec.image_column, spec.text_column)
    bad = check_images(table, spec.max_pixels, progress) if len(table) else {}
    keep, told = [], set()
    for i, k in enumerate(table.pair_image):
        if k not in bad:
            keep.append(i)
        elif (table.lines[i], k) not in told:  # several captions of one bad image: one problem per row
            told.add((table.lines[i], k))
            what = table.refs[k] if isinstance(table.refs[k], Path) else "the image"
            problems.append(table.problem(i, bad[k][0], f"{what}: {bad[k][1]}"))
    problems.sort(key=lambda p: (p.file, p.line if p.line is not None else -1))
    table = table.select(keep)
    total = len(table) + sum(1 for p in problems if p.fatal and p.line is not None)  # usable pairs + bad rows
    return table, problems, total


# ---------------------------------------------------------------------------------------------------------------
# Train / validation


def carve(table: RowTable, amount: float, seed: int) -> tuple[RowTable, RowTable]:
    """(train, val): ``amount`` of the images (a fraction < 1, else a count) drawn with ``seed`` go to val, with all
    their captions, so that no image is in both."""
    images, _ = table.images()
    n = round(len(images) * amount) if amount < 1 else int(amount)
    n = max(1, min(n, len(images) - 1))
    chosen = {images[i] for i in np.random.default_rng(seed).permutation(len(images))[:n]}
    val = [i for i, k in enumerate(table.pair_image) if k in chosen]
    train = [i for i, k in enumerate(table.pair_image) if k not in chosen]
    return table.select(train), replace(table.select(val), name=f"{table.name} (carved validation)")


def carve_note(spec: RowSpec, split: str, readers: dict[str, Any]) -> str:
    return (
        f"{spec.where} has no split {split!r} (its splits: {', '.join(readers)}): "
        f"data.val_carve {spec.val_carve:g} of the train images (seed data.val_carve_seed {spec.val_carve_seed}) "
        "are held out for validation"
    )


# ---------------------------------------------------------------------------------------------------------------
# What validate-data and training call


def report_split(
    rows: Rows,
    split: str,
    spec: RowSpec,
    *,
    tokenizer: Any = None,
    context_length: int | None = None,
    progress: bool = False,
) -> SplitReport:
    """A split's report, as ``validate.validate_split`` gives for the folder layout."""
    table, problems, total = checked(rows, spec, progress=progress)
    if tokenizer is not None and context_length and len(table):
        cut = long_captions_note(list(table.captions), tokenizer, context_length)
        if cut is not None:
            problems.append(table.problem(cut[0], "caption_truncated", cut[1]))
            problems[-1] = replace(problems[-1], fatal=False)
    return SplitReport(split, table, tuple(problems), total)  # type: ignore[arg-type]  # a RowTable reads the same


def validate_rows(spec: RowSpec, splits: Sequence[str] | None = None, **options: Any) -> list[SplitReport]:
    """Reports of ``splits`` (default: every split the data has)."""
    readers = split_readers(spec)
    names = list(splits) if splits else list(readers)
    reports = []
    for split in names:
        found = find_split(readers, split)
        if found is None:
            raise missing_split(spec, readers, split)
        reports.append(report_split(readers[found](), found, spec, **options))
    return reports


def open_tables(
    spec: RowSpec, train_split: str, val_split: str, on_error: str, *, progress: bool = False
) -> tuple[RowTable, RowTable | None]:
    """The checked training pairs and validation pairs (``data.on_error`` applied; carved when there is no split)."""
    readers = split_readers(spec)
    train_name = find_split(readers, train_split)
    if train_name is None:
        raise missing_split(spec, readers, train_split)
    train = require_usable(report_split(readers[train_name](), train_name, spec, progress=progress), on_error)
    if not val_split:
        return train, None  # type: ignore[return-value]
    val_name = find_split(readers, val_split)
    if val_name is not None and val_name != train_name:
        val = require_usable(report_split(readers[val_name](), val_name, spec, progress=progress), on_error)
        return train, val  # type: ignore[return-value]
    if spec.val_carve <= 0:
        raise missing_split(spec, readers, val_split)
    log.info("%s", carve_note(spec, val_split, readers))
    return carve(train, spec.val_carve, spec.val_carve_seed)  # type: ignore[arg-type]
