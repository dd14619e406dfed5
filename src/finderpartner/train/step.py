"""One training step's gradients: embed, the gradient cache, OOM retry, the cross-process gradient sum.

The contrastive batch (pairs that see each other as negatives) is a property of the objective; the
micro-batch (pairs through the model at once) is a property of the hardware. The gradient cache (GradCache,
Gao et al. 2021) separates the two: embed every micro-batch without autograd, compute the loss of the whole
batch and its gradient with respect to the embeddings (and the objective's own parameters), then re-run each
micro-batch with autograd and back-propagate the cached embedding gradients. Parameter gradients equal those
of one full-batch pass while only one micro-batch of activations is alive at a time; the price is one extra
forward pass. The optimizer step itself (clipping, skipping non-finite steps, the schedule) is the trainer's.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..data.collate import Batch
from ..errors import TrainingError
from ..loss import Objective
from ..memory import free_memory, is_oom
from ..model import DualEncoder
from ..processes import any_true

log = logging.getLogger(__name__)

Backward = Callable[[torch.Tensor], None]
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


def embed_pair(encoder: DualEncoder, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 image and text embeddings of a (micro-)batch whose tensors are on the model's device."""
    image = encoder.encode_images(batch.pixel_values)
    text = encoder.encode_texts({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    return image, text


def contrastive_backward(
    encoder: DualEncoder,
    objective: Objective,
    batch: Batch,
    *,
    micro_batch_size: int,
    autocast: Autocast,
    backward: Backward,
) -> torch.Tensor | None:
    """Accumulate into ``.grad`` the gradient of the objective on ``batch``; returns the (detached) loss.

    ``backward`` runs ``.backward()`` on a scalar (through a gradient scaler for fp16). Returns None when this
    or any other process ran out of memory: the gradients accumulated so far are then partial (the caller
    zeroes them). Processes vote on that before each cross-process exchange (``processes.any_true``), so that
    every process leaves the step at the same point and none waits in a collective the others skipped.
    """
    if micro_batch_size >= len(batch):
        with _catching_oom() as failed:
            with autocast():
                image, text = embed_pair(encoder, batch)
        if any_true(bool(failed)):
            return None
        with _catching_oom() as failed:  # the objective gathers the other processes' embeddings first
            loss = objective(image, text)
            backward(loss)
        return None if any_true(bool(failed)) else loss.detach()

    chunks = batch.split(micro_batch_size)
    rng_states, cached = [], []
    with _catching_oom() as failed, torch.no_grad():  # pass 1: embeddings only, no activations kept
        for chunk in chunks:
            rng_states.append(capture_rng())
            with autocast():
                cached.append(embed_pair(encoder, chunk))
    if any_true(bool(failed)):
        return None
    rng_after = capture_rng()
    image = torch.cat([c[0] for c in cached]).requires_grad_()
    text = torch.cat([c[1] for c in cached]).requires_grad_()
    del cached
    loss = objective(image, text)  # gathers across processes: the whole batch's loss matrix is assumed to fit
    own = [p for p in objective.parameters() if p.requires_grad]
    grad_image, grad_text, *grad_own = torch.autograd.grad(loss, [image, text, *own])

    offset = 0
    with _catching_oom() as failed:
        for i, (chunk, state) in enumerate(zip(chunks, rng_states)):  # pass 2: same randomness, real backward
            restore_rng(state)
            with autocast():
                chunk_image, chunk_text = embed_pair(encoder, chunk)
            n = len(chunk)
            surrogate = (chunk_image * grad_image[offset : offset + n]).sum() + (
                chunk_text * grad_text[offset : offset + n]
            ).sum()
            if i == len(chunks) - 1:  # d loss / d (objective's parameters), through the same backward path (scaler)
                for p, g in zip(own, grad_own):
                    surrogate = surrogate + (p * g).sum()
            backward(surrogate)
            offset += n
    restore_rng(rng_after)
    return None if any_true(bool(failed)) else loss.detach()


class _OomFlag:
    """Set by ``_catching_oom`` when the block ran out of memory."""

    def __init__(self) -> None:
        self.set = False

    def __bool__(self) -> bool:
        return self.set


@contextlib.contextmanager
def _catching_oom() -> Iterator[_OomFlag]:
    """Swallow an out-of-memory error of the block and flag it; any other error propagates.

    The error (and its traceback, which holds the failed attempt's activations) is dropped as the ``except``
    clause ends, so memory freed afterwards is really freed.
    """
    flag = _OomFlag()
    try:
        yield flag
    except RuntimeError as e:  # torch.OutOfMemoryError, or a backend's RuntimeError saying so
        if not is_oom(e):
            raise
        flag.set = True


def backward_with_oom_retry(
    encoder: DualEncoder,
    objective: Objective,
    batch: Batch,
    *,
    micro_batch_size: int,
    autocast: Autocast,
    backward: Backward,
    oom_advice: Callable[[int], str],
    step: int,
) -> tuple[torch.Tensor, int]:
    """``contrastive_backward``, redone with half the micro-batch after an out-of-memory error in any process.

    Returns the loss and the micro-batch that fit. Every process learns of an OOM anywhere (the vote inside
    ``contrastive_backward``), so all of them free the failed attempt's memory, halve and redo the same step
    together. The randomness is rewound before a retry, so the step that succeeds is the step that would have
    run (the gradient cache makes its result independent of the micro-batch). At micro-batch 1 a
    ``TrainingError`` carries ``oom_advice(micro_batch_size)``.
    """
    rng = capture_rng()
    while True:
        loss = contrastive_backward(
            encoder, objective, batch, micro_batch_size=micro_batch_size, autocast=autocast, backward=backward
        )
        if loss is not None:
            return loss, micro_batch_size
        encoder.model.zero_grad(set_to_none=True)
        objective.zero_grad(set_to_none=True)
        free_memory()  # the failed attempt's tensors died with contrastive_backward's frame
        restore_rng(rng)
        if micro_batch_size <= 1:
            raise TrainingError(oom_advice(micro_batch_size))
        micro_batch_size = max(1, micro_batch_size // 2)
        log.warning("out of memory at step %d: micro-batch halved to %d, redoing the step", step, micro_batch_size)


def step_parameters(model: nn.Module, objective: Objective) -> list[nn.Parameter]:
    """Everything a step trains: the model's parameters, then the objective's own ones (each tensor once).

    The CLIP objective's temperature is the model's own parameter, so for it this is ``model.parameters()``.
    """
    seen = {id(p) for p in model.parameters()}
    return list(model.parameters()) + [p for p in objective.parameters() if id(p) not in seen]


def sum_gradients_across_processes(model: nn.Module, objective: Objective) -> None:
    """Each process holds d(global loss)/d(params) through its own features: the total is their sum.

    With the global loss the objective's parameters get the same full gradient in every process, and the
    objective divides their sum back (``Objective.average_summed_gradients_``); with ``train.local_loss`` each
    process holds only its share of it and the sum is already right. Either way N processes give exactly the
    single-process gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in step_parameters(model, objective) if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
    objective.average_summed_gradients_(dist.get_world_size())


# --------------------------------------------------------------------------------------------------------------
# Randomness: the gradient cache replays each micro-batch's dropout; an OOM retry and validation rewind it


def capture_rng() -> dict[str, Any]:
    """The CPU generator and this process's own GPU's (``"cuda": (device index, state)``; each process trains on
    one GPU, and the generators of GPUs it does not use are not its to save or restore)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        device, cuda_state = state["cuda"]
        torch.cuda.set_rng_state(cuda_state, device)


def parameter_groups(model: nn.Module, objective: Objective, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices; none on biases, norms, embeddings and the objective's ``no_decay()``.

    Parameters keep the order of ``step_parameters`` (the model's, then the objective's own): a checkpoint's
    optimizer state is matched to parameters by position.
    """
    no_decay_modules = (nn.LayerNorm, nn.Embedding, nn.GroupNorm, nn.BatchNorm2d)
    no_decay: set[int] = {
        id(p) for m in model.modules() if isinstance(m, no_decay_modules) for p in m.parameters(recurse=False)
    } | {id(p) for p in objective.no_decay()}
    decay, rest = [], []
    for p in step_parameters(model, objective):
        if p.requires_grad:
            (rest if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, objective: Objective, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over ``parameter_groups`` (benchmarks wrap this to compare optimizer variants)."""
    groups = parameter_groups(model, objective, cfg.train.weight_decay)
    kwargs = {"lr": cfg.train.lr, "betas": tuple(cfg.train.betas), "eps": cfg.train.eps}
    try:  # one fused kernel over all parameters (CUDA; CPU since torch 2.4): measured +3% per step on the CPU
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int | Callable[[], int], total: int | Callable[[], int], floor: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``floor * lr``.

    ``warmup`` and ``total`` may be callables read at every step (a time budget decides the total, and caps a
    warm-up longer than the run, during the warm-up; until then only warm-up factors are asked for).

    Why not transformers' ``get_cosine_with_min_lr_schedule_with_warmup``: after the warm-up this is the same curve
    (``tests/test_train.py`` checks every step against it, 1e-12), but that one fixes ``num_training_steps`` when it
    is built, and under ``train.time_budget`` the step count is only known after steps 10-30 have been timed. Its
    warm-up also starts at factor 0, so its first optimizer step does nothing; this one starts at 1/(w+1).
    """
    if isinstance(warmup, int) and isinstance(total, int) and warmup >= total:
        log.warning(
            "warm-up of %d steps is not shorter than the %d training steps: using %d", warmup, total, total // 5
        )
        warmup = total // 5
    warmup_now = warmup if callable(warmup) else (lambda: warmup)
    total_now = total if callable(total) else (lambda: total)

    def factor(step: int) -> float:
        w = warmup_now()
        if step < w:
            return (step + 1) / (w + 1)
        progress = min(1.0, (step - w) / max(1, total_now() - w))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
