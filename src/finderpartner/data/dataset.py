"""Image-caption pairs: the CSV folder layout, its datasets, and the sampler that defines batches.

Layout: ``<root>/images/<split>/...`` and ``<root>/captions_<split>.csv`` with the header ``filename,caption``.
Several rows may name the same image. ``read_split`` parses the CSV and reports every problem it finds with
its line number instead of stopping at the first; the image files themselves are checked by ``validate.py``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..env import cpu_cores
from ..progress import Progress
from .transforms import DECODE_ERRORS, load_image

log = logging.getLogger(__name__)

HEADER = ("filename", "caption")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located precisely enough to fix it."""

    file: str
    line: int | None  # CSV line (1 = header); None for file-level problems
    kind: str  # short identifier, e.g. "missing_file", "empty_caption"
    message: str
    fatal: bool = True  # False: reported, but handled (e.g. a BOM, a caption that will be truncated)
    unit: str = "line"  # what ``line`` counts: a line of a text file, or a "row" of a dataset (0-based, as ds[row])

    def __str__(self) -> str:
        if self.line is None:
            where = self.file
        else:
            where = f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}, {self.unit} {self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class PairTable:
    """The rows of one split: ``filenames[i]`` (relative to ``image_dir``) paired with ``captions[i]``."""

    image_dir: Path
    csv_path: Path
    filenames: tuple[str, ...]
    captions: tuple[str, ...]
    lines: tuple[int, ...]  # CSV line of each row, for messages

    def __len__(self) -> int:
        return len(self.captions)

    def path(self, i: int) -> Path:
        return self.image_dir / self.filenames[i]

    @property
    def name(self) -> str:
        return str(self.csv_path)

    def source(self, i: int) -> Path:
        """The image of row ``i`` (every table: a path, or an ``EncodedImage``; ``readable`` opens either)."""
        return self.path(i)

    def image_source(self, name: str) -> Path:
        """The image behind a key of ``images()``."""
        return self.image_dir / name

    def select(self, keep: Sequence[int]) -> PairTable:
        return PairTable(
            self.image_dir,
            self.csv_path,
            tuple(self.filenames[i] for i in keep),
            tuple(self.captions[i] for i in keep),
            tuple(self.lines[i] for i in keep),
        )

    def images(self) -> tuple[list[str], list[int]]:
        """Unique image files (first-seen order) and, for each row, the index of its image in that list."""
        unique: dict[str, int] = {}
        row_to_image = [unique.setdefault(f, len(unique)) for f in self.filenames]
        return list(unique), row_to_image


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    root = Path(root)
    return root / "images" / split, root / f"captions_{split}.csv"


def _missing_split(root: Path, split: str) -> str:
    """Why a split's CSV is not there: no data folder, a file instead of one, or no such split (and the ones that are)."""
    if not root.exists():
        return f"not found: the data folder {root} does not exist"
    if not root.is_dir():
        return f"not found: {root} is a file, not a data folder (images/<split>/ and captions_<split>.csv)"
    splits = sorted(p.stem.removeprefix("captions_") for p in root.glob("captions_*.csv"))
    there = f"the splits in {root}: {', '.join(splits)}" if splits else f"{root} holds no captions_<split>.csv at all"
    return f"not found: there is no split {split!r} ({there}); expected captions_{split}.csv next to images/"


def read_split(root: str | Path, split: str) -> tuple[PairTable, list[Problem]]:
    """Parse ``captions_<split>.csv``; rows with a problem are left out of the table and reported."""
    image_dir, csv_path = split_paths(root, split)
    name = str(csv_path)
    empty = PairTable(image_dir, csv_path, (), (), ())
    if not csv_path.is_file():
        return empty, [Problem(name, None, "missing_csv", _missing_split(Path(root), split))]
    if not image_dir.is_dir():
        return empty, [Problem(str(image_dir), None, "missing_image_dir", "image folder not found")]
    text, problems = _decode(csv_path.read_bytes(), name)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        return empty, problems + [Problem(name, 1, "csv_error", _csv_error(e))]
    if header is None:
        return empty, problems + [
            Problem(name, None, "empty_csv", "the file is empty; expected the header filename,caption")
        ]
    columns = [h.strip().lower() for h in header]
    missing = [c for c in HEADER if c not in columns]
    extra = [c for c in columns if c not in HEADER]
    if missing or extra:
        detail = "; ".join(
            part
            for part in (
                f"missing column(s) {', '.join(missing)}" if missing else "",
                f"unexpected column(s) {', '.join(repr(c) for c in extra)}" if extra else "",
            )
            if part
        )
        return empty, problems + [Problem(name, 1, "bad_header", f"header must be 'filename,caption': {detail}")]
    fi, ci = columns.index("filename"), columns.index("caption")
    rows: list[tuple[str, str, int]] = []
    seen: dict[tuple[str, str], int] = {}
    root_real = os.path.realpath(image_dir)
    line = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field over the csv module's size limit: report the line, read on
            problems.append(Problem(name, line + 1, "csv_error", _csv_error(e)))
            line = reader.line_num
            continue
        start, line = line + 1, reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue  # blank lines are harmless
        problem = _check_row(fields, fi, ci, image_dir, root_real)
        if problem is None:
            key = (fields[fi], fields[ci].strip())
            if key in seen:
                problem = ("duplicate_row", f"duplicate of line {seen[key]} (same filename and caption)")
            else:
                seen[key] = start
        if problem is not None:
            problems.append(Problem(name, start, *problem))
        else:
            rows.append((fields[fi], fields[ci].strip(), start))
    table = PairTable(image_dir, csv_path, *map(tuple, zip(*rows))) if rows else empty
    if not rows and not any(p.fatal for p in problems):
        problems.append(
            Problem(name, None, "no_rows", "no rows: only the header filename,caption; add image,caption lines")
        )
    return table, problems


def _csv_error(e: csv.Error) -> str:
    if "field limit" in str(e):
        return (
            f"a field is longer than {csv.field_size_limit()} characters ({e}); a caption that long is usually "
            "an unclosed quote that swallows the following lines: check the quotes on this line"
        )
    return f"not valid CSV ({e})"


def _decode(raw: bytes, name: str) -> tuple[str, list[Problem]]:
    """UTF-8 text of a CSV. A BOM is stripped (and mentioned); undecodable lines are reported, not guessed."""
    problems: list[Problem] = []
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        problems.append(Problem(name, None, "bom", "starts with a UTF-8 byte-order mark (ignored)", fatal=False))
    try:
        return raw.decode("utf-8"), problems
    except UnicodeDecodeError:
        pass
    lines = raw.split(b"\n")
    for number, chunk in enumerate(lines, start=1):
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                Problem(
                    name,
                    number,
                    "not_utf8",
                    f"not UTF-8 (byte {chunk[e.start]:#04x} at column {e.start + 1}); save the CSV as UTF-8",
                )
            )
            lines[number - 1] = b""  # drop the line; the others are still read and checked
    return b"\n".join(lines).decode("utf-8"), problems


