"""train.time_budget: the step count is decided once from measured throughput, kept across a resume, exact."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import micro_config
from safetensors.torch import load_file

import finderpartner.train.recipe as train_module
from finderpartner.config import config_from_dict
from finderpartner.train import train
from finderpartner.train.budget import MEASURE_STEPS, SKIP_STEPS, steps_that_fit

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

WARMUP = SKIP_STEPS + MEASURE_STEPS + 3  # the budget run's warm-up is not lengthened: both runs share it


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")


def _lrs(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/lr"] for r in lines if "train/lr" in r}


def test_killed_and_resumed_budget_run_equals_an_uninterrupted_run_of_the_decided_length(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # 8 steps per epoch; the budget fits dozens to hundreds of steps of the micro model, more than the kill point.
    budget = micro_config(
        tmp_path / "budget", small_data, time_budget="15s", max_steps=1000, warmup_steps=WARMUP, checkpoint_every=5
    )
    real_step = train_module._train_step
    calls = {"n": 0}
    kill_at = SKIP_STEPS + MEASURE_STEPS + 7  # after the decision and the checkpoint at step 30

    def crash(run, batch, window):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > kill_at:
            raise KeyboardInterrupt
        real_step(run, batch, window)

    monkeypatch.setattr(train_module, "_train_step", crash)
    with caplog.at_level(logging.INFO, logger="finderpartner"), pytest.raises(KeyboardInterrupt):
        train(config_from_dict(budget))
    monkeypatch.setattr(train_module, "_train_step", real_step)
    decided = [r.getMessage() for r in caplog.records if "steps planned at" in r.getMessage()]
    assert len(decided) == 1 and decided[0].startswith("time budget 15 s: "), decided
    planned = int(decided[0].split(": ")[1].split()[0])
    assert kill_at < planned <= 1000, decided  # killed after the decision, before the end

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finderpartner"):
        resumed = train(config_from_dict(budget), resume="auto")
    assert resumed.state.global_step == resumed.state.planned_steps == planned
    assert not any("steps planned at" in r.getMessage() for r in caplog.records)  # not measured again
    assert any("not measured again" in r.getMessage() for r in caplog.records)

    fixed = micro_config(tmp_path / "fixed", small_data, max_steps=planned, warmup_steps=WARMUP, checkpoint_every=5)
    reference = train(config_from_dict(fixed))
    assert reference.state.global_step == planned
    ours, theirs = _final_weights(resumed.run_dir), _final_weights(reference.run_dir)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert _lrs(resumed.run_dir) == _lrs(reference.run_dir)  # the same schedule, step by step


def test_budget_shorter_than_the_measurement_still_ends_cleanly(small_data: Path, tmp_path: Path) -> None:
    result = train(config_from_dict(micro_config(tmp_path, small_data, time_budget="1s", warmup_steps=0)))
    # the budget is spent during start-up: the run stops where the step count is decided, validated and saved
    assert result.state.global_step == result.state.planned_steps == SKIP_STEPS + MEASURE_STEPS
    assert result.final is not None and result.best_model.is_dir()


def test_steps_that_fit_budgets_validations_and_checkpoints() -> None:
    common = dict(steps_per_epoch=100, eval_every_epochs=1, checkpoint_every=1000)
    # 100 s at 2 steps/s, nothing else: 200 steps (the one final checkpoint costs nothing here)
    assert steps_that_fit(100, 0, 2.0, validation_s=0, checkpoint_s=0, **common) == 200
    # each validation (every 100 steps and at the end) costs 10 s: 2 epochs and their validations = 120 s > 100;
    # 160 steps = 80 s + validations at 100 and 160 = 100 s
    assert steps_that_fit(100, 0, 2.0, validation_s=10, checkpoint_s=0, **common) == 160
    # already at step 150: the next validation comes at 200
    assert steps_that_fit(30, 150, 2.0, validation_s=10, checkpoint_s=0, **common) == 40
    # checkpoints every 10 steps at 1 s each, plus the final one
    n = steps_that_fit(
        100, 0, 1.0, validation_s=0, checkpoint_s=1, steps_per_epoch=1000, eval_every_epochs=1, checkpoint_every=10
    )
    assert n == 90  # 90 s of steps + 8 checkpoints (10..80) + the final one = 99 s; 91 steps would take 101 s
    assert steps_that_fit(0, 0, 2.0, validation_s=0, checkpoint_s=0, **common) == 0
    assert steps_that_fit(-5, 0, 2.0, validation_s=0, checkpoint_s=0, **common) == 0


def test_warm_up_covers_the_timing_and_is_cut_when_longer_than_the_budgeted_run() -> None:
    from finderpartner.train.budget import Plan

    def plan(**train: object) -> Plan:
        return Plan.from_config(config_from_dict({"train": train}).train, 100, 0.0)

    short = plan(time_budget="1m", warmup_steps=0)  # lengthened: no rate may depend on the undecided total
    assert short.warmup == SKIP_STEPS + MEASURE_STEPS and not short.decided
    short.fix(400)
    assert short.warmup == SKIP_STEPS + MEASURE_STEPS and short.total_now() == 400
    long = plan(time_budget="1m", warmup_steps=500)
    long.fix(400)  # the budget bought fewer steps than the warm-up: a fifth of them, as for a fixed step count
    assert long.warmup == 80 and long.warmup_now() == 80
    few = plan(time_budget="1m", max_steps=20)  # too few steps to time: a plain 20-step run
    assert few.decided and few.total == 20 and few.budget_s is None
    assert plan(epochs=3).total == 300 and plan(epochs=3).budget_s is None
