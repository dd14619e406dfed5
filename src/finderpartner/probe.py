"""Choosing the micro-batch (``train.micro_batch_size: auto``) by running real steps on synthetic batches.

The probe measures this model, precision and image size on this machine: on CUDA the peak allocation of one
forward+backward step per candidate size, on the CPU the peak resident memory at two small sizes, extrapolated.
The answer is cached per setup (``<cache>/micro_batch.json``), since probing costs a few steps' time.

Probing never communicates with other processes: each process probes (or reads its cache) alone, counting the
optimizer state that does not exist yet, and only then do all of them agree on one size (``agree``: the
trainer's all_reduce(min)), which is what the cache keeps. A cache hit in one process and a miss in another, or
an out-of-memory error in only one, therefore cannot leave them waiting in different collectives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.collate import Batch
from .errors import TrainingError
from .loss import Objective
from .memory import available_memory_bytes, free_memory, is_oom, peak_rss_bytes, reset_peak_rss
from .model import DualEncoder
from .paths import default_cache_dir
from .step import embed_pair

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Setup:
    """What one probing step runs: this encoder and objective on worst-case synthetic batches."""

    encoder: DualEncoder
    objective: Objective
    context_length: int
    vocab: int
    eos: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]

    def batch(self, size: int) -> Batch:
        """``size`` worst-case pairs: random pixels, full-length captions ending in the end-of-text token."""
        batch = synthetic_batch(size, self.encoder.image_spec.crop, self.context_length, self.vocab, self.device)
        batch.input_ids[:, -1] = self.eos
        return batch

    def step(self, batch: Batch) -> None:
        """One forward+backward step of ``batch`` in one micro-batch; no gradients are left behind.

        The loss is the objective's loss of these pairs alone (``Objective.loss``): nothing is gathered from other
        processes. The global batch's loss matrix is left out of the measurement; it is small beside activations.
        """
        with self.autocast():
            image, text = embed_pair(self.encoder, batch)
        self.objective.loss(image, text).backward()
        self.encoder.model.zero_grad(set_to_none=True)
        self.objective.zero_grad(set_to_none=True)


def probe_micro_batch(
    encoder: DualEncoder,
    objective: Objective,
    *,
    local_batch: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    reserve_bytes: int,
    state_bytes: int = 0,
    cache_key: str | None = None,
    agree: Callable[[int], int] = lambda size: size,
) -> ProbeResult:
    """Choose the micro-batch by running real forward+backward steps on this model, precision and image size.

    CUDA: the largest size whose peak allocation plus ``state_bytes`` (optimizer state not yet allocated; see
    ``optimizer_state_bytes``) leaves ``reserve_bytes`` free (an OOM ends the search). CPU: the full local batch
    when its (extrapolated) peak resident memory leaves the same free, else the largest power-of-two fraction of
    it that does: on a CPU splitting only adds work. ``agree`` turns this process's answer into the one all
    processes use (0 means "not even 1 fits here"); that agreed size is cached under ``cache_key``.
    """
    cached = _read_cache(cache_key)
    if cached is not None:
        result = ProbeResult(min(cached, local_batch), f"cached for {cache_key}", {})
    else:
        try:
            result = _probe(encoder, objective, local_batch, device, autocast, reserve_bytes + state_bytes)
        except TrainingError:  # nothing fits here: still take part in the agreement (0 wins a minimum), then stop
            agree(0)
            raise
    agreed = agree(result.micro_batch_size)
    if agreed == 0:
        raise TrainingError(
            "another process could not fit even a micro-batch of 1 (see its error); "
            "use precision bf16/fp16, model.gradient_checkpointing, a frozen tower or LoRA"
        )
    if agreed != result.micro_batch_size:
        result = ProbeResult(agreed, f"the smallest of all processes' sizes (here: {result.reason})", result.peak_bytes)
    _write_cache(cache_key, agreed)
    return result


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state will take once created (it is created lazily, at the first step).

    Adam(W): the two moments (three with amsgrad) in each trainable parameter's dtype, plus a float32 step
    count. Parameters whose state exists already (a resumed run) count 0: their memory is in the measurement.
    """
    total = 0
    for group in optimizer.param_groups:
        moments = 3 if group.get("amsgrad") else 2
        for p in group["params"]:
            if p.requires_grad and p not in optimizer.state:
                total += moments * p.numel() * p.element_size() + 4
    return total


