"""The training objective as an object, and the feature gathering that makes a batch global.

An ``Objective`` is an ``nn.Module``: the loss of a contrastive batch plus everything about its own learnable
parameters (CLIP: the temperature) that the trainer would otherwise special-case by name: their weight-decay
rule, their clamp after each optimizer step, the values worth logging, and how their gradients are reduced
across processes. The trainer, the gradient cache and validation only iterate over ``objective.parameters()``,
so a new loss (with its own parameters) is a new subclass here and an entry in ``OBJECTIVES``.

Gathering is kept apart from the loss maths (as in open_clip). Each process computes the loss of the whole
global batch with its own features in place of their gathered copies, so the gradient it gets is the full
derivative of the global loss with respect to its features; the trainer then *sums* parameter gradients
across processes. The result equals a single process holding the whole batch. The objective's own
parameters are the exception: every process already holds their full gradient (they see the whole gathered
batch), so after the sum they are divided by the number of processes (``average_summed_gradients_``).

With ``local_loss`` (open_clip's ``--local-loss`` with ``--gather-with-grad``, for large world sizes) each process
computes only its share of the global loss: the rows of its own pairs against every gathered column, O(local x
global) instead of O(global^2). The gather then carries gradients (``gather_with_grad``: its backward sums the
gradient of the gathered batch over processes), the shares of all processes add up to the global loss, and every
gradient, the objective's own parameters' included, is a share whose cross-process sum is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .processes import world

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature so that exp(scale) <= 100


def _row_counts(local: torch.Tensor) -> list[int]:
    """How many rows each process holds, in rank order."""
    n = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(n) for _ in range(world()[1])]
    dist.all_gather(counts, n)
    return [int(c.item()) for c in counts]


def _gather_padded(local: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    """Every process's rows in rank order (no gradient), ``rows[r]`` of them from process r.

    ``all_gather`` needs equal shapes: each process pads to the longest batch (at least one row), the pads are cut.
    """
    padded = local.detach().new_zeros((max(1, *rows), *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded.contiguous())
    return [p[:r] for p, r in zip(parts, rows)]


def gather_features(local: torch.Tensor) -> list[torch.Tensor]:
    """Every process's features (no gradient), in rank order; batches may differ in size between processes."""
    if world()[1] == 1:
        return [local.detach()]
    return _gather_padded(local, _row_counts(local))


class _GatherWithGrad(torch.autograd.Function):
    """All processes' rows concatenated in rank order; the backward returns this process's rows of the gradient
    summed over processes (every process's loss depends on every process's rows).

    Not ``torch.distributed.nn.functional.all_gather``: its backward needs reduce_scatter / all_to_all, which gloo
    lacks; one all_reduce of the gathered gradient works on every backend. Every process must run the backward.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, rows: list[int]) -> torch.Tensor:
        rank = world()[0]
        ctx.start, ctx.stop = sum(rows[:rank]), sum(rows[: rank + 1])
        return torch.cat(_gather_padded(local, rows))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.start : ctx.stop], None


def gather_with_grad(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The global batch, differentiable in every process's rows (``_GatherWithGrad``), and the row ours start at."""
    rank, size = world()
    if size == 1:
        return local, 0
    rows = _row_counts(local)
    return _GatherWithGrad.apply(local, rows), sum(rows[:rank])


