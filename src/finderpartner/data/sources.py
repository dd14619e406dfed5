"""Data sources: what training and evaluation read, behind one interface for CSV folders and WebDataset shards.

The trainer asks ``open_training_data(cfg.data, passes)`` for a :class:`TrainingData` and never branches on the format:

* :class:`FolderData` — ``<root>/images/<split>/`` plus ``captions_<split>.csv``, checked row by row before
  training (``data.on_error``); batches come from an exact sampler (every pair once per epoch, resumable to the
  step), with decoded images cached in memory when the data is seen more than once.
* :class:`ShardData` — WebDataset tar shards read as a deterministic stream (resumable to the step as well).

Both give the training captions (the tiny model learns its tokenizer from them), the number of pairs that makes an
epoch, the validation set as an :class:`EvalSet`, and ``batches(...)``: the batch source (``steps_per_epoch``,
``set_position``) and its ``DataLoader``. A new format is one more class here with those four things.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..config import DataConfig, TrainConfig
from ..errors import DataError
from ..signals import ignore_in_worker
from .dataset import ContrastiveBatchSampler, DecodedImages, PairDataset, PairTable
from .shards import ShardStream, expand_shards, raw_samples, read_pairs, shard_sizes
from .transforms import TrainTransform
from .validate import MIN_IMAGES, require_usable, validate_split

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation data


@dataclass
class EvalSet:
    """What an evaluation ranks: images (files or encoded bytes), captions, and the image of each caption."""

    name: str
    images: list[Any]  # paths, encoded images (validation shards: EncodedImage bytes), or PIL images
    captions: list[str]
    text_to_image: list[int]

    @classmethod
    def from_table(cls, table: PairTable) -> EvalSet:
        filenames, row_to_image = table.images()
        return cls(str(table.csv_path), [table.image_dir / f for f in filenames], list(table.captions), row_to_image)

    @classmethod
    def from_shards(cls, urls: list[str], max_pixels: int | None = None) -> EvalSet:
        images, captions = read_pairs(urls, max_pixels)  # encoded bytes, decoded when embedded
        return cls(
            urls[0] if len(urls) == 1 else f"{urls[0]} (+{len(urls) - 1} shards)",
            images,
            captions,
            list(range(len(images))),
        )


def require_retrievable(data: EvalSet, what: str, fixes: str) -> EvalSet:
    """Refuse a set with fewer than 2 distinct images: its loss is NaN and every recall 1.0, which means nothing."""
    if len(data.images) < MIN_IMAGES:
        raise DataError(
            f"{what} ({data.name}) has {len(data.images)} distinct image(s) in {len(data.captions)} pair(s): retrieval "
            f"needs at least {MIN_IMAGES} images (with one, the loss is undefined and every recall is 1.0); {fixes}"
        )
    return data


# ---------------------------------------------------------------------------------------------------------------
# Training data


class Batches(Protocol):
    """A source of contrastive batches: the sampler of a folder, or the stream of shards."""

    global_batch: int
    world_size: int
    num_rows: int

    @property
    def steps_per_epoch(self) -> int: ...

    def set_position(self, epoch: int, start_step: int = 0) -> None: ...


@dataclass
class Loading:
    """How batches are loaded, the same for every source."""

    transform: TrainTransform
    collate: Callable[[list[Any]], Any]
    global_batch: int
    rank: int
    world: int
    seed: int
    device: torch.device
    workers: int

    def loader_options(self, *, persistent: bool) -> dict[str, Any]:
        return dict(
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0 and persistent,
            prefetch_factor=4 if self.workers > 0 else None,
            generator=torch.Generator(),  # the loader's own seed draw must not consume the global RNG stream
            worker_init_fn=ignore_in_worker,  # Ctrl-C / SIGTERM stop the main process, which stops its workers
        )


class TrainingData(Protocol):
    captions: list[str]  # training captions ([] when not needed and costly to read)
    num_rows: int  # pairs per epoch
    val: EvalSet | None

    def batches(self, loading: Loading) -> tuple[Batches, DataLoader]: ...


@dataclass(frozen=True)
class Passes:
    """How often training reads the data, as the trainer knows it before the data is opened: a number of steps
    (``train.max_steps``: passes = steps / steps per epoch) or else of epochs (``math.inf``: not known yet, as under
    a time budget). The folder source caches decoded images only when the data is read more than once."""

    epochs: float
    steps: int | None = None

    def count(self, steps_per_epoch: int) -> float:
        return self.steps / steps_per_epoch if self.steps else self.epochs

    @classmethod
    def of(cls, train: TrainConfig) -> Passes:
        """``train.max_steps``, else ``train.epochs``; a time budget without max_steps: not known before it is
        measured (more than one pass is assumed)."""
        return cls(math.inf if train.time_budget and not train.max_steps else train.epochs, train.max_steps)


def open_training_data(data: DataConfig, passes: Passes, *, need_captions: bool, progress: bool) -> TrainingData:
    """The configured training data (``data.format``), checked, with its validation set.

    ``passes``: how often training reads it. ``need_captions``: the caller needs every training caption (the tiny
    model's tokenizer is learnt from them); shards are then read once in full.
    """
    if data.format == "webdataset":
        return ShardData.open(data, need_captions=need_captions)
    return FolderData.open(data, passes, progress=progress)


@dataclass
class FolderData:
    """A folder split: rows checked before training, an exact sampler, decoded images cached when it pays."""

    table: PairTable
    val: EvalSet | None
    data: DataConfig
    passes: Passes

    @classmethod
    def open(cls, d: DataConfig, passes: Passes, *, progress: bool) -> FolderData:
        train = require_usable(
            validate_split(d.root, d.train_split, max_pixels=d.max_image_pixels, progress=progress), d.on_error
        )
        val = None
        if d.val_split:
            table = require_usable(
                validate_split(d.root, d.val_split, max_pixels=d.max_image_pixels, progress=progress), d.on_error
            )
            val = require_retrievable(
                EvalSet.from_table(table),
                f"validation split {d.val_split!r}",
                "add more validation pairs, or disable validation with --set data.val_split= (data.val_split: '')",
            )
        return cls(train, val, d, passes)

    @property
    def captions(self) -> list[str]:
        return list(self.table.captions)

    @property
    def num_rows(self) -> int:
        return len(self.table)

    def batches(self, loading: Loading) -> tuple[Batches, DataLoader]:
        sampler = ContrastiveBatchSampler(
            self.num_rows, loading.global_batch, loading.seed, loading.rank, loading.world
        )
        passes = self.passes.count(sampler.steps_per_epoch)
        decoded = self._decoded_images(loading.transform, passes, progress=loading.rank == 0)
        dataset = PairDataset(self.table, loading.transform, self.data.max_image_pixels, decoded)
        options = loading.loader_options(persistent=True)
        return sampler, DataLoader(dataset, batch_sampler=sampler, collate_fn=loading.collate, **options)

    def _decoded_images(self, transform: TrainTransform, passes: float, progress: bool) -> DecodedImages | None:
        """The decoded-image cache when it pays (the data is seen more than once) and fits (measured: +8% per step)."""
        d = self.data
        if d.cache_images is False or (d.cache_images == "auto" and passes <= 1):
            return None
        side = transform.source_side
        estimate = DecodedImages.estimate_bytes(self.table, side)
        if d.cache_images == "auto" and estimate > d.cache_max_gb * 2**30:
            log.info(
                "not caching decoded images: they would take ~%.1f GB (data.cache_max_gb %.1f)",
                estimate / 2**30,
                d.cache_max_gb,
            )
            return None
        start = time.perf_counter()
        decoded = DecodedImages(self.table, side, d.max_image_pixels, progress=progress)
        log.info(
            "decoded %d images once for all epochs (%d px short side, %.0f MB) in %.1fs",
            len(decoded),
            side,
            decoded.nbytes / 2**20,
            time.perf_counter() - start,
        )
        return decoded


@dataclass
class ShardData:
    """WebDataset shards: a deterministic stream; an epoch is ``data.train_size`` pairs (or all of them, counted)."""

    urls: list[str]
    captions: list[str]
    num_rows: int
    val: EvalSet | None
    max_pixels: int | None
    resampled: bool = False
    sizes: dict[str, int] | None = None  # samples per shard, when sizes.json lists them all

    @classmethod
    def open(cls, d: DataConfig, *, need_captions: bool) -> ShardData:
        """The shards of ``data``. The number of pairs comes from ``data.train_size``, else from the
        ``sizes.json`` beside the shards; only when neither gives it, or the captions are needed (the tiny
        tokenizer), are the shards read: once, by rank 0, which sends the result to the other processes."""
        urls = expand_shards(d.train_shards or "")
        sizes = shard_sizes(urls)
        known = sum(sizes.values()) if sizes is not None else None
        captions: list[str] = []
        if need_captions or (not d.train_size and known is None):
            count, captions = _read_on_rank0(urls, with_captions=need_captions)
            known = known if known is not None else count
        val = None
        if d.val_shards:
            val = require_retrievable(
                EvalSet.from_shards(expand_shards(d.val_shards), d.max_image_pixels),
                "the validation set",
                "add more validation pairs, or disable validation with --set data.val_shards= (data.val_shards: null)",
            )
        if d.train_size and known is not None and d.train_size != known:
            log.info(
                "data.train_size %d: the shards hold %d pairs; an epoch is %d pairs", d.train_size, known, d.train_size
            )
        num_rows = d.train_size or known
        if not num_rows:
            raise DataError(f"the training shards {d.train_shards} hold no pairs")
        return cls(urls, captions, num_rows, val, d.max_image_pixels, d.resampled, sizes)

    def batches(self, loading: Loading) -> tuple[Batches, DataLoader]:
        stream = ShardStream(
            self.urls,
            loading.transform,
            loading.collate,
            num_rows=self.num_rows,
            global_batch=loading.global_batch,
            seed=loading.seed,
            lanes=max(1, loading.workers),
            rank=loading.rank,
            world_size=loading.world,
            max_pixels=self.max_pixels,
            resampled=self.resampled,
            sizes=self.sizes,
        )
        # A stream's workers must see set_position(): they are not kept between epochs.
        return stream, DataLoader(stream, batch_size=None, **loading.loader_options(persistent=False))


def _read_on_rank0(urls: list[str], *, with_captions: bool) -> tuple[int, list[str]]:
    """Pairs in ``urls`` and (``with_captions``) their captions, read by rank 0 only and broadcast to the others
    (a failure on rank 0 is raised on every rank)."""
    distributed = dist.is_available() and dist.is_initialized()  # as processes.world(), which data/ does not import
    rank, size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    result: tuple[int, list[str]] | str | None = None
    if rank == 0:
        log.info(
            "reading the %d training shard(s) once to %s",
            len(urls),
            "learn the captions" if with_captions else "count the pairs",
        )
        try:
            captions = [s["txt"].decode("utf-8", "replace") for s in raw_samples(urls) if "txt" in s]
            result = (len(captions), captions if with_captions else [])
        except DataError as e:
            if size == 1:
                raise
            result = str(e)
    if size > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, str):
        raise DataError(result)
    assert result is not None
    return result
