"""WebDataset shards: written from the folder layout, trained on deterministically, resumed exactly."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import MICRO_SPEC, micro_config, run_torchrun
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import finderpartner.data.sources as sources
import finderpartner.train.recipe as train_module
from finderpartner.cli import main
from finderpartner.config import TinySpec, config_from_dict
from finderpartner.data.dataset import EncodedImage, Skipped
from finderpartner.data.shards import ShardStream, expand_shards, raw_samples
from finderpartner.data.sources import EvalSet, ShardData
from finderpartner.data.transforms import load_image
from finderpartner.errors import ConfigError, DataError
from finderpartner.evaluate import evaluate_split
from finderpartner.model import build_tiny

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


@pytest.fixture(scope="module")
def shards(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert (
        main(
            [
                "-q",
                "make-shards",
                "--data",
                str(small_data),
                "--split",
                "train",
                "--out",
                str(out),
                "--shard-size",
                "40",
            ]
        )
        == 0
    )
    assert (
        main(
            ["-q", "make-shards", "--data", str(small_data), "--split", "val", "--out", str(out), "--shard-size", "100"]
        )
        == 0
    )
    return out


def _config(tmp: Path, shards: Path, workers: int = 0, **train) -> dict:
    raw = micro_config(tmp, shards, **train)
    raw["data"] = {
        "format": "webdataset",
        "train_shards": str(shards / "train-{000000..000003}.tar"),
        "val_shards": str(shards / "val-000000.tar"),
        "num_workers": workers,
    }
    return raw


def test_shards_hold_every_pair(shards: Path, small_data: Path) -> None:
    urls = expand_shards(str(shards / "train-{000000..000003}.tar"))
    samples = list(raw_samples(urls))
    assert len(urls) == 4 and len(samples) == 128
    captions = (small_data / "captions_train.csv").read_text().splitlines()[1:]
    assert sorted(s["txt"].decode() for s in samples) == sorted(c.split(",", 1)[1].strip('"') for c in captions)


def test_missing_shards_are_named(tmp_path: Path) -> None:
    from finderpartner.errors import DataError

    with pytest.raises(DataError, match=r"2 of 2 shard\(s\) of .* not found"):
        expand_shards(str(tmp_path / "x-{0..1}.tar"))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_shards_resumes_exactly(shards: Path, tmp_path: Path, monkeypatch, workers: int) -> None:
    reference = train_module.train(config_from_dict(_config(tmp_path / "a", shards, workers)))
    assert reference.state.global_step == 16 and reference.final is not None and reference.final.num_images == 48

    real_step, calls = train_module._train_step, {"n": 0}

    def crash_after_eleven(run, batch, window):
        calls["n"] += 1
        if calls["n"] > 11:
            raise KeyboardInterrupt
        real_step(run, batch, window)

    monkeypatch.setattr(train_module, "_train_step", crash_after_eleven)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config_from_dict(_config(tmp_path / "b", shards, workers)))
    monkeypatch.setattr(train_module, "_train_step", real_step)
    resumed = train_module.train(config_from_dict(_config(tmp_path / "b", shards, workers)), resume="auto")
    ours = load_file(sorted((resumed.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    theirs = load_file(sorted((reference.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


# ---------------------------------------------------------------------------------------------------------------
# Which samples an epoch sees


def _png(size: int = 4, colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """8 shards of 8 samples each, captioned 'sample 00' ... 'sample 63'."""
    import webdataset as wds

    out = tmp_path_factory.mktemp("even")
    with wds.ShardWriter(str(out / "even-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(64):
            sink.write({"__key__": f"{i:04d}", "png": _png(), "txt": f"sample {i:02d}".encode()})
    return sorted(str(p) for p in out.glob("*.tar"))


def _keep_caption(img: Image.Image, caption: str, rng: torch.Generator) -> tuple[torch.Tensor, str]:
    return torch.zeros(1), caption  # a transform whose output names the sample


def _captions(items: list) -> list[str]:
    assert not any(isinstance(i, Skipped) for i in items)
    return [i["caption"] for i in items]  # a collator: the batch's samples, in order


def _batches(urls: list[str], rank: int, epoch: int, start: int = 0, **options) -> list[list[str]]:
    """This rank's batches of an epoch (from ``start``), through a real DataLoader with 2 worker processes."""
    options = {"num_rows": 64, "global_batch": 16, "seed": 3, "lanes": 2, "world_size": 2, **options}
    stream = ShardStream(urls, _keep_caption, _captions, rank=rank, **options)
    stream.set_position(epoch, start)
    return list(DataLoader(stream, batch_size=None, num_workers=2))