def global_batch(local: torch.Tensor) -> torch.Tensor:
    """The global batch with this process's rows being ``local`` itself (so gradients flow into them)."""
    rank, size = world()
    if size == 1:
        return local
    parts = gather_features(local)
    parts[rank] = local
    return torch.cat(parts)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over normalised embeddings; pair i is row i of both. Computed in float32."""
    logits = logit_scale.float().exp() * image_emb.float() @ text_emb.float().t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class Objective(nn.Module):
    """A contrastive objective over normalised embeddings, owning the rules of its learnable parameters.

    Subclasses implement ``loss`` and ``local_part``; the defaults below suit parameters like a temperature or a
    bias: no weight decay, no clamp, nothing logged.
    """

    local_loss: bool = False  # each process computes only its share of the global loss (``build_objective``)

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """The loss of exactly these pairs (row i of both is pair i), in this process only: no gathering.

        Validation calls this on fixed-size blocks of a split; ``forward`` calls it on the global batch.
        """
        raise NotImplementedError

    def local_part(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        all_image: torch.Tensor,
        all_text: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        """This process's share of ``loss(all_image, all_text)``: the loss terms of its own pairs (``image_emb`` and
        ``text_emb``, rows ``start:start + len(image_emb)`` of the global batch) against every column.

        The shares of all processes sum to the global loss (and so do their gradients, the columns' included).
        """
        raise NotImplementedError

    def forward(self, local_image: torch.Tensor, local_text: torch.Tensor) -> torch.Tensor:
        """The loss of the global batch (all processes), differentiable in this process's embeddings.

        With ``local_loss`` the gradient is that of this process's share (``local_part``); the value is still the
        global loss (the shares summed across processes, a scalar all_reduce), so that what the trainer logs, and
        its decision to skip a non-finite step, are the same in every process.
        """
        if not self.local_loss or world()[1] == 1:  # one process: its share is the whole, the global loss itself
            return self.loss(global_batch(local_image), global_batch(local_text))
        all_image, start = gather_with_grad(local_image)
        all_text, _ = gather_with_grad(local_text)
        share = self.local_part(local_image, local_text, all_image, all_text, start)
        total = share.detach().clone()
        dist.all_reduce(total)
        return share + (total - share.detach())  # the value of the sum, the gradient of this share

    def no_decay(self) -> list[nn.Parameter]:
        """Which of this objective's parameters skip weight decay (decaying a temperature or bias is meaningless)."""
        return list(self.parameters())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the parameters in their valid range; the trainer calls this after every optimizer step."""

    def log_values(self) -> dict[str, float]:
        """Figures the trainer logs as ``train/<name>`` (readable values, e.g. a temperature as exp(scale))."""
        return {}

    def record(self) -> dict[str, Any] | None:
        """What a saved model must carry beyond its own weights to turn cosines into this objective's logits.

        The trainer writes it into the saved model (``DualEncoder.record_objective``: config.json's
        ``finderpartner_objective``, and the temperature as the model's ``logit_scale``). None: the model's own
        ``logit_scale`` is all there is (CLIP), and a record left by an earlier objective is removed.
        """
        return None

    @torch.no_grad()
    def average_summed_gradients_(self, world_size: int) -> None:
        """Undo the cross-process SUM for these parameters: each process already held their full gradient.

        The trainer sums every gradient across processes (right for the towers: each process holds the part
        that flows through its own features). The objective's parameters see the whole gathered batch in every
        process, so the sum is ``world_size`` times the single-process gradient; dividing restores it exactly.
        With ``local_loss`` each process held only its share's gradient: the sum is already exact.
        """
        if self.local_loss:
            return
        for p in self.parameters():
            if p.grad is not None:
                p.grad /= world_size


class ClipLoss(Objective):
    """CLIP's symmetric InfoNCE with a learnable temperature: logits = exp(logit_scale) * cos.

    The temperature is the model's own ``logit_scale`` Parameter, held by reference (the same tensor, not a
    copy), while this objective owns its rules (no weight decay, clamp to exp <= 100, gradient averaging,
    logging). Holding a reference rather than owning a copy means the trained temperature is in the HF
    CLIPModel at every moment: ``best_model/`` and exports carry it with no write-back step, checkpoints keep
    it in the model weights (checkpoints written before objectives existed resume unchanged), and evaluation
    of a saved model gives the same numbers as validation during training.
    """

    def __init__(self, logit_scale: nn.Parameter) -> None:
        super().__init__()
        self.logit_scale = logit_scale

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return clip_loss(image_emb, text_emb, self.logit_scale)

    def local_part(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        all_image: torch.Tensor,
        all_text: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        # Our images against all texts and our texts against all images (columns of clip_loss's logits), each
        # direction's mean weighted by our share of the rows.
        scale = self.logit_scale.float().exp()
        image_rows = scale * image_emb.float() @ all_text.float().t()
        text_rows = (scale * all_image.float() @ text_emb.float().t()).t()
        labels = torch.arange(start, start + image_emb.shape[0], device=image_rows.device)
        share = (F.cross_entropy(image_rows, labels) + F.cross_entropy(text_rows, labels)) / 2
        return share * (image_emb.shape[0] / all_image.shape[0])

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def log_values(self) -> dict[str, float]:
        return {"logit_scale": float(self.logit_scale.detach().exp())}


class SigmoidLoss(Objective):
    """SigLIP's pairwise sigmoid loss: logits = exp(t') * cos + b, loss = -sum log sigmoid(label * logits) / n.

    Labels are +1 on the diagonal (matching pairs), -1 elsewhere. Normalised as in the paper (and open_clip,
    big_vision): summed over the n x n pairs and divided by n, not averaged over n^2, which would make gradients n
    times smaller and, through AdamW's epsilon, trained much slower (benchmarks/README.md, "SigLIP vs CLIP"). It owns both of its parameters (the HF
    CLIPModel has no place for a bias): the trainer optimizes them, and keeps them in the training checkpoint,
    without knowing their names. Init as SigLIP: t' = log 10, b = -10 (or a saved model's values, ``record``).

    The model's own ``logit_scale`` takes no part in training; the saved model gets t' there, and both values in
    its config (``record``), so that ``sigmoid(exp(logit_scale) * cos + logit_bias)`` is computable from the folder.
    """

    def __init__(self, log_scale: float = math.log(10.0), bias: float = -10.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        logits = self.log_scale.float().exp() * image_emb.float() @ text_emb.float().t() + self.bias.float()
        labels = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
        return -F.logsigmoid(labels * logits).sum() / logits.shape[0]

    def local_part(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        all_image: torch.Tensor,
        all_text: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        # Our rows of the pairwise matrix (our images against all texts): their sum over the global batch size.
        n, total = image_emb.shape[0], all_text.shape[0]
        logits = self.log_scale.float().exp() * image_emb.float() @ all_text.float().t() + self.bias.float()
        labels = -torch.ones_like(logits)
        labels[:, start : start + n] += 2 * torch.eye(n, device=logits.device)
        return -F.logsigmoid(labels * logits).sum() / total

    def log_values(self) -> dict[str, float]:
        return {"sigmoid_scale": float(self.log_scale.detach().exp()), "sigmoid_bias": float(self.bias.detach())}

    def record(self) -> dict[str, Any]:
        # logit_scale in log space, like the model's own parameter (exp of it multiplies the cosines)
        return {"loss": SIGLIP, "logit_scale": float(self.log_scale.detach()), "logit_bias": float(self.bias.detach())}


CLIP, SIGLIP = "clip", "siglip"
ALIASES = {"sigmoid": SIGLIP}  # the objective's first name; configs and checkpoints written with it still work


def _siglip(model: nn.Module, record: dict[str, Any] | None) -> Objective:
    if record is not None and canonical(record.get("loss", "")) == SIGLIP:  # go on from a saved SigLIP model
        return SigmoidLoss(record["logit_scale"], record["logit_bias"])
    return SigmoidLoss()


# train.loss -> the objective for a model and its saved record (``Objective.record``, from its config; None when
# it has none). A new objective is a subclass above and one entry here.
OBJECTIVES: dict[str, Callable[[nn.Module, dict[str, Any] | None], Objective]] = {
    CLIP: lambda model, record: ClipLoss(model.logit_scale),
    SIGLIP: _siglip,
}


def canonical(name: str) -> str:
    """The objective's name, aliases resolved ('sigmoid' -> 'siglip')."""
    return ALIASES.get(name, name)


