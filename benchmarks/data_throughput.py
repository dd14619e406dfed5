"""Data-path throughput: images/s of our training data path per DataLoader worker count, against decoding alone.

Pipelines, each through a DataLoader with batches of ``--batch`` and 0/1/2 workers:

* ``decode``        PIL open + load + convert("RGB"): the data-side limit (no resize, no augmentation)
* ``ours``          PairDataset + TrainTransform (random resized crop, flip, jitter) + Collator (tokenise, stack)
* ``ours+cache``    the same, reading images from the pre-resized decoded cache (``data.cache_images``)
* ``open_clip``     open_clip's CsvDataset + its train transform + its HF tokenizer wrapper (float tensors out)
* ``hf``            ``ours`` on the same pairs read from a ``save_to_disk`` copy (images in the Arrow file)
* ``imagefolder``   ``ours`` on an imagefolder copy (metadata.jsonl), ``jsonl`` on a JSONL manifest copy
* ``hf-stream``     the streamed source (``data.streaming``) on the Parquet files of the ``save_to_disk`` copy

at the tiny model's 64 px (from 96 px JPEGs, the sample data's default) and at 224 px (from 256 px JPEGs).
The first batch of every loader (worker start-up) is not timed. Pipelines alternate; medians of ``--repeats``.

    python benchmarks/data_throughput.py                   # quick
    python benchmarks/data_throughput.py --batches 40 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

# (model input size, JPEG size of the generated data)
SIZES = {64: 96, 224: 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224], choices=sorted(SIZES), help="model input sizes")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per measurement (after one untimed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--pipelines",
        nargs="+",
        default=["decode", "ours", "ours+cache", "open_clip", "hf", "imagefolder", "jsonl", "hf-stream"],
        choices=["decode", "ours", "ours+cache", "open_clip", "hf", "imagefolder", "jsonl", "hf-stream"],
    )
    p.add_argument("--train-images", type=int, default=1280, help="images in the generated data sets")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default benchmarks/results/data_throughput.json)"
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Datasets


class DecodeOnly:
    """open + load + RGB convert of each file; returns the size so that nothing else is measured."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, int]:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            img.load()
            return img.convert("RGB").size


def _decode_loader(ctx: dict[str, Any], workers: int, batch: int) -> Any:
    from torch.utils.data import DataLoader

    paths = [ctx["table"].path(i) for i in range(len(ctx["table"]))]
    return DataLoader(DecodeOnly(paths), batch_size=batch, shuffle=True, num_workers=workers, collate_fn=list)


def _ours_loader(ctx: dict[str, Any], workers: int, batch: int, cached: bool = False, table: str = "table") -> Any:
    """Our loader as ``data.sources.FolderData.batches`` builds it (persistent workers and prefetch aside), on the
    folder layout's table or (``table``) another layout's."""
    from torch.utils.data import DataLoader

    from finderpartner.data.collate import Collator
    from finderpartner.data.dataset import ContrastiveBatchSampler, PairDataset

    dataset = PairDataset(ctx[table], ctx["transform"], decoded=ctx["cache"] if cached else None)
    sampler = ContrastiveBatchSampler(len(ctx[table]), batch, seed=0)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=Collator(ctx["tokenize"]),
        prefetch_factor=4 if workers else None,
    )


def _stream_loader(ctx: dict[str, Any], workers: int, batch: int) -> Any:
    """The streamed source as ``data.sources.StreamData.batches`` builds it."""
    from torch.utils.data import DataLoader

    from finderpartner.data.collate import Collator
    from finderpartner.data.rows import RowSpec
    from finderpartner.data.stream import Columns, RowStream, open_streams, prepared

    spec = RowSpec("hf", ctx["parquet"], streaming=True)
    streams, base, counts = open_streams(spec)
    columns = Columns.of(streams["train"], spec, "train")
    stream = RowStream(
        prepared(streams["train"], columns),
        ctx["transform"],
        Collator(ctx["tokenize"]),
        columns=columns,
        base=base,
        name="train",
        num_rows=counts["train"],
        global_batch=batch,
        seed=0,
        lanes=max(1, workers),
    )
    return DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)


