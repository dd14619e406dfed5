"""A training process killed with SIGKILL at random points and resumed with --resume auto ends bitwise equal.

Kill points: mid-step (right after a metrics line appears, plus a random delay), during a checkpoint write
(as soon as a .tmp-step_* folder exists) and at start-up. The points tried are printed (pytest -s shows them).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import micro_config
from safetensors.torch import load_file

from finderpartner.config import config_from_dict
from finderpartner.train import train

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")


def _latest_step(run_dir: Path) -> int | None:
    steps = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
    return int(steps[-1].name.split("_")[1]) if steps else None


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def _writing(run_dir: Path, since: float) -> bool:
    """A checkpoint folder is being written by the current process (a stale one from an earlier kill is older)."""
    folder = run_dir / "checkpoints"
    try:
        return any(p.stat().st_mtime >= since for p in folder.glob(".tmp-step_*")) if folder.is_dir() else False
    except FileNotFoundError:  # renamed between glob and stat: the write just finished
        return False


def _kill_at(proc: subprocess.Popen, run_dir: Path, kind: str, rng: random.Random, started: float) -> str | None:
    """Wait for the moment of ``kind`` and SIGKILL; None when the run finished first."""
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    wanted = _lines(metrics) + rng.randint(1, 4)
    while proc.poll() is None and time.monotonic() < deadline:
        if kind == "startup":
            time.sleep(rng.uniform(0.5, 3.0))
        elif kind == "checkpoint_write":
            if not _writing(run_dir, started):
                time.sleep(0.0005)
                continue
        elif kind == "mid_step":
            if _lines(metrics) < wanted:
                time.sleep(0.005)
                continue
            time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is not None:
            break
        in_write = _writing(run_dir, started)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return f"{kind}{' (checkpoint folder half-written)' if in_write else ''}"
    proc.wait()
    return None


def test_sigkill_at_random_points_then_resume_auto_is_bitwise_identical(small_data: Path, tmp_path: Path) -> None:
    raw = micro_config(tmp_path, small_data, epochs=3, checkpoint_every=2, log_every=1)
    reference = train(config_from_dict({**raw, "experiment": "reference"}))

    raw["experiment"] = "killed"
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "outputs" / "killed"
    rng = random.Random(1234)
    plan = ["mid_step"] * 5 + ["checkpoint_write"] * 4 + ["startup"]
    rng.shuffle(plan)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    command = [sys.executable, "-m", "finderpartner.cli", "-q", "train", "--config", str(cfg_file), "--resume", "auto"]
    points: list[str] = []
    for kind in plan + [None] * 5:
        started = time.time() - 0.01
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = _latest_step(run_dir)
        if kind is None:  # no more kills: let it finish
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-2000:]
            break
        what = _kill_at(proc, run_dir, kind, rng, started)
        if what is None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            points.append(f"{kind}: run finished before the kill")
            break
        points.append(f"{what} after checkpoint {before}, newest complete checkpoint now {_latest_step(run_dir)}")
        proc.stderr.close()
    print("\nkill points tried:\n  " + "\n  ".join(points))
    kills = [p for p in points if "finished" not in p]
    assert len(kills) >= 10, points
    assert any("half-written" in p for p in kills), "no kill landed inside a checkpoint write"

    ours, theirs = _final_weights(run_dir), _final_weights(reference.run_dir)
    assert _latest_step(run_dir) == _latest_step(reference.run_dir) == 24
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
