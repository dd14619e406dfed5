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
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.collate import Batch
from ..errors import TrainingError
from ..loss import Objective
from ..memory import available_memory_bytes, free_memory, is_oom, peak_rss_bytes, reset_peak_rss
from ..model import DualEncoder
from ..paths import default_cache_dir
from .step import embed_pair, step_parameters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    micro_batch_size: int
    reason: str
    peak_bytes: dict[int, int]  # micro-batch size -> measured peak (CUDA: allocated; CPU: resident)
    step_seconds: dict[int, float] = field(default_factory=dict)  # size -> one forward+backward step's seconds


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
    world_size: int = 1,
    memory_cap_bytes: int | None = None,
) -> ProbeResult:
    """Choose the micro-batch by running real forward+backward steps on this model, precision and image size.

    CUDA: the largest size whose step fits in the memory this process can get now (``CudaMemory.budget``: free
    memory as the device sees it, after the reserve, ``state_bytes`` of optimizer state not yet allocated (see
    ``optimizer_state_bytes``) and, with ``world_size`` > 1, NCCL's buffers and the flat gradient copy of the
    cross-process sum); a step needs its peak allocation plus the fragmentation it showed (an OOM ends the search).
    CPU: the full local batch when its (extrapolated) peak resident memory leaves the same free, else the largest
    power-of-two fraction of it that does: on a CPU splitting only adds work; ``memory_cap_bytes`` caps the
    resident memory there (the trial's --memory-cap; on CUDA a cap is ``set_per_process_memory_fraction``, read
    here). ``agree`` turns this process's answer into the one all processes use (0 means "not even 1 fits here");
    that agreed size is cached under ``cache_key``.
    """
    cached = _read_cache(cache_key)
    if cached is not None:
        result = ProbeResult(min(cached, local_batch), f"cached for {cache_key}", {})
    else:
        extra = Extra(state_bytes, world_size, _trainable_bytes(encoder, objective) if world_size > 1 else 0)
        try:
            result = _probe(encoder, objective, local_batch, device, autocast, reserve_bytes, extra, memory_cap_bytes)
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
        result = ProbeResult(
            agreed,
            f"the smallest of all processes' sizes (here: {result.reason})",
            result.peak_bytes,
            result.step_seconds,
        )
    _write_cache(cache_key, agreed)
    return result


