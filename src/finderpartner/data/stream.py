"""A Hugging Face dataset read as a stream (``data.streaming``): hub data or Parquet / JSONL / Arrow files that are
not loaded, only iterated, yet trained on deterministically and resumed exactly.

The stream is split between processes with ``datasets.distributed.split_dataset_by_node`` (whole files when their
number divides by the processes, else every process keeps one row in ``world``): each process reads its own share,
each epoch in a new order (its files in a seeded order, then a seeded shuffle buffer). Consecutive
rows of a process's share make its local batches, step after step. The steps are dealt to the DataLoader workers
round robin; every worker reads the process's whole share (``IterableDataset.iter``, which ``datasets`` does not
split between workers) but decodes only the rows of its own steps, so the batches do not depend on the number of
workers, and a resume at step ``s`` skips the rows of the first ``s`` steps without decoding them: exact.

An image whose cell holds several captions is one row: each epoch one of them is drawn (seeded), so that a batch never
holds the same image twice. A row that cannot be used (no image, not an image, empty caption) is dropped from its
batch and reported, as in the shard stream; ``validate-data`` reads every row first and names them all.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from .dataset import EncodedImage, Skipped, readable, sample_seed
from .rows import (
    IMAGE_COLUMNS,
    TEXT_COLUMNS,
    RowSpec,
    _captions,
    _hf_file_splits,
    _image_ref,
    _imagefolder_splits,
    _is_image_feature,
    _is_saved,
    _manifest_splits,
    hf_datasets,
    pick_column,
)
from .shards import _take as take
from .transforms import load_image

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000
READ_BATCH = 64


def open_streams(spec: RowSpec) -> tuple[dict[str, Any], Path, dict[str, int]]:
    """Split name -> a ``datasets.IterableDataset``, the folder relative image paths are from, and the rows of each
    split when the files say it without being read (Parquet footers, dataset info)."""
    datasets = hf_datasets()
    root = spec.root
    counts: dict[str, int] = {}
    if spec.hf_id:
        streams = datasets.load_dataset(spec.hf_id, spec.hf_config, streaming=True)
        counts = {s: v.num_examples for s, v in (streams[next(iter(streams))].info.splits or {}).items()}
        return dict(streams), Path("."), counts
    if not root.exists():
        raise DataError(f"not found: the data {root} does not exist (data.root)")
    if root.is_dir() and _is_saved(root):
        loaded = datasets.load_from_disk(str(root))
        loaded = loaded if hasattr(loaded, "keys") else {"train": loaded}
        # in contiguous parts, so that processes take whole parts and each epoch reads them in a new order
        parts = {s: ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds)))) for s, ds in loaded.items()}
        return parts, root, {s: len(ds) for s, ds in loaded.items()}
    if root.is_dir() and _imagefolder_splits(root):
        streams = datasets.load_dataset("imagefolder", data_dir=str(root), streaming=True)
        return dict(streams), root, counts
    if spec.format in ("jsonl", "parquet"):
        files = {s: [str(f) for f in fs] for s, fs in _manifest_splits(root, spec.format).items()}
        builder = "json" if spec.format == "jsonl" else "parquet"
    else:
        found = _hf_file_splits(root)
        if found is None:
            raise DataError(f"{root}: no save_to_disk folder, imagefolder, .parquet, .arrow or .jsonl files to stream")
        builder, files = found
    if not files:
        raise DataError(f"{root} holds no .{spec.format} files")
    if builder == "parquet":
        import pyarrow.parquet as pq

        counts = {s: sum(pq.ParquetFile(f).metadata.num_rows for f in fs) for s, fs in files.items()}
    base = root if root.is_dir() else root.parent
    return dict(datasets.load_dataset(builder, data_files=files, streaming=True)), base, counts


@dataclass
class Columns:
    """The image and caption columns of a stream, and whether the image column is an ``Image`` feature."""

    image: str
    text: str

    @classmethod
    def of(cls, stream: Any, spec: RowSpec, name: str) -> Columns:
        features = stream.features or {}
        columns = list(features)
        if not columns:  # a JSON stream whose columns are only known by reading: its first row says them
            columns = list(next(iter(stream.take(1)), {}))
        image = pick_column(columns, spec.image_column, IMAGE_COLUMNS, "image", "data.image_column")
        text = pick_column(columns, spec.text_column, TEXT_COLUMNS, "caption", "data.text_column")
        for col, wanted, what, key, names in (
            (image, spec.image_column, "image", "data.image_column", IMAGE_COLUMNS),
            (text, spec.text_column, "caption", "data.text_column", TEXT_COLUMNS),
        ):
            if col is None:
                asked = f"no column {wanted!r}" if wanted else f"no {what} column (looked for {', '.join(names)})"
                raise DataError(f"{name}: {asked}; its columns: {', '.join(columns)}; set {key}")
        assert image is not None and text is not None
        return cls(image, text)


def prepared(stream: Any, columns: Columns) -> Any:
    """The two columns only, images left encoded (decoded in the workers, or skipped undecoded on a resume)."""
    stream = stream.select_columns([columns.image, columns.text])
    if _is_image_feature((stream.features or {}).get(columns.image)):
        stream = stream.cast_column(columns.image, hf_datasets().Image(decode=False))
    return stream


def rows_of(stream: Any) -> Iterator[dict[str, Any]]:
    """Rows of a stream, read in batches through ``IterableDataset.iter`` (not split between DataLoader workers)."""
    for batch in stream.iter(batch_size=READ_BATCH):
        keys = list(batch)
        for i in range(len(batch[keys[0]]) if keys else 0):
            yield {k: batch[k][i] for k in keys}


def all_captions(cell: Any) -> list[str]:
    cells = cell if isinstance(cell, (list, tuple)) else [cell]
    return [c.strip() for c in cells if isinstance(c, str) and c.strip()]


def read_eval_rows(
    stream: Any, columns: Columns, base: Path, name: str, max_pixels: int | None
) -> tuple[list[Any], list[str], list[int]]:
    """A (small) validation stream in memory: its images (encoded, or files), every caption and the image of each;
    bad rows left out and reported."""
    images: list[Any] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    bad: list[str] = []
    seen: dict[str, int] = {}
    for row_number, row in enumerate(rows_of(stream)):
        texts, why = _captions(row[columns.text], columns.text)
        ref, image_why = _image_ref(row[columns.image], columns.image, base, None)
        why = image_why or why
        if why is None:
            try:
                load_image(readable(ref), max_pixels).close()
            except Exception as e:  # a bad image: reported below, the set is read on
                why = ("not_an_image", f"cannot be decoded as an image ({type(e).__name__}: {e})")
        if why is not None:
            bad.append(f"row {row_number}: {why[1]}")
            continue
        if isinstance(ref, EncodedImage):
            ref = EncodedImage(f"{name}, row {row_number}", ref.data)
            k = len(images)
        else:  # a manifest lists a file once per caption: one image
            k = seen.setdefault(str(ref), len(images))
        if k == len(images):
            images.append(ref)
        captions += texts
        text_to_image += [k] * len(texts)
    if bad:
        log.warning("%s: %d bad row(s) left out, e.g. %s", name, len(bad), bad[0])
    return images, captions, text_to_image


class RowStream(IterableDataset):
    """This process's local batches of an epoch from a ``datasets`` stream; see the module docstring."""

    def __init__(
        self,
        stream: Any,
        transform: Any,
        collator: Any,
        *,
        columns: Columns,
        base: Path,
        name: str,
        num_rows: int,
        global_batch: int,
        seed: int,
        lanes: int,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
    ):
        if global_batch % world_size:
            raise ValueError(f"batch {global_batch} is not divisible by {world_size} processes")
        self.stream, self.transform, self.collator = stream, transform, collator
        self.columns, self.base, self.name = columns, base, name
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.lanes, self.rank, self.world_size = lanes, rank, world_size
        self.max_pixels, self.shuffle_buffer = max_pixels, shuffle_buffer
        self.epoch = self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_rows // self.global_batch)

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step)

    def share(self) -> Any:
        """This process's share of the stream (``split_dataset_by_node``: whole files when their number divides by
        the processes, else one row in ``world``)."""
        from datasets.distributed import split_dataset_by_node  # datasets is optional: imported when streaming

        return split_dataset_by_node(self.stream, rank=self.rank, world_size=self.world_size)

    def _rows(self) -> Iterator[dict[str, Any]]:
        """The share's rows in this epoch's order: its files in a seeded order, through a seeded shuffle buffer that
        is drained at the end of each pass (``datasets``' own shuffle costs ~1 ms a row, 40x the read). A share that
        runs out before the epoch ends is read again (a process whose files hold fewer rows than its steps need:
        those rows repeat; logged)."""
        share = self.share()
        rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0]))
        # whole files per process: they are read in a new order each epoch; one row in world: in the data's order
        # (reordering the files of a row-split share would change which rows each process gets)
        by_files = self.stream.n_shards % self.world_size == 0 and share.n_shards > 1
        passes = 0
        while True:
            parts = list(range(share.n_shards if by_files else 1))
            rng.shuffle(parts)
            buffer: list[dict[str, Any]] = []
            for part in parts:
                files = share.shard(num_shards=share.n_shards, index=part) if by_files else share
                for row in rows_of(files):
                    buffer.append(row)
                    if len(buffer) >= self.shuffle_buffer:
                        yield take(buffer, rng)
            if not buffer and passes == 0:
                raise DataError(f"{self.name}: process {self.rank}'s share of the stream holds no rows")
            while buffer:
                yield take(buffer, rng)
            passes += 1
            if passes == 1 and self.rank == 0:
                log.info("%s: a process's share ran out before the epoch's end; it is read again", self.name)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        rows = self._rows()
        for step in range(self.steps_per_epoch):
            raw = [next(rows) for _ in range(self.local_batch)]
            if step < self.start_step or (step - self.start_step) % workers != worker:
                continue  # another worker's step, or one done before the resume: read, not decoded
            yield self.collator([self._sample(row, step, i) for i, row in enumerate(raw)])

    def _sample(self, row: dict[str, Any], step: int, i: int) -> dict[str, Any] | Skipped:
        position = step * self.global_batch + self.rank * self.local_batch + i
        where = f"{self.name} (epoch {self.epoch}, position {position})"
        texts, why = _captions(row[self.columns.text], self.columns.text)
        ref, image_why = _image_ref(row[self.columns.image], self.columns.image, self.base, None)
        why = image_why or why
        if why is not None:
            return Skipped(position, where, why[1])
        seed = sample_seed(self.seed, self.epoch, position)
        caption = texts[random.Random(seed).randrange(len(texts))] if len(texts) > 1 else texts[0]
        try:
            img = load_image(readable(ref), self.max_pixels, getattr(self.transform, "source_side", None))
        except Exception as e:  # one bad image never stops an epoch: the collator drops and reports it
            return Skipped(position, where, f"{type(e).__name__}: {e}")
        pixels, caption = self.transform(img, caption, torch.Generator().manual_seed(seed))
        return {"index": position, "pixel_values": pixels, "caption": caption}
