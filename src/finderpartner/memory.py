"""Fitting a contrastive batch into memory: the gradient cache, OOM recovery helpers, micro-batch probing.

The contrastive batch (pairs that see each other as negatives) is a property of the objective; the
micro-batch (pairs through the model at once) is a property of the hardware. The gradient cache (GradCache,
Gao et al. 2021) separates the two: embed every micro-batch without autograd, compute the loss of the whole
batch and its gradient with respect to the embeddings, then re-run each micro-batch with autograd and
back-propagate the cached embedding gradients. Parameter gradients equal those of one full-batch pass while
only one micro-batch of activations is alive at a time; the price is one extra forward pass.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.collate import Batch
from .data.transforms import normalize
from .loss import contrastive_loss
from .model import ImageSpec, image_features, text_features

log = logging.getLogger(__name__)

Backward = Callable[[torch.Tensor], None]


def embed_pair(model: nn.Module, batch: Batch, spec: ImageSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 image and text embeddings of a (micro-)batch whose tensors are on the model's device."""
    pixels = normalize(batch.pixel_values, spec)
    image = F.normalize(image_features(model, pixels).float(), dim=-1)
    text = F.normalize(text_features(model, batch.input_ids, batch.attention_mask).float(), dim=-1)
    return image, text


def contrastive_backward(
    model: nn.Module,
    batch: Batch,
    *,
    micro_batch_size: int,
    spec: ImageSpec,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    backward: Backward,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of the contrastive loss of ``batch``; returns the (detached) loss.

    ``backward`` runs ``.backward()`` on a scalar (through a gradient scaler for fp16).
    """
    scale = model.logit_scale
    if micro_batch_size >= len(batch):
        with autocast():
            image, text = embed_pair(model, batch, spec)
        loss = contrastive_loss(image, text, scale)
        backward(loss)
        return loss.detach()

    chunks = batch.split(micro_batch_size)
    rng_states, cached = [], []
    with torch.no_grad():  # pass 1: embeddings only, no activations kept
        for chunk in chunks:
            rng_states.append(capture_rng())
            with autocast():
                cached.append(embed_pair(model, chunk, spec))
    rng_after = capture_rng()
    image = torch.cat([c[0] for c in cached]).requires_grad_()
    text = torch.cat([c[1] for c in cached]).requires_grad_()
    loss = contrastive_loss(image, text, scale)
    inputs = [image, text] + ([scale] if scale.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    grad_image, grad_text = grads[0], grads[1]

    offset = 0
    for i, (chunk, state) in enumerate(zip(chunks, rng_states)):  # pass 2: same randomness, real backward
        restore_rng(state)
        with autocast():
            chunk_image, chunk_text = embed_pair(model, chunk, spec)
        n = len(chunk)
        surrogate = (chunk_image * grad_image[offset : offset + n]).sum() + (chunk_text * grad_text[offset : offset + n]).sum()
        if i == len(chunks) - 1 and scale.requires_grad:
            surrogate = surrogate + scale * grads[2]  # d loss / d logit_scale, through the same backward path
        backward(surrogate)
        offset += n
    restore_rng(rng_after)
    return loss.detach()


# --------------------------------------------------------------------------------------------------------------
# Randomness and memory


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
