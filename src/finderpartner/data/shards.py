"""WebDataset tar shards: the same image-caption pairs at scale (``<key>.jpg|png|jpeg|webp`` + ``<key>.txt``).

Training reads shards as a deterministic stream. The steps of an epoch are dealt to ``lanes`` (one per
DataLoader worker): step ``s`` is built by lane ``s % lanes`` from that lane's own shards, and each sample is
augmented with a seed fixed by its step and position. A resume at step ``s0`` replays each lane's stream up to
``s0`` without decoding images, and rotates lanes so that the DataLoader's round-robin yields step ``s0`` first:
resumes are exact as long as the worker count is the same. Each process reads its own share of the shards (its
local part of every global batch).

**Which samples an epoch sees.** Every epoch the shard list is shuffled (seed, epoch); process ``rank`` takes
``order[rank::world]`` and lane ``l`` of it ``mine[l::lanes]``. A lane reads its shards in *passes*: each pass
reads all of the lane's shards (in a seeded order) through a seeded shuffle buffer of at most ``shuffle_buffer``
samples that is drained, in seeded random order, at the end of the pass, before the next pass begins. A pass is
therefore a permutation of the lane's samples. So when every (process, lane) slot's shards hold exactly the
samples its steps consume (equal shards, ``train_size`` = all pairs, shards divisible by processes x workers,
steps divisible by workers), **every sample is seen exactly once per epoch**, in a new order each epoch.

When shards are uneven, that cannot hold: a slot whose shards hold fewer samples than its steps need starts its
next pass within the epoch (those samples repeat), and a slot holding more leaves its remainder unseen this
epoch (another epoch deals the shards differently). When the shard sizes are known (``sizes.json``, written by
``make-shards``) and the slots are unequal, this is logged once at the start of the epoch.

**Resampled shards** (``data.resampled``, open_clip's ``--dataset-resampled``): each pass of a lane draws its
shards with replacement from *all* training shards (seeded by seed, epoch, rank and lane), so any number of
shards feeds any number of processes and workers; samples repeat and some are missed by design. An epoch is
still ``data.train_size`` (or all) pairs, and the stream is as deterministic and resumable as the plain one.

``sizes.json`` beside the shards (``{"train-000000.tar": 1000, ...}``, open_clip's convention) gives the number
of pairs without reading the shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from ..outputs import claim_output, read_marker, write_output
from .collate import Batch, Collator
from .dataset import EncodedImage, Skipped, read_split, readable, sample_seed, split_paths
from .rows import validate_rows
from .transforms import DECODE_ERRORS, ImageTooLarge, load_image, to_rgb

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SIZES = "sizes.json"  # {"<shard file name>": samples}, beside the shards (open_clip's convention)


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


def sample_parts(sample: dict[str, Any]) -> tuple[str, bytes, str]:
    """``<shard>:<key>``, encoded image bytes and caption of a raw sample; ValueError naming the key when one is
    missing or the caption is empty."""
    key = f"{sample.get('__url__')}:{sample.get('__key__')}"
    image_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image_bytes is None or "txt" not in sample:
        raise ValueError(f"{key}: a sample needs an image (.jpg/.png/.webp) and a caption (.txt)")
    caption = sample["txt"].decode("utf-8").strip()
    if not caption:
        raise ValueError(f"{key}: empty caption")
    return key, image_bytes, caption


def decode_sample(
    sample: dict[str, Any], max_pixels: int | None, min_side: int | None = None
) -> tuple[Image.Image, str]:
    """PIL image and caption of a raw sample; raises ValueError naming the key when something is missing."""
    key, image_bytes, caption = sample_parts(sample)
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
        resampled: bool = False,
        sizes: dict[str, int] | None = None,
    ):
        if global_batch % world_size:
            raise ValueError(f"batch {global_batch} is not divisible by {world_size} processes")
        if len(urls) < world_size * lanes and not resampled:
            raise DataError(
                f"{len(urls)} shard(s) cannot feed {world_size} process(es) x {lanes} worker(s): each needs its own; "
                "write more, smaller shards, lower data.num_workers, or draw shards with replacement "
                "(data.resampled: true)"
            )
        self.urls, self.transform, self.collator = urls, transform, collator
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.lanes, self.rank, self.world_size = lanes, rank, world_size
        self.max_pixels, self.shuffle_buffer = max_pixels, shuffle_buffer
        self.resampled, self.sizes = resampled, sizes
        self.epoch = self.start_step = 0
        self._told: set[int] = set()  # epochs whose unequal slots were logged

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_rows // self.global_batch)

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step
        self._log_unequal_slots()

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step)

    def _rng(self, *key: int) -> random.Random:
        return random.Random(int(np.random.SeedSequence([self.seed, self.epoch, *key]).generate_state(1)[0]))

    def lane_shards(self, lane: int, rank: int | None = None) -> list[str]:
        """The shards lane ``lane`` of process ``rank`` (default: this one) reads this epoch (not resampled)."""
        order = list(self.urls)
        self._rng().shuffle(order)
        mine = order[(self.rank if rank is None else rank) :: self.world_size]
        return mine[lane :: self.lanes]

    def lane_steps(self, lane: int) -> list[int]:
        return list(range(lane, self.steps_per_epoch, self.lanes))

    def _passes(self, lane: int) -> Iterator[list[str]]:
        """The shards of each pass of a lane: its own shards in a seeded order, or (resampled) a seeded draw with
        replacement from all shards, as many as a lane would own."""
        rng = self._rng(self.rank, lane, 1)
        if self.resampled:
            per_pass = max(1, round(len(self.urls) / (self.world_size * self.lanes)))
            while True:
                yield rng.choices(self.urls, k=per_pass)
        shards = self.lane_shards(lane)
        while True:
            rng.shuffle(shards)
            yield list(shards)

    def _shuffled(self, lane: int) -> Iterator[dict[str, Any]]:
        """The lane's samples, pass after pass; each pass is shuffled within itself (a permutation of its samples)."""
        rng = self._rng(self.rank, lane)
        for shards in self._passes(lane):
            buffer: list[dict[str, Any]] = []
            produced = False
            for sample in raw_samples(shards):
                produced = True
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield _take(buffer, rng)
            if not produced:
                raise DataError(f"shards {shards} contain no samples")
            while buffer:  # drain before the next pass: no sample of this pass waits for the next one
                yield _take(buffer, rng)

    def _log_unequal_slots(self) -> None:
        """Log (rank 0, once per epoch) when the sizes say some (process, lane) slots hold more samples than
        others: an epoch then repeats some samples and misses others (see the module docstring)."""
        if self.sizes is None or self.resampled or self.rank or self.epoch in self._told:
            return
        if any(u not in self.sizes for u in self.urls):
            return
        held = [
            sum(self.sizes[u] for u in self.lane_shards(lane, rank))
            for rank in range(self.world_size)
            for lane in range(self.lanes)
        ]
        needed = [len(self.lane_steps(lane)) * self.local_batch for lane in range(self.lanes)]
        self._told.add(self.epoch)
        if len(set(held)) > 1:
            log.info(
                "epoch %d: the shards dealt to the %d process(es) x %d worker(s) hold %d to %d samples each, for "
                "%d to %d samples per epoch: some samples repeat and others wait for a later epoch (equal shards, "
                "as many as processes x workers divide, make every epoch see each sample once)",
                self.epoch,
                self.world_size,
                self.lanes,
                min(held),
                max(held),
                min(needed),
                max(needed),
            )

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if workers != self.lanes:
            raise DataError(f"shard stream built for {self.lanes} worker(s) but read by {workers}")
        lane = (worker + self.start_step) % self.lanes  # rotation: worker 0 makes step start_step
        stream = self._shuffled(lane)
        for step in self.lane_steps(lane):
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


