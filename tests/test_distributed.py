"""Two processes (torch.distributed on gloo, launched by torchrun) equal one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import micro_config, run_torchrun
from safetensors.torch import load_file

from finderpartner.config import config_from_dict
from finderpartner.train import train


def test_two_gloo_processes_match_one_process(small_data: Path, tmp_path: Path) -> None:
    raw = micro_config(tmp_path, small_data, epochs=1)
    one = train(config_from_dict({**raw, "experiment": "one"}))

    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(yaml.safe_dump({**raw, "experiment": "two"}))
    run = run_torchrun("-m", "finderpartner.cli", "-q", "train", "--config", str(cfg_file))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("best model:") == 1  # only the main process reports

    two_dir = tmp_path / "outputs" / "two"
    ours = load_file(sorted((two_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    theirs = load_file(sorted((one.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    # Not bitwise: the two halves of each gradient are summed across processes instead of inside one matmul.
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    print(f"\n2 gloo processes vs 1 process: max abs weight difference {worst:.2e}")
    assert worst <= 1e-5, worst
    losses_one = [line for line in (one.run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    losses_two = [line for line in (two_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert len(losses_one) == len(losses_two) == 4


def test_two_processes_agree_on_the_step_count_a_time_budget_decides(small_data: Path, tmp_path: Path) -> None:
    # Each process times its own steps; only the main process's decision counts (broadcast). Had they disagreed,
    # one would wait in an all-reduce for a step the other never takes, and torchrun would time out or fail.
    raw = micro_config(tmp_path, small_data, time_budget="20s", max_steps=400, warmup_steps=30)
    cfg_file = tmp_path / "budget.yaml"
    cfg_file.write_text(yaml.safe_dump({**raw, "experiment": "budget"}))
    run = run_torchrun("-m", "finderpartner.cli", "train", "--config", str(cfg_file))
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert log.count("steps planned at") == 1, log[-3000:]  # decided once, by the main process
    newest = sorted((tmp_path / "outputs" / "budget" / "checkpoints").glob("step_*"))[-1]
    state = json.loads((newest / "state.json").read_text())["trainer"]
    assert state["global_step"] == state["planned_steps"] == int(newest.name.split("_")[1]) >= 30