def test_2_ranks_x_2_workers_see_every_sample_once_per_epoch(even_shards: list[str]) -> None:
    every = sorted(f"sample {i:02d}" for i in range(64))
    orders = []
    for epoch in (0, 1):
        ranks = [_batches(even_shards, rank, epoch) for rank in (0, 1)]
        assert all(len(batches) == 4 and all(len(b) == 8 for b in batches) for batches in ranks)
        seen = [c for batches in ranks for batch in batches for c in batch]
        assert sorted(seen) == every  # each sample exactly once, over both ranks
        orders.append([c for step in zip(*ranks) for part in step for c in part])  # global batches in step order
        for rank, batches in enumerate(ranks):  # a resume at step 1 replays exactly the remaining batches
            assert _batches(even_shards, rank, epoch, start=1) == batches[1:]
    assert orders[0] != orders[1]


def test_uneven_slots_are_logged_at_the_start_of_an_epoch(even_shards: list[str], caplog) -> None:
    sizes = {u: 8 for u in even_shards}
    options = {"num_rows": 64, "global_batch": 16, "seed": 3, "lanes": 2, "world_size": 2}
    with caplog.at_level(logging.INFO, logger="finderpartner.data.shards"):
        ShardStream(even_shards, _keep_caption, _captions, sizes=sizes, **options).set_position(0)
        assert "some samples repeat" not in caplog.text
        sizes[even_shards[0]] = 3
        ShardStream(even_shards, _keep_caption, _captions, sizes=sizes, **options).set_position(0)
    assert caplog.text.count("some samples repeat") == 1 and "hold 11 to 16 samples each" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# sizes.json


def test_make_shards_writes_sizes_merged_across_splits(shards: Path, small_data: Path, tmp_path: Path) -> None:
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sizes == {
        "train-000000.tar": 40,
        "train-000001.tar": 40,
        "train-000002.tar": 40,
        "train-000003.tar": 8,
        "val-000000.tar": 48,
    }
    again = tmp_path / "again"
    shutil.copytree(shards, again)  # its marker says: made from small_data, so make-shards may write there again
    assert main(["-q", "make-shards", "--data", str(small_data), "--split", "train", "--out", str(again)]) == 0
    assert json.loads((again / "sizes.json").read_text()) == {"train-000000.tar": 128, "val-000000.tar": 48}
    assert not (again / "train-000001.tar").exists() and not list(again.glob(".tmp-*"))


def test_shard_data_counts_from_sizes_json_without_reading_shards(shards: Path, tmp_path: Path, monkeypatch) -> None:
    reads: list[list[str]] = []

    def spy(urls: list[str]):  # observes which shards ShardData reads in full
        reads.append(list(urls))
        return raw_samples(urls)

    monkeypatch.setattr(sources, "raw_samples", spy)
    cfg = config_from_dict(_config(tmp_path, shards))
    data = ShardData.open(cfg.data, need_captions=False)
    assert data.num_rows == 128 and data.captions == [] and reads == []
    data = ShardData.open(cfg.data, need_captions=True)  # the tiny tokenizer needs the captions: one read
    assert data.num_rows == 128 and len(data.captions) == 128 and len(reads) == 1

    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    (bare / "sizes.json").unlink()
    reads.clear()
    data = ShardData.open(config_from_dict(_config(tmp_path, bare)).data, need_captions=False)
    assert data.num_rows == 128 and data.captions == [] and len(reads) == 1  # no sizes: counted by reading

    (bare / "sizes.json").write_text('{"train-000000.tar": 40, "train-0000')
    with pytest.raises(DataError, match=rf"{bare / 'sizes.json'} is damaged: not JSON"):
        ShardData.open(config_from_dict(_config(tmp_path, bare)).data, need_captions=False)
    (bare / "sizes.json").write_text('{"train-000000.tar": "forty"}')
    with pytest.raises(DataError, match=r"is damaged: expected .*delete it to have the shards counted"):
        ShardData.open(config_from_dict(_config(tmp_path, bare)).data, need_captions=False)


# ---------------------------------------------------------------------------------------------------------------
# Resampled shards