def _take(buffer: list[Any], rng: random.Random) -> Any:
    """Remove and return a random element of ``buffer`` (swap with the last: O(1))."""
    i = rng.randrange(len(buffer))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


def read_pairs(urls: list[str], max_pixels: int | None = None) -> tuple[list[EncodedImage], list[str]]:
    """All samples of (validation) shards: encoded images (decoded only when embedded) and captions.

    Each image is decoded once here and its pixels dropped, so that a bad sample (not an image, over
    ``max_pixels``, truncated) is left out and reported with its shard and key before training starts, not found
    at the first validation; only the encoded bytes stay in memory.
    """
    images, captions, bad = [], [], []
    for sample in raw_samples(urls):
        try:
            key, image_bytes, caption = sample_parts(sample)
            try:
                load_image(io.BytesIO(image_bytes), max_pixels).close()
            except DECODE_ERRORS as e:
                raise ValueError(f"{key}: {type(e).__name__}: {e}") from None
        except ValueError as e:
            bad.append(str(e))
            continue
        images.append(EncodedImage(key, bytes(image_bytes)))
        captions.append(caption)
    if bad:
        log.warning("%d bad sample(s) in the validation shards left out, e.g. %s", len(bad), bad[0])
    if not images:
        raise DataError(f"no usable samples in {urls[0]}{' ...' if len(urls) > 1 else ''}")
    return images, captions


