"""sample-data, validate-data and make-shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import (
    DataError,
    UsageError,
)
from .common import add_trust_pickle, new_command


def add_sample_data_command(sub: Any) -> None:
    p = new_command(
        sub,
        "sample-data",
        "write the synthetic sample data set",
        description="""
Write a deterministic synthetic data set (coloured shapes, two captions per image) in the folder layout that
train, eval and validate-data read: images/<split>/ and captions_<split>.csv.""",
        examples="""
finderpartner sample-data --out data/sample
finderpartner sample-data --out data/small --train-images 200 --val-images 50 --image-size 64""",
    )
    p.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder (default: data/sample)")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--val-images", type=int, default=300)
    p.add_argument("--image-size", type=int, default=96, help="pixels per side")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace sample data made with other settings")
    p.set_defaults(handler=_sample_data)


def _sample_data(args: argparse.Namespace) -> int:
    from ..data.sample import make_sample_data

    summary = make_sample_data(
        args.out,
        train_images=args.train_images,
        val_images=args.val_images,
        image_size=args.image_size,
        image_format=args.format,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    for split, c in summary.counts.items():
        print(f"{split}: {c['images']} images, {c['pairs']} pairs, {c['distinct_captions']} distinct captions")
    print(f"sample data in {summary.root}")
    return 0


def add_validate_data_command(sub: Any) -> None:
    p = new_command(
        sub,
        "validate-data",
        "check a data folder and report every problem at once",
        description="""
Check a data folder (images/<split>/ and captions_<split>.csv) and list every problem at once, by file and
line: missing, empty, truncated or non-image files, bad CSV rows, empty captions, captions longer than the
model's context. Exits 1 when a split has a problem that stops training.""",
        examples="""
finderpartner validate-data --data data/sample
finderpartner validate-data --data data/mine --split train --model outputs/clip_tiny/best_model --json""",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with images/<split>/ and captions_<split>.csv")
    p.add_argument("--split", action="append", help="split(s) to check (default: every captions_*.csv)")
    p.add_argument("--model", help="count captions longer than this model's context (a saved model folder)")
    add_trust_pickle(p)
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="larger images count as decompression bombs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_validate_data)


def _validate_data(args: argparse.Namespace) -> int:
    import dataclasses

    from ..data.validate import retrieval_problem, validate_split

    if not args.data.exists():
        raise DataError(
            f"--data {args.data} does not exist; give the data folder (images/<split>/, captions_<split>.csv)"
        )
    if not args.data.is_dir():
        raise DataError(
            f"--data {args.data} is a file; give the data folder that holds images/<split>/ and "
            f"captions_<split>.csv (for this file: --data {args.data.parent})"
        )
    splits = args.split or sorted(p.stem.removeprefix("captions_") for p in args.data.glob("captions_*.csv"))
    if not splits:
        raise DataError(
            f"{args.data}: no captions_<split>.csv found; a data folder holds images/<split>/ and "
            "captions_<split>.csv (see README: Your data)"
        )
    tokenizer = context = None
    if args.model:
        from ..model import load_model

        encoder = load_model(args.model, trust_pickle=args.trust_pickle)
        tokenizer, context = encoder.tokenizer, encoder.context_length
    reports = [
        validate_split(
            args.data,
            s,
            max_pixels=args.max_pixels,
            tokenizer=tokenizer,
            context_length=context,
            progress=not args.json,
        )
        for s in splits
    ]
    # the split-level rule train and eval apply too (a split of one image cannot be evaluated)
    reports = [
        dataclasses.replace(r, problems=(*r.problems, p)) if (p := retrieval_problem(r)) and r.rows_total else r
        for r in reports
    ]
    if args.json:
        out = {
            r.split: {
                "usable_pairs": len(r.table),
                "rows": r.rows_total,
                "problems": [
                    {"file": p.file, "line": p.line, "kind": p.kind, "message": p.message, "fatal": p.fatal}
                    for p in r.problems
                ],
            }
            for r in reports
        }
        print(json.dumps(out, indent=2))
    else:
        for r in reports:
            print(r.describe(limit=None))
    return 1 if any(r.fatal for r in reports) else 0


def add_make_shards_command(sub: Any) -> None:
    p = new_command(
        sub,
        "make-shards",
        "write a split of the folder layout as WebDataset tar shards",
        description="""
Write one split of the folder layout as WebDataset tar shards (<key>.jpg|png + <key>.txt) and sizes.json,
for training with data.format: webdataset and data.train_shards.""",
        examples="""
finderpartner make-shards --data data/sample --split train --out shards
finderpartner make-shards --data data/mine --split val --out shards --shard-size 5000""",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with images/<split>/ and captions_<split>.csv")
    p.add_argument("--split", default="train")
    p.add_argument("--out", type=Path, required=True, help="shard folder (<split>-000000.tar, ...)")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard")
    p.add_argument("--overwrite", action="store_true", help="replace a shard folder made from another data folder")
    p.set_defaults(handler=_make_shards)


def _make_shards(args: argparse.Namespace) -> int:
    from ..data.shards import write_shards

    if args.shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1 (got {args.shard_size})")
    shards = write_shards(args.data, args.split, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    first, last = Path(shards[0]).name, Path(shards[-1]).name
    print(
        f"{len(shards)} shard(s) in {args.out}: use data.format: webdataset, data.train_shards: "
        f"{args.out}/{args.split}-{{{first[-10:-4]}..{last[-10:-4]}}}.tar"
    )
    return 0
