"""Contrastive loss over the global batch, and the feature gathering that makes a batch global.

Gathering is kept apart from the loss maths (as in open_clip). Each process computes the loss of the whole
global batch with its own features in place of their gathered copies, so the gradient it gets is the full
derivative of the global loss with respect to its features; the trainer then *sums* parameter gradients
across processes. The result equals a single process holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(local: torch.Tensor) -> list[torch.Tensor]:
    """Every process's features (no gradient), in rank order; batches may differ in size between processes."""
    rank, size = world()
    if size == 1:
        return [local.detach()]
    n = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return [p[: int(c.item())] for p, c in zip(parts, counts)]


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


def contrastive_loss(local_image: torch.Tensor, local_text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss of the global batch (all processes), differentiable in this process's embeddings."""
    return clip_loss(global_batch(local_image), global_batch(local_text), logit_scale)
