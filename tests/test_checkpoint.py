"""Crash-safe checkpoints: atomic, verified, pruned, never unpickled; full disks and NaNs lose nothing."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import micro_config

import finderpartner.loss as loss_module
import finderpartner.train.checkpoint as ckpt_module
from finderpartner.config import config_from_dict
from finderpartner.errors import CheckpointError, StorageError, TrainingError
from finderpartner.train import train
from finderpartner.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, verify

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


def _save(folder: Path, step: int, keep: int = 10, value: float = 1.0) -> Path:
    return save_checkpoint(
        folder,
        step,
        model={"w": torch.full((4, 4), value), "b": torch.zeros(4)},
        optimizer={
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        rng={"cpu": torch.get_rng_state()},
        state={"trainer": {"global_step": step}},
        keep=keep,
    )


def test_checkpoint_round_trip_with_manifest(tmp_path: Path) -> None:
    path = _save(tmp_path, 5)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"}
    assert all(v["size"] > 0 and len(v["sha256"]) == 64 for v in manifest["files"].values())
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.model["w"], torch.ones(4, 4)) and loaded.state["trainer"]["global_step"] == 5
    assert loaded.optimizer["param_groups"][0]["lr"] == 0.1


def test_keeps_the_last_k(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]
    (tmp_path / "step_000004" / "manifest.json").unlink()  # damaged: does not count towards the K kept
    _save(tmp_path, 5, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004", "step_000005"]


def test_resume_auto_skips_incomplete_and_corrupt_checkpoints(tmp_path: Path, caplog) -> None:
    good = _save(tmp_path, 1)
    corrupt = _save(tmp_path, 2)
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    incomplete = _save(tmp_path, 3)
    (incomplete / "manifest.json").unlink()  # killed before the manifest was written
    truncated = _save(tmp_path, 4)
    with open(truncated / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    (tmp_path / ".tmp-step_000005").mkdir()  # a write in progress when the process died
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == good
    assert "does not match its checksum" in verify(corrupt)
    assert verify(incomplete) == "no manifest (the write did not finish)"
    assert "optimizer.pt has 10 bytes" in verify(truncated)
    assert "skipping checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="unusable"):
        load_checkpoint(corrupt)


def test_a_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump(Payload(), f)
    manifest = json.loads((path / "manifest.json").read_text())  # make the manifest agree, as an attacker would
    manifest["files"]["optimizer.pt"] = ckpt_module._describe(path / "optimizer.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)
    assert not marker.exists()


def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    previous = _save(tmp_path, 1)
    real = ckpt_module.save_file

    def fills_the_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partial file, as a real ENOSPC leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module, "save_file", fills_the_disk)
    with pytest.raises(
        StorageError, match=r"disk full while writing checkpoint .*step_000002: .* free of .*step_000001 is intact"
    ):
        _save(tmp_path, 2)
    monkeypatch.setattr(ckpt_module, "save_file", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    assert verify(previous) is None and latest_checkpoint(tmp_path) == previous


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="non-finite weights"):
        _save(tmp_path, 1, value=float("nan"))
    assert not any(tmp_path.iterdir())


def test_nan_steps_are_skipped_counted_and_stop_after_k(small_data: Path, tmp_path: Path, monkeypatch) -> None:
    real = loss_module.clip_loss
    calls = {"n": 0}

    def nan_on_steps_3_and_4(image, text, scale):
        calls["n"] += 1
        loss = real(image, text, scale)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(loss_module, "clip_loss", nan_on_steps_3_and_4)
    result = train(config_from_dict(micro_config(tmp_path / "a", small_data, max_nonfinite_steps=3)))
    assert result.state.nonfinite_steps == 2 and result.state.global_step == 16
    weights = load_checkpoint(latest_checkpoint(result.run_dir / "checkpoints")).model
    assert all(torch.isfinite(t).all() for t in weights.values())

    monkeypatch.setattr(loss_module, "clip_loss", lambda image, text, scale: real(image, text, scale) * float("nan"))
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss"):
        train(config_from_dict(micro_config(tmp_path / "b", small_data, max_nonfinite_steps=3)))
