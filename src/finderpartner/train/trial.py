"""``finderpartner trial``: a minute of real training on this machine, before committing a night to it.

Does this config fit, at which micro-batch, how fast, and when would the run end? The trial builds the configured
model (a hub model whose weights cannot be fetched is measured as its architecture, ``arch:<name>``, with random
weights: the same shapes, so the same speed and memory; it says so), probes the micro-batch as training does, and
runs the trainer's own step (``recipe._train_step``: the gradient cache, the objective, AdamW, clipping, fp16 loss
scaling, the OOM retry) on the configured data when it is there, else on synthetic batches of the model's image
size and full-length captions, until ``seconds`` after it started (setup included; at least two steps). It
reports the device and precision, the micro-batch and contrastive batch, pairs per second, peak memory, MFU against
the device's peak, and the time of an epoch and of the configured schedule.

It writes nothing: no run folder, no probe cache, no tokenizer, no tracker. ``--memory-cap`` emulates a smaller
GPU (``torch.cuda.set_per_process_memory_fraction``); on a CPU it caps the resident memory the micro-batch probe
may plan for (it cannot limit allocations). ``--inject-oom`` makes one step run out of memory (on a GPU a real
failed allocation, on a CPU a raised ``torch.OutOfMemoryError``) and shows the recovery. Ctrl-C or SIGTERM stops
the measurement; what was measured is reported.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import HUB_ARCHITECTURES, TOWERS, Config
from ..data.collate import Batch
from ..data.sample import COMBOS, TEMPLATES
from ..data.shards import expand_shards
from ..data.sources import Passes, open_training_data
from ..env import (
    autocast_factory,
    configure_cuda_allocator,
    cpu_cores,
    cpu_kind,
    hub_reachable,
    in_hf_cache,
    resolve_device,
    resolve_precision,
)
from ..errors import ModelError, UsageError
from ..loss import build_objective
from ..memory import free_memory, peak_rss_bytes, reset_peak_rss
from ..model import DualEncoder, build_arch, build_model
from ..progress import Progress, format_duration
from . import step as step_module
from .budget import Plan
from .recipe import (
    Run,
    TrainState,
    _effective_batch,
    _loading,
    _prepare_model,
    _train_step,
    _Window,
    probe_run,
)
from .step import build_optimizer, build_scheduler, embed_pair
from .tracking import Trackers
from .trial_report import GiB, cpu_peak_flops, gpu_peak_flops

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------


# The trial measures the configured batch unless one of its steps would take longer than this and a third of the
# time left (then a smaller one: see _Trial._measurable).
MIN_STEP_S = 10.0
REPORT_S = 2.0  # kept at the end of the trial's time for the report (the CPU's matmul peak) and the loader's exit


# --------------------------------------------------------------------------------------------------------------
# The trial


@dataclass
class _Synthetic:
    """A batch source of one synthetic batch, repeated: random pixels, full-length captions (the worst case)."""

    batch: Batch
    num_rows: int
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        return len(self.batch)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_rows // self.global_batch)

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.steps_per_epoch):
            yield self.batch


def synthetic_batch(encoder: DualEncoder, size: int, device: torch.device) -> Batch:
    """``size`` pairs of the model's image size and context length: random pixels, captions of random tokens that
    use the whole context and end with the end-of-text token (pinned on CUDA, as the trainer's loader pins)."""
    g = torch.Generator().manual_seed(0)
    crop, length = encoder.image_spec.crop, encoder.context_length
    vocab = int(encoder.model.config.text_config.vocab_size)
    tok = encoder.tokenizer
    eos = next((t for t in (tok.eos_token_id, tok.sep_token_id) if t is not None), vocab - 1)
    ids = torch.randint(3, max(4, vocab), (size, length), generator=g)
    ids[:, -1] = int(eos)
    batch = Batch(
        torch.arange(size),
        torch.randint(0, 256, (size, 3, crop, crop), dtype=torch.uint8, generator=g),
        ids,
        torch.ones_like(ids),
    )
    return batch.pin_memory() if device.type == "cuda" else batch


def _synthetic_captions() -> list[str]:
    """Captions to learn the tiny model's tokenizer from when the configured data is not there."""
    return [template(*combo) for combo in COMBOS for template in TEMPLATES]


def data_present(cfg: Config) -> bool:
    """Whether the configured training data is there to read (a folder's caption file, or local shards)."""
    if cfg.data.format == "webdataset":
        urls = expand_shards(cfg.data.train_shards or "")
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        return bool(urls) and all(Path(u).is_file() for u in local)
    return (cfg.data.root / f"captions_{cfg.data.train_split}.csv").is_file()


def build_encoder(cfg: Config, captions: list[str] | None) -> tuple[DualEncoder, str]:
    """The configured model, and how it was built. A hub model of a public shape (``config.HUB_ARCHITECTURES``)
    whose weights cannot be fetched is built as that architecture with random weights; any other model that cannot
    be loaded is a ModelError saying how to measure its shape instead."""
    m = cfg.model
    if m.is_tiny or m.arch is not None:
        return build_model(m, captions=captions, seed=cfg.seed), "built from the config, random weights"
    if m.name == TOWERS:
        return build_model(m, captions=captions, seed=cfg.seed), "towers assembled as configured"
    arch = HUB_ARCHITECTURES.get(m.name)
    local = Path(m.name).expanduser().is_dir()
    if arch is not None and not local and not _cached(m.name) and not hub_reachable():
        reason = "not in the Hugging Face cache, and the hub cannot be reached"
        return _as_arch(cfg, arch, captions, reason)
    try:
        return build_model(m, captions=captions, seed=cfg.seed), "pretrained weights"
    except ModelError as e:
        if arch is None:
            raise ModelError(
                f"{e} The trial measures the configured model; for a CLIP of a public shape without its weights, "
                "use --set model.name=arch:ViT-B-32 (or arch:ViT-B-16, arch:ViT-L-14)"
            ) from None
        return _as_arch(cfg, arch, captions, str(e).splitlines()[0])


def _cached(name: str) -> bool:
    try:
        return in_hf_cache(name)
    except ImportError:
        return False


def _as_arch(cfg: Config, arch: str, captions: list[str] | None, reason: str) -> tuple[DualEncoder, str]:
    log.warning(
        "%s: the weights cannot be fetched (%s); measuring its architecture arch:%s with random weights instead "
        "(the same shapes: the same speed and memory)",
        cfg.model.name,
        reason,
        arch,
    )
    encoder = build_arch(arch, seed=cfg.seed, captions=captions)
    return encoder, f"its architecture arch:{arch} with random weights: the weights cannot be fetched ({reason})"


def run_trial(
    cfg: Config,
    *,
    seconds: float = 60.0,
    memory_cap: int | None = None,
    inject_oom: bool = False,
    progress: bool = True,
    config_name: str = "",
    started: float | None = None,
) -> dict[str, Any]:
    """Run real training steps of ``cfg`` on this machine until ``seconds`` after the start (setup included; at
    least a warm-up step and a measured one); the report as plain data.

    ``memory_cap``: bytes (a smaller GPU, emulated; on a CPU the probe's resident-memory limit). Raises
    TrainingError when not even one pair fits. Stops early, with ``interrupted`` set, on Ctrl-C or SIGTERM once a
    step was measured (before that, KeyboardInterrupt propagates). ``started``: the ``time.perf_counter()`` the
    trial's time counts from (default: now).
    """
    if not seconds > 0:
        raise UsageError(f"--seconds must be positive (got {seconds:g})")
    configure_cuda_allocator()  # before CUDA starts
    started = time.perf_counter() if started is None else started
    with _sigterm_as_interrupt():
        trial = _Trial(cfg, started, seconds, memory_cap, inject_oom, progress, config_name)
        trial.setup()
        trial.measure()
        return trial.report(time.perf_counter() - started)


class _Trial:
    """The trial's state from setup to report (one object: the steps share the run, the batches and the notes)."""

    def __init__(
        self,
        cfg: Config,
        started: float,
        seconds: float,
        memory_cap: int | None,
        inject_oom: bool,
        progress: bool,
        name: str,
    ) -> None:
        self.seconds, deadline = seconds, started + seconds
        # The trial validates nothing: a missing validation split must not stop it.
        self.cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_split": "", "val_shards": None})})
        self.name, self.deadline, self.memory_cap = name, deadline, memory_cap
        self.inject, self.progress = inject_oom, progress
        self.notes: list[str] = []
        self.times: list[float] = []
        self.oom: dict[str, Any] | None = None
        self.interrupted = False
        self.flops_per_pair: float | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Setup: the same building blocks as train.setup, minus everything that writes

    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        t0 = time.perf_counter()
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.cpu_cap = self._apply_cap()
        set_seed(cfg.seed)
        self.data = None
        if data_present(cfg):
            # the captions of shards are read only for a model that learns its tokenizer from them (as train)
            built = cfg.model.is_tiny or cfg.model.arch is not None or cfg.model.name in HUB_ARCHITECTURES
            self.data = open_training_data(cfg.data, Passes.of(cfg.train), need_captions=built, progress=self.progress)
        else:
            where = cfg.data.train_shards if cfg.data.format == "webdataset" else cfg.data.root
            self.notes.append(
                f"the configured data ({where}) is not there: synthetic batches of random pixels and full-length "
                "captions (the worst case for the text tower)"
            )
        captions = self.data.captions if self.data is not None and self.data.captions else _synthetic_captions()
        self.encoder, self.built = build_encoder(cfg, captions)
        model = _prepare_model(self.encoder, cfg, self.device, self.precision)
        self.params = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows = self.data.num_rows if self.data is not None else cfg.train.batch_size
        self.global_batch = _effective_batch(cfg.train.batch_size, rows, 1)
        self.steps_per_epoch = max(1, rows // self.global_batch)
        self.plan = Plan.from_config(cfg.train, self.steps_per_epoch, time.perf_counter())
        objective = build_objective(cfg.train.loss, model, record=self.encoder.objective_record)
        optimizer = build_optimizer(model, objective, cfg)
        scheduler = build_scheduler(
            optimizer,
            self.plan.warmup_now if self.plan.budget_s else self.plan.warmup,
            self.plan.total_now,
            cfg.train.min_lr_ratio,
        )
        placeholder = _Synthetic(synthetic_batch(self.encoder, self.global_batch, torch.device("cpu")), rows)
        self.run = Run(
            cfg,
            None,  # no Accelerator: one process, no trackers
            self.device,
            self.precision,
            self.encoder,
            objective,
            optimizer,
            scheduler,
            torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16"),
            placeholder,
            placeholder,  # type: ignore[arg-type]  # batches are iterated, a DataLoader or not
            None,
            Trackers(),
            TrainState(),
            self.plan,
        )
        self.probe = None
        if cfg.train.micro_batch_size == "auto":
            self.probe = self._probe()
            self.micro = self.probe.micro_batch_size
        else:
            self.micro = min(int(cfg.train.micro_batch_size), self.global_batch)
        self.measured_batch, self.measured_micro = self._measurable()
        self.run.state.micro_batch_size = self.measured_micro
        if self.data is not None:
            self.run.batches, self.run.loader = self.data.batches(
                _loading(cfg, self.encoder, self.measured_batch, 0, 1, self.device)
            )
        else:
            batch = synthetic_batch(self.encoder, self.measured_batch, self.device)
            self.run.batches = self.run.loader = _Synthetic(batch, rows)  # type: ignore[assignment]
        self.setup_s = time.perf_counter() - t0

    def _apply_cap(self) -> int | None:
        """Emulate a smaller card (CUDA); on a CPU return the cap for the probe."""
        cap = self.memory_cap
        if cap is None:
            return None
        if self.device.type != "cuda":
            self.notes.append(
                f"--memory-cap {cap / GiB:.2f} GiB on a CPU caps the resident memory the micro-batch probe plans for "
                "(it cannot limit allocations)"
            )
            return cap
        total = torch.cuda.get_device_properties(self.device).total_memory
        if cap >= total:
            self.notes.append(f"--memory-cap {cap / GiB:.2f} GiB is not below this card's {total / GiB:.2f} GiB")
            return None
        torch.cuda.set_per_process_memory_fraction(cap / total, self.device)
        self.notes.append(
            f"--memory-cap: this process may allocate {cap / GiB:.2f} GiB of the card's {total / GiB:.2f} GiB "
            "(torch.cuda.set_per_process_memory_fraction), as on a card of that size"
        )
        return None

    def _probe(self) -> Any:
        result = probe_run(self.run, self.global_batch, cache=False, memory_cap_bytes=self.cpu_cap)
        log.info("micro-batch %d of %d: %s", result.micro_batch_size, self.global_batch, result.reason)
        return result

    def _measurable(self) -> tuple[int, int]:
        """The contrastive batch and micro-batch to measure: the configured ones, unless one step of them would take
        longer than a third of the time left and ``MIN_STEP_S`` (a large batch on a CPU); then smaller ones that keep
        whether the gradient cache runs (its extra forward pass is part of the cost per pair)."""
        batch, micro = self.global_batch, self.micro
        timed = self.probe.step_seconds if self.probe is not None else {}
        if not timed:
            return batch, micro
        size = max(timed)
        per_pair = timed[size] / size * (4 / 3 if micro < batch else 1)  # the gradient cache: one more forward
        # a third of the time left (a warm-up and 2 measured steps), never under 10 s nor a sixth of the trial: a
        # slow setup or a short trial must not shrink the batch to nothing
        per_step = max((self.deadline - time.perf_counter()) / 3, self.seconds / 6, MIN_STEP_S)
        target = per_step / per_pair
        if batch <= target:
            return batch, micro
        # never below the probe's size: the cost per pair was measured there (smaller products run less efficiently)
        fit = max(size, 2 ** max(1, int(math.log2(max(2, target)))))
        if micro < batch:
            small_micro = max(1, min(micro, fit // 2))
            small = (min(batch, 2 * small_micro), small_micro)
        else:
            small = (min(batch, fit), min(batch, fit))
        self.notes.append(
            f"one step of the contrastive batch {batch} would take ~{format_duration(batch * per_pair)} here: measured "
            f"at contrastive batch {small[0]}, micro-batch {small[1]}"
            + (" (the gradient cache kept)" if micro < batch else "")
            + ". The cost per pair hardly depends on the batch beyond the towers' matrix products, which run somewhat "
            "more efficiently at the configured size: the projections are on the pessimistic side"
        )
        return small

    # ----------------------------------------------------------------------------------------------------------
    # Measurement

    def measure(self) -> None:
        run, device = self.run, self.device
        batches = self._forever()
        window = _Window()
        first = next(batches)
        self.flops_per_pair = self._count_flops(first)
        free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
        bar = Progress(desc="trial", unit="step", disable=not self.progress)
        log.info(
            "measuring training steps for %s (at least 2, 3 with --inject-oom): contrastive batch %d, micro-batch %d, "
            "%s on %s",
            format_duration(max(0.0, self.deadline - time.perf_counter())),
            self.measured_batch,
            self.measured_micro,
            self.precision,
            device,
        )
        batch: Batch | None = first
        min_steps = 3 if self.inject else 2  # a warm-up step, (the injected OOM's,) one measured
        try:
            while True:
                t0 = time.perf_counter()
                if batch is None:
                    batch = next(batches)
                with self._maybe_oom(len(self.times)):
                    _train_step(run, batch, window)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                batch = None
                now = time.perf_counter()
                self.times.append(now - t0)
                bar.update(1)
                bar.set_postfix(pairs_s=f"{self.measured_batch / self.times[-1]:.1f}")
                if len(self.times) >= min_steps and now + self.times[-1] + REPORT_S > self.deadline:  # next: too late
                    break
        except (KeyboardInterrupt, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _worker_stopped(e):
                raise
            if not self.times:
                raise KeyboardInterrupt from None
            self.interrupted = True
            log.warning("interrupted: reporting the %d step(s) measured", len(self.times))
        finally:
            bar.close()
            self._stop_loader(batches)
        self._peaks()

    def _stop_loader(self, batches: Iterator[Batch]) -> None:
        """End the loader's worker processes now (persistent workers outlive their iterator otherwise), so that a
        worker stopped by the same SIGTERM is not reported as a failure later."""
        iterator = getattr(self.run.loader, "_iterator", None)  # a DataLoader with persistent workers keeps it
        for _ in range(4):  # each stopped worker may interrupt this once
            try:
                batches.close()  # type: ignore[attr-defined]
                if hasattr(iterator, "_shutdown_workers"):
                    iterator._shutdown_workers()  # here, not in __del__, where an error would only be printed
                self.run.loader = None  # type: ignore[assignment]
                gc.collect()
                return
            except RuntimeError as e:
                if not _worker_stopped(e):
                    raise

    def _forever(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            self.run.batches.set_position(epoch, 0)
            yield from self.run.loader
            epoch += 1

    def _count_flops(self, batch: Batch) -> float | None:
        """FLOPs of one forward+backward per pair (torch's FlopCounterMode over a few pairs of the first batch):
        model FLOPs, without the gradient cache's extra forward pass."""
        try:
            from torch.utils.flop_counter import FlopCounterMode
        except ImportError:
            return None
        run = self.run
        k = 1  # FLOPs grow linearly with the pairs; one pair of the batch keeps its padded caption length
        part = batch.split(k)[0].to(self.device)
        counter = FlopCounterMode(display=False)
        rng = step_module.capture_rng()
        with counter:
            with autocast_factory(self.device, self.precision)():
                image, text = embed_pair(run.encoder, part)
            run.objective.loss(image, text).backward()
        step_module.restore_rng(rng)
        run.model.zero_grad(set_to_none=True)
        run.objective.zero_grad(set_to_none=True)
        return counter.get_total_flops() / k

    @contextlib.contextmanager
    def _maybe_oom(self, index: int) -> Iterator[None]:
        """With --inject-oom: one out-of-memory error inside step 1 (after the warm-up step), mid-step."""
        if not self.inject or index != 1 or self.oom is not None:
            yield
            return
        micro = self.run.state.micro_batch_size
        if micro <= 1:
            self.oom = {"injected": False, "why": "the micro-batch is already 1: an out-of-memory error would stop "
                        "training (exit 7), there is nothing to halve"}  # fmt: skip
            yield
            return
        chunks = math.ceil(self.measured_batch / micro)
        at_call = chunks + 1 if chunks > 1 else 1  # gradient cache: pass 2's first micro-batch, after the loss
        where = "in pass 2 of the gradient cache (after the loss)" if chunks > 1 else "in the forward pass"
        real, calls = step_module.embed_pair, [0]

        def failing(encoder: DualEncoder, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            calls[0] += 1
            if calls[0] == at_call:
                _out_of_memory(self.device)
            return real(encoder, batch)

        step_module.embed_pair = failing  # the hook tests use too: the step looks the function up at each call
        t0 = time.perf_counter()
        try:
            yield
        finally:
            step_module.embed_pair = real
        self.oom = {
            "injected": True,
            "at_step": index,
            "where": where,
            "how": "a real failed CUDA allocation" if self.device.type == "cuda" else "a raised torch.OutOfMemoryError",
            "micro_batch_before": micro,
            "micro_batch_after": self.run.state.micro_batch_size,
            "recovered": self.run.state.micro_batch_size < micro,
            "step_s": time.perf_counter() - t0,
        }

    def _peaks(self) -> None:
        if self.device.type == "cuda":
            self.peak = {
                "allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        else:
            self.peak = {"rss_bytes": peak_rss_bytes()}

    # ----------------------------------------------------------------------------------------------------------
    # Report

    def report(self, total_s: float) -> dict[str, Any]:
        cfg = self.cfg
        measured, warmup = self._measured_times()
        rate = self.measured_batch * len(measured) / sum(measured) if measured else None
        return {
            "config": self.name,
            "device": self._device(),
            "precision": self.precision,
            "model": {
                "name": cfg.model.name,
                "built": self.built,
                "parameters": self.params,
                "trainable": self.trainable,
                "image_size": self.encoder.image_spec.crop,
                "context_length": self.encoder.context_length,
            },
            "data": self._data(),
            "batch": {
                "contrastive": self.global_batch,
                "micro": self.micro,
                "probe": self.probe.reason if self.probe is not None else "train.micro_batch_size (not probed)",
                "measured_contrastive": self.measured_batch,
                "measured_micro": self.measured_micro,
                "gradient_cache": self.measured_micro < self.measured_batch,
            },
            "memory_cap_bytes": self.memory_cap,
            "measurement": {
                "seconds": self.seconds,  # the time asked for, setup included
                "steps": len(self.times),
                "warmup_steps": warmup,
                "measured_steps": len(measured),
                "samples_per_s": rate,
                "step_s": statistics.median(measured) if measured else None,
                "setup_s": self.setup_s,
                "total_s": total_s,
                "micro_batch_at_end": self.run.state.micro_batch_size,
            },
            "peak_memory": self.peak,
            "flops": self._flops(rate),
            "projection": self._projection(rate),
            "oom": self.oom,
            "interrupted": self.interrupted,
            "notes": self.notes,
        }

    def _measured_times(self) -> tuple[list[float], int]:
        """Step times after the warm-up step, the injected OOM's step left out (the first alone if it is all), and
        how many warm-up steps were left out."""
        skip = {1} if self.oom and self.oom.get("injected") else set()
        times = [t for i, t in enumerate(self.times) if i not in skip]
        if len(times) >= 2:
            return times[1:], 1
        if times:
            self.notes.append("only one step fit in the time: its time includes the warm-up (allocations, kernels)")
        return times, 0

    def _device(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            return {
                "type": "cuda",
                "name": props.name,
                "memory_bytes": props.total_memory,
                "compute_capability": f"{props.major}.{props.minor}",
            }
        return {"type": "cpu", "name": cpu_kind()["name"], "cores": cpu_cores(), "threads": torch.get_num_threads()}

    def _data(self) -> dict[str, Any]:
        if self.data is None:
            return {"source": "synthetic", "pairs_per_epoch": None}
        d = self.cfg.data
        where = d.train_shards if d.format == "webdataset" else f"{d.root} ({d.train_split})"
        return {"source": str(where), "pairs_per_epoch": self.data.num_rows}

    def _flops(self, rate: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"per_pair": self.flops_per_pair, "achieved": None, "peak": None, "mfu": None}
        if self.device.type == "cuda":
            name = torch.cuda.get_device_properties(self.device).name
            tf32 = torch.get_float32_matmul_precision() != "highest"
            out["peak"] = gpu_peak_flops(name, self.precision, tf32)
            out["peak_source"] = (
                f"datasheet, dense {'tf32' if self.precision == 'fp32' and tf32 else self.precision}"
                if out["peak"]
                else f"unknown: {name} is not in the table of GPU peaks"
            )
        else:
            out["peak"] = cpu_peak_flops(self.precision)
            out["peak_source"] = (
                f"measured {self.precision} matmul rate of this CPU on {torch.get_num_threads()} threads (an estimate; "
                "lower while other processes share the cores)"
            )
        if rate is not None and self.flops_per_pair:
            out["achieved"] = rate * self.flops_per_pair
            out["mfu"] = out["achieved"] / out["peak"] if out["peak"] else None
        return out

    def _projection(self, rate: float | None) -> dict[str, Any]:
        """Training time at the measured rate: steps only (validation, checkpoints and setup come on top)."""
        if not rate:
            return {}
        batch = self.global_batch
        out: dict[str, Any] = {"per_10k_pairs_s": 10_000 / rate}
        if self.data is None:
            return out
        epoch_s = self.steps_per_epoch * batch / rate
        out.update(epoch_s=epoch_s, steps_per_epoch=self.steps_per_epoch)
        train = self.cfg.train
        if self.plan.budget_s is not None:
            steps = int(self.plan.budget_s * rate / batch)
            if train.max_steps:
                steps = min(steps, train.max_steps)
            out.update(
                schedule="time_budget",
                schedule_steps=steps,
                schedule_epochs=steps / self.steps_per_epoch,
                schedule_s=min(self.plan.budget_s, steps * batch / rate),
            )
        else:
            steps = self.plan.total
            out.update(
                schedule="max_steps" if train.max_steps else "epochs",
                schedule_steps=steps,
                schedule_epochs=steps / self.steps_per_epoch,
                schedule_s=steps * batch / rate,
            )
        return out


def _worker_stopped(error: RuntimeError) -> bool:
    """A DataLoader worker ended by a signal: the SIGTERM (or Ctrl-C) that reached its whole process group."""
    text = str(error)
    return "DataLoader worker" in text and ("signal: Terminated" in text or "signal: Interrupt" in text)


def _out_of_memory(device: torch.device) -> None:
    """Fail as the allocator fails: on CUDA ask it for twice the card (a real OutOfMemoryError, through the caching
    allocator's own path); a CPU allocation does not fail that way (the kernel overcommits), so raise one."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.empty(2 * total, dtype=torch.uint8, device=device)
    raise torch.OutOfMemoryError("out of memory (injected by --inject-oom)")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, `kill`) stops the trial as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