def _layouts(root: Path, tmp: Path, train_images: int, image_size: int, pipelines: list[str]) -> dict[str, Any]:
    """The same sample pairs in the other layouts (made from the same seed), read as their tables."""
    from finderpartner.data.rows import RowSpec, open_tables
    from finderpartner.data.sample_layouts import make_sample_layout

    out: dict[str, Any] = {}
    wanted = {"hf": "hf", "hf-stream": "hf", "imagefolder": "imagefolder", "jsonl": "jsonl"}
    for layout in sorted({wanted[p] for p in pipelines if p in wanted}):
        folder = tmp / f"sample_{layout}"
        make_sample_layout(folder, layout, train_images=train_images, val_images=16, image_size=image_size)
        if layout != "hf" or "hf" in pipelines:
            out[f"table:{layout}"] = open_tables(RowSpec(layout, folder), "train", "", "raise")[0]
        if layout == "hf" and "hf-stream" in pipelines:
            import datasets

            (tmp / "parquet").mkdir()
            datasets.load_from_disk(str(folder))["train"].to_parquet(str(tmp / "parquet" / "train-00000.parquet"))
            out["parquet"] = tmp / "parquet"
    return out


def _open_clip_loader(ctx: dict[str, Any], workers: int, batch: int) -> Any:
    from open_clip_train.data import CsvDataset
    from torch.utils.data import DataLoader

    dataset = CsvDataset(
        str(ctx["csv"]), ctx["oc_transform"], "filepath", "title", sep="\t", tokenizer=ctx["oc_tokenizer"]
    )
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def images_per_s(make_loader: Callable[[], Any], batches: int) -> float:
    """Images/s over ``batches`` batches after the first one (worker start-up and first fetches excluded)."""
    loader = make_loader()
    it = iter(loader)
    first = next(it)
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += _batch_len(b)
    seconds = time.perf_counter() - start
    del it, loader, first
    gc.collect()  # let the workers of this loader exit before the next measurement starts
    time.sleep(0.2)
    return n / seconds if seconds > 0 else float("nan")


def _batch_len(b: Any) -> int:
    if isinstance(b, (tuple, list)) and b and hasattr(b[0], "shape"):  # open_clip: [images, texts]
        return int(b[0].shape[0])
    return len(b)  # our Batch, or the decode-only list of sizes


def prepare(size: int, train_images: int, batch: int, batches: int, pipelines: list[str]) -> dict[str, Any]:
    """Data (JPEG), our transform and tokenizer, open_clip's transform/tokenizer, the decoded cache."""
    import tempfile

    import open_clip

    from finderpartner.config import AugmentConfig
    from finderpartner.data.dataset import read_split
    from finderpartner.data.transforms import TrainTransform

    root = common.sample_data(None, image_size=SIZES[size], train_images=train_images, val_images=16)
    table, _ = read_split(root, "train")
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-data-"))
    spec = common.tiny_spec(size)
    tokenizer = common.caption_tokenizer(root, tmp / "tokenizer")
    aug = AugmentConfig(
        crop_scale=(0.9, 1.0)
    )  # configs/clip_tiny.yaml's augmentation (flip and jitter 0.1 are defaults)
    from finderpartner.model import build_tiny

    encoder = build_tiny(spec, [], tokenizer=tokenizer)
    transform = TrainTransform(encoder.image_spec, tuple(aug.crop_scale), aug.hflip, aug.color_jitter)
    ctx: dict[str, Any] = {
        "root": root,
        "table": table,
        "tokenize": encoder.text_tokenizer(),
        "transform": transform,
        "tmp": tmp,
    }
    if "ours+cache" in pipelines:
        from finderpartner.data.dataset import DecodedImages

        start = time.perf_counter()
        cache = DecodedImages(table, transform.source_side)
        ctx["cache"] = cache
        ctx["cache_stats"] = {
            "images": len(cache),
            "side": cache.side,
            "seconds": time.perf_counter() - start,
            "megabytes": cache.nbytes / 2**20,
        }
    ctx.update(_layouts(root, tmp, train_images, SIZES[size], pipelines))
    if "open_clip" in pipelines:
        model_dir = common.open_clip_model_dir(spec, tokenizer, tmp / "open_clip_model")
        ctx["csv"] = common.write_open_clip_csv(root, "train", tmp / "train.tsv")
        ctx["oc_tokenizer"] = open_clip.get_tokenizer(f"local-dir:{model_dir}")
        ctx["oc_transform"] = open_clip.image_transform(
            size,
            is_train=True,
            mean=common.OPENAI_MEAN,
            std=common.OPENAI_STD,
            aug_cfg={"scale": (0.9, 1.0), "color_jitter": (0.1, 0.1, 0.1, 0.0), "color_jitter_prob": 1.0},
        )
    return ctx


