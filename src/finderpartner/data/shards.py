"""WebDataset tar shards: the same image-caption pairs at scale (``<key>.jpg|png|jpeg|webp`` + ``<key>.txt``).

Training reads shards as a deterministic stream. The steps of an epoch are dealt to ``lanes`` (one per
DataLoader worker): step ``s`` is built by lane ``s % lanes`` from that lane's own shards, shuffled per epoch
and through a seeded buffer, and each sample is augmented with a seed fixed by its step and position. A
resume at step ``s0`` replays each lane's stream up to ``s0`` without decoding images, and rotates lanes so
that the DataLoader's round-robin yields step ``s0`` first: resumes are exact as long as the worker count is
the same. Each process reads its own share of the shards (its local part of every global batch).
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from ..outputs import claim_output, read_marker, storage_errors, write_marker
from .collate import Batch, Collator
from .dataset import Skipped, read_split, sample_seed, split_paths
from .transforms import ImageTooLarge, load_image, to_rgb

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _wds() -> Any:
    try:
        import webdataset
    except ImportError:
        raise DataError(
            "data.format webdataset needs the webdataset package: pip install 'finderpartner[shards]'"
        ) from None
    return webdataset


def expand_shards(pattern: str) -> list[str]:
    """Shard paths of a brace pattern such as ``shards/train-{000..099}.tar``; every one must exist."""
    urls = _wds().shardlists.expand_urls(pattern)
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shard(s) of {pattern!r} not found, e.g. {missing[0]}")
    if not urls:
        raise DataError(f"no shards match {pattern!r}")
    return urls


def raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """``{"__key__", "__url__", "<ext>": bytes}`` per sample; an unreadable shard is reported and skipped."""

    def warn(error: Exception) -> bool:
        log.warning("skipping unreadable shard data: %s", error)
        return True

    return _wds().tariterators.tarfile_samples(({"url": u} for u in urls), handler=warn)


def decode_sample(
    sample: dict[str, Any], max_pixels: int | None, min_side: int | None = None
) -> tuple[Image.Image, str]:
    """PIL image and caption of a raw sample; raises ValueError naming the key when something is missing."""
    key = f"{sample.get('__url__')}:{sample.get('__key__')}"
    image_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image_bytes is None or "txt" not in sample:
        raise ValueError(f"{key}: a sample needs an image (.jpg/.png/.webp) and a caption (.txt)")
    caption = sample["txt"].decode("utf-8").strip()
    if not caption:
        raise ValueError(f"{key}: empty caption")
    try:
        return load_image(io.BytesIO(image_bytes), max_pixels, min_side), caption
    except ImageTooLarge as e:
        raise ImageTooLarge(f"{key}: {e}") from None


class ShardStream(IterableDataset):
    """This process's local batches of an epoch, from shards; see the module docstring for determinism."""

    def __init__(
        self,
        urls: list[str],
        transform: Callable[..., tuple[torch.Tensor, str]],
        collator: Collator,
        *,
        num_rows: int,
        global_batch: int,
        seed: int,
        lanes: int,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int | None = None,
        shuffle_buffer: int = 1000,
    ):
        if global_batch % world_size:
            raise ValueError(f"batch {global_batch} is not divisible by {world_size} processes")
        if len(urls) < world_size * lanes:
            raise DataError(
                f"{len(urls)} shard(s) cannot feed {world_size} process(es) x {lanes} worker(s): each needs its own; "
                "write more, smaller shards or lower data.num_workers"
            )
        self.urls, self.transform, self.collator = urls, transform, collator
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

    def lane_shards(self, lane: int) -> list[str]:
        order = list(self.urls)
        random.Random(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])).shuffle(order)
        mine = order[self.rank :: self.world_size]
        return mine[lane :: self.lanes]

    def _shuffled(self, lane: int) -> Iterator[dict[str, Any]]:
        """The lane's samples, shards repeated as needed, through a seeded shuffle buffer."""
        shards = self.lane_shards(lane)
        rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch, self.rank, lane]).generate_state(1)[0]))
        buffer: list[dict[str, Any]] = []
        while True:
            produced = False
            for sample in raw_samples(shards):
                produced = True
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            if not produced:
                raise DataError(f"shards {shards} contain no samples")
            # keep cycling: an epoch is defined by num_rows, not by the end of this lane's shards

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if workers != self.lanes:
            raise DataError(f"shard stream built for {self.lanes} worker(s) but read by {workers}")
        lane = (worker + self.start_step) % self.lanes  # rotation: worker 0 makes step start_step
        steps = [s for s in range(self.steps_per_epoch) if s % self.lanes == lane]
        stream = self._shuffled(lane)
        for step in steps:
            raw = [next(stream) for _ in range(self.local_batch)]
            if step < self.start_step:
                continue  # replayed without decoding: only the stream position matters
            yield self.collator([self._decode(sample, step, i) for i, sample in enumerate(raw)])

    def _decode(self, sample: dict[str, Any], step: int, i: int) -> dict[str, Any] | Skipped:
        position = step * self.global_batch + self.rank * self.local_batch + i
        try:
            img, caption = decode_sample(sample, self.max_pixels, getattr(self.transform, "source_side", None))
        except Exception as e:
            return Skipped(position, f"{sample.get('__url__')}:{sample.get('__key__')}", f"{type(e).__name__}: {e}")
        rng = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, position))
        pixels, caption = self.transform(img, caption, rng)
        return {"index": position, "pixel_values": pixels, "caption": caption}