def _check_row(fields: list[str], fi: int, ci: int, image_dir: Path, root_real: str) -> tuple[str, str] | None:
    if len(fields) != len(HEADER):
        return (
            "column_count",
            f"expected 2 fields (filename,caption), got {len(fields)}; quote captions that contain commas",
        )
    filename, caption = fields[fi], fields[ci]
    if not caption.strip():
        return "empty_caption", f"empty caption for {filename!r}"
    if not filename.strip():
        return "empty_filename", "empty filename"
    if os.path.isabs(filename) or filename.startswith(("/", "\\")) or ".." in Path(filename).parts:
        return "path_escape", f"{filename!r} must be a path inside {image_dir} (no absolute paths, no '..')"
    path = image_dir / filename
    if not os.path.lexists(path):
        return "missing_file", f"image {filename!r} not found in {image_dir}"
    real = os.path.realpath(path)
    if os.path.commonpath([real, root_real]) != root_real:
        return "path_escape", f"{filename!r} is a link that leaves {image_dir} (to {real})"
    if not os.path.isfile(real):
        return "not_a_file", f"{filename!r} is not a regular file"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class Skipped:
    """Stands in for a sample whose image could not be read during training (changed on disk since validation)."""

    index: int
    path: str
    reason: str


class PairDataset(Dataset):
    """Training pairs. Indexed by ``(row, seed)``: the seed drives this sample's augmentation."""

    def __init__(
        self,
        table: PairTable,
        transform: Callable[..., tuple[torch.Tensor, str]],
        max_pixels: int | None = None,
        decoded: DecodedImages | None = None,
    ):
        self.table = table
        self.transform = transform
        self.max_pixels = max_pixels
        self.decoded = decoded
        self.min_side = getattr(transform, "source_side", None)  # large JPEGs are decoded down to this

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | Skipped:
        index, seed = key
        path = self.table.source(index)
        try:
            cached = self.decoded.get(index) if self.decoded is not None else None
            img = (
                Image.fromarray(cached)
                if cached is not None
                else load_image(readable(path), self.max_pixels, self.min_side)
            )
        except DECODE_ERRORS as e:  # never crash an epoch for one file: the collate function drops and reports it
            return Skipped(index, str(path), f"{type(e).__name__}: {e}")
        rng = torch.Generator().manual_seed(seed)
        pixels, caption = self.transform(img, self.table.captions[index], rng)
        return {"index": index, "pixel_values": pixels, "caption": caption}