def _probe(
    encoder: DualEncoder,
    objective: Objective,
    local_batch: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    reserve_bytes: int,
) -> ProbeResult:
    model = encoder.model
    vocab = int(model.config.text_config.vocab_size)
    tok = encoder.tokenizer
    eos_token_id = int(next((t for t in (tok.eos_token_id, tok.sep_token_id) if t is not None), vocab - 1))
    setup = _Setup(encoder, objective, encoder.context_length, vocab, eos_token_id, device, autocast)
    was_training = model.training
    model.train()
    try:
        if device.type == "cuda":
            result = _probe_cuda(setup, local_batch, reserve_bytes)
        else:
            result = _probe_cpu(setup, local_batch, reserve_bytes)
    finally:
        model.zero_grad(set_to_none=True)
        objective.zero_grad(set_to_none=True)
        model.train(was_training)
        for cache in (encoder.text_cache, encoder.image_cache):  # random inputs: no captions or images of the data
            if cache is not None:
                cache.clear()
        free_memory()
    return result


def _candidates(local_batch: int) -> list[int]:
    sizes, m = [], 1
    while m < local_batch:
        sizes.append(m)
        m *= 2
    return sizes + [local_batch]


def _probe_cuda(setup: _Setup, local_batch: int, reserve: int) -> ProbeResult:
    device = setup.device
    total = torch.cuda.get_device_properties(device).total_memory
    # A cap set with torch.cuda.set_per_process_memory_fraction (an emulated smaller card) is the real total.
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    total = int(total * min(1.0, fraction))
    budget = total - reserve
    peaks: dict[int, int] = {}
    best, reason = 0, ""
    for size in _candidates(local_batch):
        batch = setup.batch(size)
        free_memory()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            setup.step(batch)
        except RuntimeError as e:  # torch.OutOfMemoryError, or a backend's RuntimeError saying so
            if not is_oom(e):
                raise
            reason = f"out of memory at {size}"
        if reason:  # outside the except clause: the failed attempt's tensors are released by now
            del batch
            free_memory()
            break
        peaks[size] = torch.cuda.max_memory_allocated(device)
        if peaks[size] > budget:
            reason = f"{size} peaks at {peaks[size] / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB budget"
            break
        best = size
    if best == 0:
        raise TrainingError(
            f"even a micro-batch of 1 does not fit in {budget / 2**30:.1f} GiB ({reason}; the budget leaves room for "
            "the reserve and the optimizer state); use precision bf16/fp16, model.gradient_checkpointing, a frozen "
            "tower or LoRA, or lower train.memory_reserve_gb"
        )
    why = f"largest size within {total / 2**30:.1f} GiB minus {reserve / 2**30:.1f} GiB (reserve, optimizer state)" + (
        f" ({reason})" if reason else ""
    )
    return ProbeResult(best, why, peaks)


def _probe_cpu(setup: _Setup, local_batch: int, reserve: int) -> ProbeResult:
    """On a CPU splitting a batch never speeds it up (it adds a forward pass), so the full local batch is used when
    its memory fits. Peak resident memory is measured at two small sizes and extrapolated linearly (running the
    full batch just to find out could get the process killed by the kernel's OOM killer)."""
    sizes = sorted({min(4, local_batch), min(8, local_batch)})
    measured = {size: _cpu_step_peak(setup, size) for size in sizes}
    peaks = {size: peak for size, (peak, _) in measured.items()}
    per_pair = max(0.0, (peaks[sizes[-1]] - peaks[sizes[0]]) / max(1, sizes[-1] - sizes[0]))
    listing = ", ".join(f"{s}: {p / 2**30:.2f} GiB, {v:.0f} pairs/s" for s, (p, v) in measured.items())
    available = available_memory_bytes()
    if available is None:
        return ProbeResult(local_batch, f"free memory unknown: the full batch (measured {listing})", peaks)
    budget = available - reserve  # how much more this process may grow beyond the measured peak
    micro = local_batch
    while micro > sizes[-1] and per_pair * (micro - sizes[-1]) > budget:
        micro //= 2
    predicted = peaks[sizes[-1]] + per_pair * (micro - sizes[-1])
    why = (
        f"{'the full batch' if micro == local_batch else 'largest size'} within free memory: ~{predicted / 2**30:.1f} GiB "
        f"predicted, {available / 2**30:.1f} GiB available, {reserve / 2**30:.1f} GiB kept for the reserve and the "
        f"optimizer state (measured {listing})"
    )
    return ProbeResult(micro, why, peaks)


def _cpu_step_peak(setup: _Setup, size: int) -> tuple[int, float]:
    """Peak resident memory (bytes) and pairs/s of one forward+backward step of ``size`` pairs."""
    batch = setup.batch(size)
    reset_peak_rss()
    t0 = time.perf_counter()
    setup.step(batch)
    return peak_rss_bytes(), size / (time.perf_counter() - t0)


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
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes of one run write the same value side by side
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        log.debug("micro-batch cache not written: %s", e)