def build_objective(
    name: str, model: nn.Module, *, local_loss: bool = False, record: dict[str, Any] | None = None
) -> Objective:
    """The objective ``train.loss`` names, for ``model`` (already on its device: the objective is moved there).

    ``local_loss`` (``train.local_loss``): each process computes its share of the global loss (see the module).
    ``record``: what a saved model says about the objective it was trained with (``DualEncoder.objective_record``);
    the same objective continues from its values (a resumed run then loads its checkpoint's over them).
    """
    if canonical(name) not in OBJECTIVES:
        names = ", ".join([*sorted(OBJECTIVES), *(f"{a} (= {n})" for a, n in ALIASES.items())])
        raise ConfigError(f"train.loss {name!r} is not an objective; choose one of {names}")
    device = next(model.parameters()).device
    objective = OBJECTIVES[canonical(name)](model, record).to(device)
    objective.local_loss = local_loss
    return objective


def saved_objective(model: nn.Module, record: dict[str, Any] | None) -> Objective:
    """The objective a saved model was trained with, with its saved values: what ``eval`` reports the loss of.

    SigLIP when its config carries a SigLIP record, else CLIP (with the model's ``logit_scale``), as before.
    """
    name = canonical(record.get("loss", CLIP)) if record is not None else CLIP
    return build_objective(name if name in OBJECTIVES else CLIP, model, record=record)
