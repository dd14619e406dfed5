"""WebDataset shards: written from the folder layout, trained on deterministically, resumed exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import micro_config
from safetensors.torch import load_file

import finderpartner.train as train_module
from finderpartner.cli import main
from finderpartner.config import config_from_dict
from finderpartner.data.shards import expand_shards, raw_samples


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