class DecodedImages:
    """Every image of a table decoded once and kept in memory, pre-resized for the training crop.

    Multi-epoch fine-tuning otherwise decodes (and, for large photos, downsizes) every image again each epoch.
    The shorter side is kept at the transform's ``source_side`` (``ceil(crop / sqrt(min crop area))``), so a random resized crop of the cached
    image never has fewer pixels than one of the original. Built in the main process before the DataLoader
    workers start; they share it copy-on-write. An image that fails to decode is not cached: the dataset reads
    the file at its turn and reports it like any other broken file.
    """

    def __init__(self, table: PairTable, side: int, max_pixels: int | None = None, *, progress: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.side = side
        names, self._row_to_image = table.images()

        def decode(name: str) -> np.ndarray | None:
            try:
                image = load_image(readable(table.image_source(name)), max_pixels, side)
                return np.asarray(_shrink(image, side), dtype=np.uint8)
            except DECODE_ERRORS:  # reported when the dataset reads the file itself
                return None

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # PIL releases the GIL while decoding
            self._images = list(
                Progress(
                    pool.map(decode, names),
                    total=len(names),
                    desc="decoding images",
                    unit="img",
                    disable=not progress,
                    leave=False,
                )
            )
        self.nbytes = sum(a.nbytes for a in self._images if a is not None)

    @staticmethod
    def estimate_bytes(table: PairTable, side: int, sample: int = 256) -> int:
        """Memory the cache would take, from the headers of an evenly spread sample of the images."""
        names, _ = table.images()
        if not names:
            return 0
        picked = names[:: max(1, len(names) // sample)]
        total = 0
        for name in picked:
            try:
                with Image.open(readable(table.image_source(name))) as img:
                    w, h = img.size
            except DECODE_ERRORS:  # a header that cannot be read: left out of the estimate
                continue
            scale = min(1.0, side / max(1, min(w, h)))
            total += round(w * scale) * round(h * scale) * 3
        return int(total / len(picked) * len(names))

    def __len__(self) -> int:
        return len(self._images)

    def get(self, row: int) -> np.ndarray | None:
        return self._images[self._row_to_image[row]]


def _shrink(img: Image.Image, side: int) -> Image.Image:
    if min(img.size) <= side:
        return img
    scale = side / min(img.size)
    size = (max(side, round(img.width * scale)), max(side, round(img.height * scale)))
    return img.resize(size, Image.BICUBIC, reducing_gap=3.0)


@dataclass(frozen=True)
class EncodedImage:
    """An image's encoded file bytes (JPEG, PNG, ...) and a name for messages (a shard sample: ``<shard>:<key>``).

    Validation shards keep these instead of decoded images: a fraction of the memory, decoded when embedded.
    """

    name: str
    data: bytes = field(repr=False)

    def __str__(self) -> str:
        return self.name


def readable(source: Path | EncodedImage) -> Path | io.BytesIO:
    """What ``load_image`` opens for an image source: the file, or the encoded bytes."""
    return io.BytesIO(source.data) if isinstance(source, EncodedImage) else source


def image_name(item: Any) -> str:
    """How an image entry is named in messages: its path, or the name of encoded bytes."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} encoded bytes>"
    return str(item)


class ImageFileDataset(Dataset):
    """Images for embedding (evaluation, gallery indexing): deterministic preprocessing, failures reported.

    ``paths`` are files, encoded image bytes (``EncodedImage`` or ``bytes``: validation shards, decoded here,
    lazily), or already decoded PIL images.
    """

    def __init__(
        self,
        paths: Sequence[str | Path | Image.Image | EncodedImage | bytes],
        transform: Callable[[Any], torch.Tensor],
        max_pixels: int | None = None,
    ):
        self.paths = list(paths)
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = getattr(transform, "source_side", None)  # large JPEGs are decoded down to this

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        item = self.paths[index]
        try:
            if isinstance(item, Image.Image):
                img = item
            elif isinstance(item, (EncodedImage, bytes, bytearray, memoryview)):
                data = item.data if isinstance(item, EncodedImage) else item
                img = load_image(io.BytesIO(data), self.max_pixels, self.min_side)
            else:
                img = load_image(item, self.max_pixels, self.min_side)
        except DECODE_ERRORS as e:
            return Skipped(index, image_name(item), f"{type(e).__name__}: {e}")
        return {"index": index, "pixel_values": self.transform(img)}


# ---------------------------------------------------------------------------------------------------------------
# Batches


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Augmentation seed of the sample at ``position`` of ``epoch``: independent of workers, ranks and resumes."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


@dataclass
class ContrastiveBatchSampler(Sampler[list[tuple[int, int]]]):
    """Global contrastive batches of a seeded permutation; each process takes its contiguous slice.

    Batch ``k`` of epoch ``e`` is the same set of rows in the same order whatever the number of processes,
    so the gathered global batch of an N-process run equals the batch of a 1-process run. ``set_position``
    starts an epoch part-way through, which is how an exact mid-epoch resume skips what was already seen.
    """

    num_rows: int
    global_batch: int
    seed: int
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    epoch: int = 0
    start_step: int = field(default=0)

    def __post_init__(self) -> None:
        if self.global_batch % self.world_size:
            raise ValueError(f"batch {self.global_batch} is not divisible by {self.world_size} processes")
        if self.global_batch > self.num_rows:
            raise ValueError(f"batch {self.global_batch} is larger than the {self.num_rows} rows")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch  # the incomplete last batch is dropped: every step is a full batch

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
            order = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            order = list(range(self.num_rows))
        local = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * local
            yield [(order[p], sample_seed(self.seed, self.epoch, p)) for p in range(first, first + local)]


def num_workers(setting: int | str) -> int:
    return min(8, cpu_cores()) if setting == "auto" else int(setting)
