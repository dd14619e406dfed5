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
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.collate import Batch
from .data.transforms import normalize
from .errors import TrainingError
from .loss import contrastive_loss
from .model import ImageSpec, image_features, text_features
from .paths import default_cache_dir

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
        surrogate = (chunk_image * grad_image[offset : offset + n]).sum() + (
            chunk_text * grad_text[offset : offset + n]
        ).sum()
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


# --------------------------------------------------------------------------------------------------------------
# Micro-batch probing (train.micro_batch_size: auto)


@dataclass(frozen=True)
class ProbeResult:
    micro_batch_size: int
    reason: str
    peak_bytes: dict[int, int]  # micro-batch size -> measured peak (CUDA: allocated; CPU: resident)


def synthetic_batch(size: int, image_size: int, context_length: int, vocab_size: int, device: torch.device) -> Batch:
    """Worst-case inputs for probing: full-length captions, random pixels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab_size), (size, context_length), generator=g)
    return Batch(
        torch.arange(size),
        torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, generator=g),
        ids,
        torch.ones_like(ids),
    ).to(device)


def probe_micro_batch(
    model: nn.Module,
    *,
    local_batch: int,
    spec: ImageSpec,
    context_length: int,
    eos_token_id: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    reserve_bytes: int,
    cache_key: str | None = None,
) -> ProbeResult:
    """Choose the micro-batch by running real forward+backward steps on this model, precision and image size.

    CUDA: the largest size whose peak allocation leaves ``reserve_bytes`` free (an OOM ends the search).
    CPU: the full local batch when its (extrapolated) peak resident memory leaves the reserve free, else the largest
    power-of-two fraction of it that does: on a CPU splitting only adds work.
    """
    cached = _read_cache(cache_key)
    if cached is not None:
        return ProbeResult(min(cached, local_batch), f"cached for {cache_key}", {})
    vocab = int(model.config.text_config.vocab_size)
    was_training = model.training
    model.train()
    try:
        if device.type == "cuda":
            result = _probe_cuda(
                model, local_batch, spec, context_length, vocab, eos_token_id, device, autocast, reserve_bytes
            )
        else:
            result = _probe_cpu(
                model, local_batch, spec, context_length, vocab, eos_token_id, device, autocast, reserve_bytes
            )
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        free_memory()
    _write_cache(cache_key, result.micro_batch_size)
    return result


def _candidates(local_batch: int) -> list[int]:
    sizes, m = [], 1
    while m < local_batch:
        sizes.append(m)
        m *= 2
    return sizes + [local_batch]


def _one_step(model: nn.Module, batch: Batch, micro: int, spec: ImageSpec, autocast: Any) -> None:
    contrastive_backward(
        model, batch, micro_batch_size=micro, spec=spec, autocast=autocast, backward=lambda x: x.backward()
    )
    model.zero_grad(set_to_none=True)


def _probe_cuda(model, local_batch, spec, context_length, vocab, eos, device, autocast, reserve) -> ProbeResult:  # type: ignore[no-untyped-def]
    total = torch.cuda.get_device_properties(device).total_memory
    budget = total - reserve
    peaks: dict[int, int] = {}
    best, reason = 0, ""
    for size in _candidates(local_batch):
        batch = synthetic_batch(size, spec.crop, context_length, vocab, device)
        batch.input_ids[:, -1] = eos
        free_memory()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            _one_step(model, batch, size, spec, autocast)
        except Exception as e:
            if not is_oom(e):
                raise
            reason = f"out of memory at {size}"
            break
        peaks[size] = torch.cuda.max_memory_allocated(device)
        if peaks[size] > budget:
            reason = f"{size} peaks at {peaks[size] / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB budget"
            break
        best = size
    if best == 0:
        raise TrainingError(
            f"even a micro-batch of 1 does not fit in {budget / 2**30:.1f} GiB ({reason}); use precision bf16/fp16, "
            "model.gradient_checkpointing, a frozen tower or LoRA, or lower train.memory_reserve_gb"
        )
    why = f"largest size within {total / 2**30:.1f} GiB minus a {reserve / 2**30:.1f} GiB reserve" + (
        f" ({reason})" if reason else ""
    )
    return ProbeResult(best, why, peaks)


def _probe_cpu(model, local_batch, spec, context_length, vocab, eos, device, autocast, reserve) -> ProbeResult:  # type: ignore[no-untyped-def]
    """On a CPU splitting a batch never speeds it up (it adds a forward pass), so the full local batch is used when
    its memory fits. Peak resident memory is measured at two small sizes and extrapolated linearly (running the
    full batch just to find out could get the process killed by the kernel's OOM killer)."""
    sizes = sorted({min(4, local_batch), min(8, local_batch)})
    measured = {size: _cpu_step_peak(model, size, spec, context_length, vocab, eos, device, autocast) for size in sizes}
    peaks = {size: peak for size, (peak, _) in measured.items()}
    per_pair = max(0.0, (peaks[sizes[-1]] - peaks[sizes[0]]) / max(1, sizes[-1] - sizes[0]))
    listing = ", ".join(f"{s}: {p / 2**30:.2f} GiB, {v:.0f} pairs/s" for s, (p, v) in measured.items())
    available = _available_memory_bytes()
    if available is None:
        return ProbeResult(local_batch, f"free memory unknown: the full batch (measured {listing})", peaks)
    budget = available - reserve  # how much more this process may grow beyond the measured peak
    micro = local_batch
    while micro > sizes[-1] and per_pair * (micro - sizes[-1]) > budget:
        micro //= 2
    predicted = peaks[sizes[-1]] + per_pair * (micro - sizes[-1])
    why = (
        f"{'the full batch' if micro == local_batch else 'largest size'} within free memory: ~{predicted / 2**30:.1f} GiB "
        f"predicted, {available / 2**30:.1f} GiB available, {reserve / 2**30:.1f} GiB reserve (measured {listing})"
    )
    return ProbeResult(micro, why, peaks)


def _cpu_step_peak(model, size, spec, context_length, vocab, eos, device, autocast) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """Peak resident memory (bytes) and pairs/s of one forward+backward step of ``size`` pairs."""
    import time

    batch = synthetic_batch(size, spec.crop, context_length, vocab, device)
    batch.input_ids[:, -1] = eos
    reset_peak_rss()
    t0 = time.perf_counter()
    _one_step(model, batch, size, spec, autocast)
    return peak_rss_bytes(), size / (time.perf_counter() - t0)


def _available_memory_bytes() -> int | None:
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last ``reset_peak_rss``."""
    peak = _proc_bytes("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a Linux /proc file, in bytes (None where there is no such file or line)."""
    try:
        with open(path, encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key)), None)
    except OSError:
        return None


def reset_peak_rss() -> None:
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _cache_file() -> Path:
    return default_cache_dir() / "micro_batch.json"


def _read_cache(key: str | None) -> int | None:
    if key is None:
        return None
    try:
        return int(json.loads(_cache_file().read_text(encoding="utf-8"))[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(key: str | None, value: int) -> None:
    if key is None:
        return
    path = _cache_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        data[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        log.debug("micro-batch cache not written: %s", e)