def read_sizes(folder: str | Path) -> dict[str, int] | None:
    """``<folder>/sizes.json`` (shard file name -> samples), None when there is none; DataError naming the file
    when it is damaged (not JSON, or not names mapped to non-negative whole numbers)."""
    path = Path(folder) / SIZES
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        sizes = json.loads(text)
    except ValueError as e:
        sizes, why = None, f"not JSON ({e})"
    else:
        why = 'expected {"<shard>.tar": <number of samples>, ...}'
    if not isinstance(sizes, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in sizes.items()
    ):
        raise DataError(
            f"{path} is damaged: {why}; run make-shards again, or delete it to have the shards counted by reading "
            "them (or set data.train_size)"
        )
    return sizes


def shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from the ``sizes.json`` beside each shard, or None unless every shard is listed."""
    known: dict[str, int] = {}
    folders: dict[Path, dict[str, int] | None] = {}
    for url in urls:
        if "://" in url:
            return None
        folder = Path(url).parent
        if folder not in folders:
            folders[folder] = read_sizes(folder)
        listed = folders[folder]
        if listed is None or Path(url).name not in listed:
            return None
        known[url] = listed[Path(url).name]
    return known


def write_shards(
    root: str | Path,
    split: str,
    out: str | Path,
    *,
    shard_size: int = 1000,
    overwrite: bool = False,
    rows: Any = None,
) -> list[str]:
    """Write a CSV-layout split as shards ``<out>/<split>-000000.tar`` ... (one sample per CSV row).

    ``out`` follows the output rule (``outputs.claim_output``): a new or empty folder, or one that make-shards
    filled from the same data folder (other splits there are kept); never inside the data folder. The shards
    and ``sizes.json`` (samples per shard, every split's) are staged, then moved in (``outputs.write_output``);
    shards of an earlier, larger run of the same split are removed, files a user added are not.
    """
    out, data_root = Path(out), Path(os.path.abspath(root))
    if rows is None:
        image_dir, csv_path = split_paths(root, split)
        overlap: dict[str, Any] = {"images": image_dir, "captions": csv_path}
    else:
        overlap = {"data": data_root}
    claim_output(out, "shards", {"data": data_root}, overwrite=overwrite, overlap=overlap)
    if rows is None:
        table, problems = read_split(root, split)
    else:  # another layout (rows.py): its split, every row and image checked
        report = validate_rows(rows, [split])[0]
        table, problems = report.table, list(report.problems)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise DataError(f"{len(fatal)} problem(s) in {table.name}, e.g. {fatal[0]}; run validate-data first")
    if not len(table):
        raise DataError(f"{table.name}: no rows to write")
    previous = (read_marker(out) or {}).get("splits", {}) if out.is_dir() else {}
    splits = dict(previous)  # the marker's shard names per split: this split's filled in by the write

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        counts = _write_tars(table, str(tmp / f"{split}-%06d.tar"), shard_size)
        splits[split] = list(counts)
        sizes = _merged_sizes(out, previous.get(split, []), counts)
        (tmp / SIZES).write_text(json.dumps(sizes, indent=1), encoding="utf-8")

    others = [name for s, files in previous.items() if s != split for name in files]  # other splits' shards stay
    write_output(write, out, "shards", {"data": data_root}, what=f"shards in {out}", keep=others, splits=splits)
    names = splits[split]
    return [str(out / name) for name in names]


def _merged_sizes(out: Path, replaced: list[str], counts: dict[str, int]) -> dict[str, int]:
    """The folder's sizes.json with this split's entries replaced (other splits' kept); a damaged one is rebuilt
    from this split alone (other splits are then counted by reading them, or listed by writing them again)."""
    try:
        sizes = read_sizes(out) or {}
    except DataError as e:
        log.warning("%s; writing it anew with this split only", e)
        sizes = {}
    kept = {k: v for k, v in sizes.items() if k not in set(replaced) | set(counts)}
    return dict(sorted({**kept, **counts}.items()))


def _write_tars(table: Any, pattern: str, shard_size: int) -> dict[str, int]:
    """Write the shards; the file name and number of samples of each, in order."""
    counts: dict[str, int] = {}
    with _wds().ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i in range(len(table)):
            source = table.source(i)  # a file, or encoded bytes (a dataset's Image column)
            if isinstance(source, EncodedImage):
                with Image.open(io.BytesIO(source.data)) as img:
                    ext = (img.format or "").lower()
            else:
                ext = source.suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            if ext not in IMAGE_KEYS:  # store other formats as PNG so readers know what they get
                buf = io.BytesIO()
                to_rgb(Image.open(readable(source))).save(buf, "PNG")
                ext, data = "png", buf.getvalue()
            else:
                data = source.data if isinstance(source, EncodedImage) else source.read_bytes()
            sink.write({"__key__": f"{i:08d}", ext: data, "txt": table.captions[i].encode("utf-8")})
            name = Path(pattern % (sink.shard - 1)).name  # the shard this sample went to (also split by bytes)
            counts[name] = counts.get(name, 0) + 1
    return counts