def loaders(ctx: dict[str, Any]) -> dict[str, Callable[[int, int], Any]]:
    return {
        "decode": lambda w, b: _decode_loader(ctx, w, b),
        "ours": lambda w, b: _ours_loader(ctx, w, b),
        "ours+cache": lambda w, b: _ours_loader(ctx, w, b, cached=True),
        "open_clip": lambda w, b: _open_clip_loader(ctx, w, b),
        "hf": lambda w, b: _ours_loader(ctx, w, b, table="table:hf"),
        "imagefolder": lambda w, b: _ours_loader(ctx, w, b, table="table:imagefolder"),
        "jsonl": lambda w, b: _ours_loader(ctx, w, b, table="table:jsonl"),
        "hf-stream": lambda w, b: _stream_loader(ctx, w, b),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in args.sizes:
        ctx = prepare(size, args.train_images, args.batch, args.batches, args.pipelines)
        make = loaders(ctx)
        runs: dict[str, dict[int, list[float]]] = {p: {w: [] for w in args.workers} for p in args.pipelines}
        for rep in range(args.repeats):
            order = args.pipelines if rep % 2 == 0 else args.pipelines[::-1]
            for workers in args.workers:
                for name in order:
                    loader = functools.partial(make[name], workers, args.batch)
                    runs[name][workers].append(images_per_s(loader, args.batches))
            print(f"  {size} px, repeat {rep + 1}/{args.repeats} done", flush=True)
        results[str(size)] = {
            "jpeg_size": SIZES[size],
            "runs": runs,
            "median": {p: {w: common.spread(v) for w, v in ws.items()} for p, ws in runs.items()},
            "cache": ctx.get("cache_stats"),
        }
        import shutil

        shutil.rmtree(ctx["tmp"], ignore_errors=True)
    return results


def report(results: dict[str, Any], workers: list[int], pipelines: list[str]) -> str:
    lines = []
    for size, res in results.items():
        med = res["median"]
        rows = []
        for name in pipelines:
            row: list[Any] = [name]
            for w in workers:
                s = med[name][w]
                row.append(f"{s['median']:,.0f} ±{100 * s['rel_range'] / 2:.0f}%")
            if "decode" in med and name != "decode":
                row.append(" ".join(f"{med[name][w]['median'] / med['decode'][w]['median']:.2f}" for w in workers))
            else:
                row.append("")
            rows.append(row)
        lines.append(f"{size} px model input from {res['jpeg_size']} px JPEGs: images/s (median, ± half the range)")
        lines.append(common.table(["pipeline", *(f"{w} workers" for w in workers), "x decode-only"], rows))
        if res.get("cache"):
            c = res["cache"]
            lines.append(
                f"decoded cache: {c['images']} images at {c['side']} px built in {c['seconds']:.1f}s "
                f"({c['megabytes']:.0f} MB)"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(common.machine_line(), flush=True)
    import torch

    # The parent process is the main process of a trainer: it keeps its default thread count; workers use 1.
    print(
        f"torch threads {torch.get_num_threads()}; batch {args.batch}; {args.batches} timed batches; "
        f"{args.repeats} repeats",
        flush=True,
    )
    results = measure(args)
    print("\n" + report(results, args.workers, args.pipelines))
    common.save_results("data_throughput", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
