"""Adding an objective is local: SigLIP's sigmoid loss (its own temperature and bias, neither in the model)
trains through the gradient cache (1 x 64 = 8 x 8), through two gloo processes (2 x 32 = 1 x 64) and through the
trainer's checkpoints.

Run as a script (by torchrun), this file is the worker of the two-process test.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import MICRO_SPEC, end_worker, micro_config, run_torchrun
from safetensors.torch import load_file, save_file

from finderpartner.config import TinySpec, config_from_dict
from finderpartner.data.collate import Batch, Collator
from finderpartner.data.dataset import PairDataset, read_split
from finderpartner.data.transforms import TrainTransform
from finderpartner.loss import Objective, SigmoidLoss, build_objective
from finderpartner.model import DualEncoder, build_tiny
from finderpartner.train import train
from finderpartner.train.step import contrastive_backward, sum_gradients_across_processes

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

PAIRS = 64
MICRO = 8


def _setup(small_data: Path) -> tuple[DualEncoder, SigmoidLoss, Batch]:
    """The same model (seed 0), objective and 64-pair batch in every process that asks."""
    table, _ = read_split(small_data, "train")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions, seed=0)
    ds = PairDataset(table, TrainTransform(encoder.image_spec))  # augmentation seeded per pair: the same everywhere
    batch = Collator(encoder.text_tokenizer())([ds[(i, 1000 + i)] for i in range(PAIRS)])
    encoder.model.train()
    return encoder, SigmoidLoss(), batch


def _grads(encoder: DualEncoder, objective: Objective, batch: Batch, micro: int) -> dict[str, torch.Tensor]:
    """Gradients of one step on ``batch`` in micro-batches of ``micro``, the objective's as ``objective.<name>``."""
    model = encoder.model
    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    contrastive_backward(
        encoder,
        objective,
        batch,
        micro_batch_size=micro,
        autocast=contextlib.nullcontext,
        backward=lambda loss: loss.backward(),
    )
    named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def test_sigmoid_loss_through_the_gradient_cache(small_data: Path) -> None:
    encoder, objective, batch = _setup(small_data)
    full = _grads(encoder, objective, batch, PAIRS)  # 1 x 64
    cached = _grads(encoder, objective, batch, MICRO)  # 8 x 8
    assert full.keys() == cached.keys() and {"objective.bias", "objective.log_scale"} <= full.keys()
    assert "logit_scale" not in full  # the model's own temperature is not this objective's
    zero = {n for n in full if n.endswith("k_proj.bias")}  # exactly zero in theory: rounding noise only
    relative = {n: ((full[n] - cached[n]).abs().max() / full[n].abs().max()).item() for n in full if n not in zero}
    assert max(relative.values()) <= 1e-4, max(relative.items(), key=lambda kv: kv[1])
    assert float(full["objective.bias"]) != 0.0


def test_two_gloo_processes_give_the_bias_exactly_the_single_process_gradient(small_data: Path, tmp_path: Path) -> None:
    encoder, objective, batch = _setup(small_data)
    one = _grads(encoder, objective, batch, MICRO)  # micro-batches of 8: the same chunks each process embeds
    out = tmp_path / "grads.safetensors"
    run = run_torchrun(__file__, str(small_data), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    two = load_file(out)
    assert two.keys() == one.keys()
    # The objective's parameters: bitwise the single-process gradient (not twice it, as a plain sum would give).
    for name in ("objective.bias", "objective.log_scale"):
        assert torch.equal(two[name], one[name]), (name, two[name], one[name])
    # The towers: the same gradient, summed from two halves across processes instead of inside one process.
    worst = max(((two[n] - one[n]).abs().max() / one[n].abs().max().clamp_min(1e-6)).item() for n in one)
    assert worst <= 1e-4, worst


def test_the_trainer_trains_and_checkpoints_a_sigmoid_objective(small_data: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(micro_config(tmp_path, small_data, loss="sigmoid", epochs=1))
    assert isinstance(build_objective(cfg.train.loss, torch.nn.Linear(1, 1)), SigmoidLoss)  # the old name
    assert isinstance(build_objective("siglip", torch.nn.Linear(1, 1)), SigmoidLoss)
    result = train(cfg)
    weights = load_file(sorted((result.run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    assert float(weights["objective.bias"]) != -10.0 and float(weights["objective.log_scale"]) != 0.0
    logged = (result.run_dir / "metrics.jsonl").read_text()
    assert "train/sigmoid_bias" in logged and "train/logit_scale" not in logged


def _worker(small_data: Path, out: Path) -> None:
    """One of two processes: its half of the batch, the trainer's cross-process gradient reduction."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    encoder, objective, batch = _setup(small_data)
    local = batch.split(PAIRS // world)[rank]  # rank order = the global batch's row order, as in training
    _grads(encoder, objective, local, MICRO)
    model = encoder.model
    sum_gradients_across_processes(model, objective)
    named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    if rank == 0:
        save_file(grads, str(out))
    dist.barrier()  # neither process tears the group down while the other still uses it (gloo aborts then)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
    end_worker()
