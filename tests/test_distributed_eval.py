"""Validation shared between processes: each embeds a contiguous share of the split, the shares are gathered,
and the metrics equal those of one process embedding everything.

Run as a script (by torchrun), this file is the worker of the two-process test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import MICRO_SPEC, end_worker, run_torchrun

import finderpartner.evaluate as evaluate
from finderpartner.config import TinySpec
from finderpartner.data.dataset import read_split
from finderpartner.data.sources import EvalSet
from finderpartner.embedding import embed_texts
from finderpartner.evaluate import evaluate_split, share
from finderpartner.model import DualEncoder, build_tiny

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

IMAGES = 23  # odd numbers of images and of captions: the shares of 2 processes are uneven


def _setup(small_data: Path) -> tuple[DualEncoder, EvalSet]:
    """The same model (seed 0) and an odd-sized validation split (23 images, 45 captions) in every process."""
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    val, _ = read_split(small_data, "val")
    full = EvalSet.from_table(val)
    rows = [i for i, image in enumerate(full.text_to_image) if image < IMAGES][:-1]
    part = EvalSet(
        full.name, full.images[:IMAGES], [full.captions[i] for i in rows], [full.text_to_image[i] for i in rows]
    )
    assert len(part.images) % 2 == 1 and len(part.captions) % 2 == 1
    return encoder, part


def _evaluate(encoder: DualEncoder, data: EvalSet, distributed: bool) -> dict[str, Any]:
    result = evaluate_split(
        encoder, data, device=torch.device("cpu"), batch_size=8, loss_batch_size=16, distributed=distributed
    )
    return result.summary()


def _close(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two summaries differ by more than 1e-6."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return [bad for k in a for bad in _close(a[k], b[k], f"{path}/{k}")]
    return [] if abs(a - b) <= 1e-6 else [f"{path}: {a} != {b}"]


def test_the_shares_partition_the_rows() -> None:
    for rows in (0, 1, 7, 45):
        for size in (1, 2, 3, 8):
            parts = [range(rows)[share(rows, rank, size)] for rank in range(size)]
            assert [i for part in parts for i in part] == list(range(rows))


def test_a_process_with_no_captions_embeds_none(small_data: Path) -> None:
    encoder, _ = _setup(small_data)
    assert embed_texts(encoder, []).shape == (0, encoder.embed_dim)


def test_two_gloo_processes_validate_as_one(small_data: Path, tmp_path: Path) -> None:
    encoder, data = _setup(small_data)
    one = _evaluate(encoder, data, distributed=False)
    out = tmp_path / "metrics.json"
    run = run_torchrun(__file__, str(small_data), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["rank_1"] == two["rank_0"]  # every process computed the same metrics (the best-model decision)
    assert not _close(two["rank_0"], one), _close(two["rank_0"], one)
    assert two["rank_0"]["num_images"] == IMAGES and two["rank_0"]["num_captions"] == len(data.captions)
    # each row embedded once, by one process: no duplicates, no padding rows
    assert two["embedded"] == [[11, 22], [12, 23]], two["embedded"]
    assert sum(images for images, _ in two["embedded"]) == len(data.images)
    assert sum(captions for _, captions in two["embedded"]) == len(data.captions)


def test_one_process_evaluates_the_same_distributed_or_not(small_data: Path) -> None:
    assert not dist.is_initialized()
    encoder, data = _setup(small_data)
    assert _evaluate(encoder, data, distributed=True) == _evaluate(encoder, data, distributed=False)


def _worker(small_data: Path, out: Path) -> None:
    """One of two processes: validate its share, count the rows it embedded; rank 0 writes what both got."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    embedded = [0, 0]
    embed_images, embed_texts_ = evaluate.embed_images, evaluate.embed_texts

    def count_images(encoder: DualEncoder, paths: list[Any], **kw: Any) -> Any:
        embedded[0] += len(paths)
        return embed_images(encoder, paths, **kw)

    def count_texts(encoder: DualEncoder, texts: list[str], **kw: Any) -> Any:
        embedded[1] += len(texts)
        return embed_texts_(encoder, texts, **kw)

    evaluate.embed_images, evaluate.embed_texts = count_images, count_texts
    encoder, data = _setup(small_data)
    summary = _evaluate(encoder, data, distributed=True)
    everyone: list[Any] = [None, None]
    dist.all_gather_object(everyone, (summary, embedded))
    if rank == 0:
        report = {"rank_0": everyone[0][0], "rank_1": everyone[1][0], "embedded": [e[1] for e in everyone]}
        out.write_text(json.dumps(report))
    dist.barrier()  # neither process tears the group down while the other still uses it (gloo aborts then)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
    end_worker()