def test_resampled_feeds_more_workers_than_shards_deterministically(even_shards: list[str]) -> None:
    two = even_shards[:2]  # 2 shards, 2 processes x 2 workers
    with pytest.raises(DataError, match="each needs its own.*data.resampled"):
        ShardStream(two, _keep_caption, _captions, num_rows=48, global_batch=16, seed=3, lanes=2, world_size=2)
    ranks = [_batches(two, rank, 0, num_rows=48, resampled=True) for rank in (0, 1)]
    assert ranks == [_batches(two, rank, 0, num_rows=48, resampled=True) for rank in (0, 1)]
    seen = [c for batches in ranks for batch in batches for c in batch]
    assert len(seen) == 48 and set(seen) <= {f"sample {i:02d}" for i in range(16)}  # an epoch = train_size pairs
    assert _batches(two, 1, 0, start=1, num_rows=48, resampled=True) == ranks[1][1:]
    assert _batches(two, 1, 1, num_rows=48, resampled=True) != ranks[1]


def test_training_resampled_on_fewer_shards_than_workers(shards: Path, tmp_path: Path) -> None:
    raw = _config(tmp_path, shards, workers=2)
    raw["data"].update(train_shards=str(shards / "train-000000.tar"), train_size=64, resampled=True)
    result = train_module.train(config_from_dict(raw))
    assert result.state.global_step == 8  # 2 epochs of 64 pairs in batches of 16


def test_resampled_needs_shards() -> None:
    with pytest.raises(ConfigError, match="data.resampled .* needs data.format 'webdataset'"):
        config_from_dict({"data": {"resampled": True}})


# ---------------------------------------------------------------------------------------------------------------
# Validation shards


def test_validation_shards_stay_encoded_and_evaluate_the_same(shards: Path, small_data: Path) -> None:
    val = EvalSet.from_shards([str(shards / "val-000000.tar")])
    assert len(val.images) == 48 and all(isinstance(i, EncodedImage) for i in val.images)
    assert str(val.images[0]) == f"{shards / 'val-000000.tar'}:00000000"
    decoded = EvalSet(val.name, [load_image(io.BytesIO(i.data)) for i in val.images], val.captions, val.text_to_image)
    encoder = build_tiny(TinySpec(**MICRO_SPEC), val.captions, seed=1)
    ours, theirs = (evaluate_split(encoder, s, device=torch.device("cpu")) for s in (val, decoded))
    assert ours.metrics == theirs.metrics and ours.loss == theirs.loss


def test_bad_validation_samples_are_named_by_shard_and_key(tmp_path: Path, caplog) -> None:
    import webdataset as wds

    url = str(tmp_path / "val-000000.tar")
    colours = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    with wds.TarWriter(url) as sink:
        for i, colour in enumerate(colours):
            sink.write({"__key__": f"good{i}", "png": _png(16, colour), "txt": f"colour {i}".encode()})
        sink.write({"__key__": "notimage", "png": b"hello", "txt": b"text"})
        sink.write({"__key__": "truncated", "png": _png(16)[:60], "txt": b"cut"})
    with caplog.at_level(logging.WARNING):
        val = EvalSet.from_shards([url])
    # Both are left out when the shards are read (before training starts), not at the first validation.
    assert len(val.images) == 3 and "2 bad sample(s) in the validation shards left out" in caplog.text
    assert f"{url}:notimage" in caplog.text
    encoder = build_tiny(TinySpec(**MICRO_SPEC), val.captions, seed=1)
    assert evaluate_split(encoder, val, device=torch.device("cpu")).num_images == 3


_READ_ON_RANK_0 = """
import json, os, sys
import torch.distributed as dist
import finderpartner.data.sources as sources
from finderpartner.config import config_from_dict
from finderpartner.data.shards import raw_samples

dist.init_process_group("gloo")
reads = []
sources.raw_samples = lambda urls: reads.append(len(urls)) or raw_samples(urls)  # observes the full reads
data = sources.ShardData.open(config_from_dict(json.loads(sys.argv[1])).data, need_captions=True)
record = {"rank": dist.get_rank(), "reads": reads, "rows": data.num_rows, "captions": data.captions}
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as f:  # one file each: stdout lines would interleave
    json.dump(record, f)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # gloo can abort the teardown past this point (tests/helpers.end_worker)
"""


def test_only_rank_0_reads_the_shards_and_broadcasts(shards: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    (bare / "sizes.json").unlink()  # nothing known: the pairs are counted and the captions read, once
    script = tmp_path / "read.py"
    script.write_text(_READ_ON_RANK_0)
    run = run_torchrun(str(script), json.dumps(_config(tmp_path, bare)), str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["reads"] for r in ranks] == [[4], []]
    assert ranks[0]["rows"] == ranks[1]["rows"] == 128 and ranks[0]["captions"] == ranks[1]["captions"]
    assert len(ranks[1]["captions"]) == 128