def device_key(device: torch.device) -> str:
    """How the cache tells devices apart: the name, and on CUDA the total memory and a memory cap too (the 8 GB and
    12 GB RTX 3060 share a name; an emulated smaller card is another card)."""
    if device.type != "cuda":
        return platform.processor() or "cpu"
    props = torch.cuda.get_device_properties(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    return f"{props.name} {props.total_memory} B" + (f" capped at {fraction:g}" if fraction < 1.0 else "")


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


@dataclass(frozen=True)
class Extra:
    """What a training step will hold besides what one probing step measures."""

    state_bytes: int = 0  # optimizer state, created at the first optimizer step
    world_size: int = 1
    flat_grad_bytes: int = 0  # step.sum_gradients_across_processes: one flat copy of the gradients (world > 1)


def _trainable_bytes(encoder: DualEncoder, objective: Objective) -> int:
    """Bytes of the gradients a step sums across processes (the flat copy in ``sum_gradients_across_processes``)."""
    return sum(p.numel() * p.element_size() for p in step_parameters(encoder.model, objective) if p.requires_grad)


def _probe(
    encoder: DualEncoder,
    objective: Objective,
    local_batch: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    reserve_bytes: int,
    extra: Extra = Extra(),
    memory_cap_bytes: int | None = None,
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
            result = _probe_cuda(setup, local_batch, reserve_bytes, extra)
        else:
            result = _probe_cpu(setup, local_batch, reserve_bytes + extra.state_bytes, memory_cap_bytes)
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


# Memory a CUDA process holds outside PyTorch's allocator, where free memory does not show it already: the CUDA
# context (kernels, cuBLAS/cuDNN handles: 0.3-0.6 GB) under an emulated smaller card, NCCL's buffers and
# communicators with several processes (a few hundred MB per process at its defaults).
CUDA_CONTEXT_BYTES = 512 * 2**20
NCCL_BYTES = 512 * 2**20
# Fragmentation a long run adds beyond what one probing step shows (batches change shape every step): at least this
# fraction of the step's peak allocation is kept free on top of the (reserved - allocated) the step showed.
FRAGMENTATION_FLOOR = 0.05


@dataclass(frozen=True)
class CudaMemory:
    """The memory facts of a CUDA device as this process sees them now (bytes)."""

    total: int  # the device's memory
    free: int  # free on the device (torch.cuda.mem_get_info): other processes, the display, our context excluded
    reserved: int  # held by this process's caching allocator (free for our tensors, not for the device)
    allocated: int  # in this process's live tensors
    cap: int | None = None  # torch.cuda.set_per_process_memory_fraction's cap on our allocator (an emulated card)

    @classmethod
    def now(cls, device: torch.device) -> CudaMemory:
        free, total = torch.cuda.mem_get_info(device)
        # torch >= 2.6 can say what set_per_process_memory_fraction set; before, no cap is known
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
        return cls(
            total=int(total),
            free=int(free),
            reserved=int(torch.cuda.memory_reserved(device)),
            allocated=int(torch.cuda.memory_allocated(device)),
            cap=int(total * fraction) if fraction < 1.0 else None,
        )

    @property
    def capacity(self) -> int:
        """The most this process's allocator can hold: what it holds plus what is free now, within a cap (whose card
        would hold our CUDA context too)."""
        room = self.free + self.reserved
        return room if self.cap is None else min(room, self.cap - CUDA_CONTEXT_BYTES)

    def budget(self, reserve: int, extra: Extra) -> int:
        """Bytes a step's peak (allocation plus fragmentation) may reach: the capacity after the user's reserve, the
        optimizer state to come, and with several processes NCCL and the flat gradient copy."""
        distributed = NCCL_BYTES + extra.flat_grad_bytes if extra.world_size > 1 else 0
        return self.capacity - reserve - extra.state_bytes - distributed


def step_need(peak_allocated: int, peak_reserved: int) -> int:
    """What a step of this measured peak needs from the device: its allocation plus the fragmentation it showed
    (peak reserved - peak allocated), at least ``FRAGMENTATION_FLOOR`` of the allocation."""
    return peak_allocated + max(peak_reserved - peak_allocated, int(FRAGMENTATION_FLOOR * peak_allocated))


def _probe_cuda(setup: _Setup, local_batch: int, reserve: int, extra: Extra = Extra()) -> ProbeResult:
    device = setup.device
    free_memory()
    memory = CudaMemory.now(device)
    budget = memory.budget(reserve, extra)
    peaks: dict[int, int] = {}
    seconds: dict[int, float] = {}
    best, reason = 0, ""
    for size in _candidates(local_batch):
        batch = setup.batch(size)
        free_memory()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            t0 = time.perf_counter()
            setup.step(batch)
            torch.cuda.synchronize(device)
            seconds[size] = time.perf_counter() - t0
        except RuntimeError as e:  # torch.OutOfMemoryError, or a backend's RuntimeError saying so
            if not is_oom(e):
                raise
            reason = f"out of memory at {size}"
        if reason:  # outside the except clause: the failed attempt's tensors are released by now
            del batch
            free_memory()
            break
        peaks[size] = torch.cuda.max_memory_allocated(device)
        need = step_need(peaks[size], torch.cuda.max_memory_reserved(device))
        if need > budget:
            reason = f"{size} needs {need / 2**30:.2f} GiB, over the {budget / 2**30:.2f} GiB budget"
            break
        best = size
    kept = _kept(memory, reserve, extra)
    if best == 0:
        raise TrainingError(
            f"even a micro-batch of 1 does not fit: {memory.capacity / 2**30:.2f} GiB usable here ({kept}) leaves "
            f"{budget / 2**30:.2f} GiB ({reason}); use precision bf16/fp16, model.gradient_checkpointing, a frozen "
            "tower or LoRA, or lower train.memory_reserve_gb"
        )
    why = f"largest size within {memory.capacity / 2**30:.1f} GiB usable minus {kept}" + (
        f" ({reason})" if reason else ""
    )
    return ProbeResult(best, why, peaks, {k: v for k, v in seconds.items() if k <= best})


def _kept(memory: CudaMemory, reserve: int, extra: Extra) -> str:
    """What the budget keeps free, in words (the log line and the error)."""
    usable = f"{memory.free / 2**30:.1f} GiB free + {memory.reserved / 2**30:.1f} GiB held" + (
        f", capped at {memory.cap / 2**30:.1f} GiB less the CUDA context" if memory.cap is not None else ""
    )
    parts = [f"reserve {reserve / 2**30:.1f} GiB", f"optimizer state {extra.state_bytes / 2**30:.2f} GiB"]
    if extra.world_size > 1:
        parts += [f"NCCL {NCCL_BYTES / 2**30:.1f} GiB", f"flat gradient copy {extra.flat_grad_bytes / 2**30:.2f} GiB"]
    return f"{', '.join(parts)}; usable = {usable}"


def _probe_cpu(setup: _Setup, local_batch: int, reserve: int, cap: int | None = None) -> ProbeResult:
    """On a CPU splitting a batch never speeds it up (it adds a forward pass), so the full local batch is used when
    its memory fits. Peak resident memory is measured at two small sizes and extrapolated linearly (running the
    full batch just to find out could get the process killed by the kernel's OOM killer). ``cap``: the resident
    memory the process may reach (an emulated smaller machine); a cap that not even one pair fits is an error."""
    sizes = sorted({min(4, local_batch), min(8, local_batch)})
    measured = {size: _cpu_step_peak(setup, size) for size in sizes}
    peaks = {size: peak for size, (peak, _) in measured.items()}
    per_pair = max(0.0, (peaks[sizes[-1]] - peaks[sizes[0]]) / max(1, sizes[-1] - sizes[0]))
    listing = ", ".join(f"{s}: {p / 2**30:.2f} GiB, {v:.0f} pairs/s" for s, (p, v) in measured.items())
    available = available_memory_bytes()
    if cap is not None:  # the process may grow to the cap at most (and never beyond what the machine has)
        room = cap - peaks[sizes[-1]]
        available = room if available is None else min(available, room)
    seconds = {size: size / rate for size, (_, rate) in measured.items()}
    if available is None:
        return ProbeResult(local_batch, f"free memory unknown: the full batch (measured {listing})", peaks, seconds)
    budget = available - reserve  # how much more this process may grow beyond the measured peak

    def predicted(micro: int) -> float:
        return peaks[sizes[-1]] + per_pair * (micro - sizes[-1])

    micro = local_batch
    while micro > 1 and predicted(micro) - peaks[sizes[-1]] > budget:
        micro //= 2
    if cap is not None and predicted(micro) - peaks[sizes[-1]] > budget:
        raise TrainingError(
            f"even a micro-batch of 1 does not fit under the memory cap of {cap / 2**30:.2f} GiB: this process "
            f"needs ~{predicted(1) / 2**30:.2f} GiB resident at 1 pair plus {reserve / 2**30:.2f} GiB kept for the "
            f"reserve and the optimizer state (measured {listing}); raise the cap, or use a smaller model or image size"
        )
    where = f"{available / 2**30:.1f} GiB available" + (f" under the {cap / 2**30:.1f} GiB cap" if cap else "")
    why = (
        f"{'the full batch' if micro == local_batch else 'largest size'} within free memory: ~{predicted(micro) / 2**30:.1f} GiB "
        f"predicted, {where}, {reserve / 2**30:.1f} GiB kept for the reserve and the "
        f"optimizer state (measured {listing})"
    )
    return ProbeResult(micro, why, peaks, seconds)


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