def read_pairs(urls: list[str], max_pixels: int | None = None) -> tuple[list[Image.Image], list[str], list[str]]:
    """All samples of (validation) shards in memory: images, captions and keys; bad samples are reported."""
    images, captions, keys, bad = [], [], [], []
    for sample in raw_samples(urls):
        try:
            img, caption = decode_sample(sample, max_pixels)
        except Exception as e:
            bad.append(str(e))
            continue
        images.append(img)
        captions.append(caption)
        keys.append(f"{sample['__url__']}:{sample['__key__']}")
    if bad:
        log.warning("%d bad sample(s) in the validation shards left out, e.g. %s", len(bad), bad[0])
    if not images:
        raise DataError(f"no usable samples in {urls[0]}{' ...' if len(urls) > 1 else ''}")
    return images, captions, keys


def write_shards(
    root: str | Path, split: str, out: str | Path, *, shard_size: int = 1000, overwrite: bool = False
) -> list[str]:
    """Write a CSV-layout split as shards ``<out>/<split>-000000.tar`` ... (one sample per CSV row).

    ``out`` follows the output rule (``outputs.claim_output``): a new or empty folder, or one that make-shards
    filled from the same data folder (other splits there are kept); never inside the data folder. The shards
    are written to a temporary folder first, then moved in; shards of an earlier, larger run of the same split
    are removed.
    """
    out, data_root = Path(out), Path(os.path.abspath(root))
    image_dir, csv_path = split_paths(root, split)
    claim_output(
        out, "shards", {"data": data_root}, overwrite=overwrite, overlap={"images": image_dir, "captions": csv_path}
    )
    table, problems = read_split(root, split)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise DataError(f"{len(fatal)} problem(s) in {table.csv_path}, e.g. {fatal[0]}; run validate-data first")
    if not len(table):
        raise DataError(f"{table.csv_path}: no rows to write")
    previous = (read_marker(out) or {}).get("splits", {}) if out.is_dir() else {}
    tmp = out / f".tmp-{split}"
    with storage_errors(out, f"shards in {out}"):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            names = _write_tars(table, str(tmp / f"{split}-%06d.tar"), shard_size)
            for name in names:
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in set(previous.get(split, [])) - set(names):  # only files an earlier make-shards wrote
            (out / stale).unlink(missing_ok=True)
        write_marker(out, "shards", {"data": data_root}, splits={**previous, split: names})
    return [str(out / name) for name in names]


def _write_tars(table: Any, pattern: str, shard_size: int) -> list[str]:
    with _wds().ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i in range(len(table)):
            path = table.path(i)
            ext = path.suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            if ext not in IMAGE_KEYS:  # store other formats as PNG so readers know what they get
                buf = io.BytesIO()
                to_rgb(Image.open(path)).save(buf, "PNG")
                ext, data = "png", buf.getvalue()
            else:
                data = path.read_bytes()
            sink.write({"__key__": f"{i:08d}", ext: data, "txt": table.captions[i].encode("utf-8")})
        written = sink.shard  # shards opened by this run
    return [Path(pattern % i).name for i in range(written)]
