"""The sample data set in the other layouts training reads (``sample-data --format hf|imagefolder|jsonl|parquet``).

The pairs are those of the folder layout (``sample.py``), in the same order, with the same image files: a run on
any of these copies sees the same batches as a run on the folder layout. Each is written through the output rule
(``outputs.claim_output`` / ``write_output``): a new or empty folder, or one sample-data wrote for these arguments.

* ``hf``: ``datasets.DatasetDict.save_to_disk``: splits ``train`` and ``validation``, columns ``image`` (the
  ``Image`` feature, the encoded files embedded) and ``caption`` (the list of an image's captions);
* ``imagefolder``: ``train/`` and ``validation/``, each with its images and a ``metadata.jsonl`` of ``file_name`` and
  ``caption`` (a list): ``datasets.load_dataset("imagefolder", data_dir=...)`` reads it too;
* ``jsonl`` / ``parquet``: ``images/<split>/`` and a manifest per split (``train.jsonl``, ``val.jsonl``), one
  ``{"image": <path relative to the manifest>, "caption": ...}`` row per pair.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..outputs import claim_output, write_output
from .rows import hf_datasets
from .sample import COMBOS, FORMAT_VERSION, SPLITS, make_sample_data

log = logging.getLogger(__name__)

LAYOUTS = ("folder", "hf", "imagefolder", "jsonl", "parquet")
HF_SPLIT = {"train": "train", "val": "validation"}  # the names datasets' own layouts use


def make_sample_layout(
    out: str | Path,
    layout: str,
    *,
    train_images: int = 4000,
    val_images: int = 300,
    image_size: int = 96,
    image_format: str = "jpg",
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write the sample data to ``out`` in ``layout``; counts per split. A finished set for the same arguments is
    reused."""
    out = Path(out)
    args = dict(train_images=train_images, val_images=val_images, image_size=image_size, image_format=image_format)
    meta = {"format_version": FORMAT_VERSION, "layout": layout, "seed": seed, **args}
    kind = f"sample-data-{layout}"
    if claim_output(out, kind, meta, overwrite=overwrite) == "same":  # its marker is written last: a finished set
        log.info("reusing sample data in %s", out)
        n = {"train": train_images, "val": val_images}
        return {s: {"images": n[s], "pairs": 2 * n[s], "distinct_captions": 2 * min(n[s], len(COMBOS))} for s in n}
    with tempfile.TemporaryDirectory(prefix="fp-sample-") as scratch:
        folder = make_sample_data(Path(scratch) / "folder", seed=seed, **args)  # type: ignore[arg-type]
        pairs = {s: _pairs(folder.root, s) for s in SPLITS}
        write_output(
            lambda tmp: WRITERS[layout](folder.root, pairs, tmp), out, kind, meta, what=f"sample data in {out}"
        )
        return folder.counts


def _pairs(root: Path, split: str) -> list[tuple[str, str]]:
    with open(root / f"captions_{split}.csv", encoding="utf-8", newline="") as f:
        return [(row[0], row[1]) for row in list(csv.reader(f))[1:]]


def _grouped(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Image -> its captions, images in first-seen order (the pair order is kept when expanded again)."""
    out: dict[str, list[str]] = {}
    for name, caption in pairs:
        out.setdefault(name, []).append(caption)
    return out


def _write_hf(root: Path, pairs: dict[str, list[tuple[str, str]]], tmp: Path) -> None:
    datasets = hf_datasets()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    splits = {}
    for split, rows in pairs.items():
        grouped = _grouped(rows)
        images = [{"bytes": (root / "images" / split / n).read_bytes(), "path": n} for n in grouped]
        splits[HF_SPLIT[split]] = datasets.Dataset.from_dict(
            {"image": images, "caption": list(grouped.values())}, features=features
        )
    datasets.DatasetDict(splits).save_to_disk(str(tmp))


def _write_imagefolder(root: Path, pairs: dict[str, list[tuple[str, str]]], tmp: Path) -> None:
    for split, rows in pairs.items():
        folder = tmp / HF_SPLIT[split]
        folder.mkdir(parents=True)
        lines = []
        for name, captions in _grouped(rows).items():
            (folder / name).write_bytes((root / "images" / split / name).read_bytes())
            lines.append(json.dumps({"file_name": name, "caption": captions}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _copy_images(root: Path, tmp: Path) -> None:
    for split in SPLITS:
        (tmp / "images" / split).mkdir(parents=True)
        for f in sorted((root / "images" / split).iterdir()):
            (tmp / "images" / split / f.name).write_bytes(f.read_bytes())


def _write_jsonl(root: Path, pairs: dict[str, list[tuple[str, str]]], tmp: Path) -> None:
    tmp.mkdir(parents=True)
    _copy_images(root, tmp)
    for split, rows in pairs.items():
        lines = [json.dumps({"image": f"images/{split}/{n}", "caption": c}) for n, c in rows]
        (tmp / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_parquet(root: Path, pairs: dict[str, list[tuple[str, str]]], tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp.mkdir(parents=True)
    _copy_images(root, tmp)
    for split, rows in pairs.items():
        table = pa.table({"image": [f"images/{split}/{n}" for n, _ in rows], "caption": [c for _, c in rows]})
        pq.write_table(table, tmp / f"{split}.parquet")


def _write_folder(root: Path, pairs: dict[str, list[tuple[str, str]]], tmp: Path) -> None:
    raise AssertionError("the folder layout is written by sample.make_sample_data")


WRITERS: dict[str, Callable[[Path, dict[str, list[tuple[str, str]]], Path], None]] = {
    "hf": _write_hf,
    "imagefolder": _write_imagefolder,
    "jsonl": _write_jsonl,
    "parquet": _write_parquet,
    "folder": _write_folder,
}
