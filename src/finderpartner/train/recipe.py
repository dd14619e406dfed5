"""The training loop, on HF Accelerate, one readable function per phase.

``train(cfg)`` = set up (run folder, data, model, optimizer, resume) -> for each epoch: steps, then
validation and the best model -> final checkpoint and summary. A step is one contrastive batch: the
gradient cache (``step.py``) makes its result independent of the micro-batch, and a CUDA OOM halves the
micro-batch and redoes the same step. Gradients are summed across processes explicitly (the model is not
wrapped in DDP) because each process already holds the full derivative of the global loss for its features.
The objective (``loss.py``, ``train.loss``) is an object with its own parameters and their rules: the trainer
optimizes, clamps, logs and checkpoints them without knowing their names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config, config_to_dict
from ..data.collate import Batch, Collator
from ..data.dataset import num_workers
from ..data.sources import Batches, EvalSet, Loading, Passes, open_training_data
from ..data.transforms import TrainTransform
from ..data.validate import long_captions_note
from ..env import autocast_factory, configure_cuda_allocator, enable_tf32, resolve_precision
from ..errors import CheckpointError, ConfigError, Stopped, TrainingError
from ..evaluate import EvalResult, evaluate_split, figures, format_change, format_metrics
from ..loss import Objective, build_objective
from ..model import TINY_KIND, DualEncoder, build_model, build_tiny, plain_model_class, save_model, set_attention
from ..outputs import (
    FolderLock,
    storage_errors,
    write_output,
)
from ..processes import all_min, any_true, from_main
from ..progress import Progress
from ..signals import StopRequest
from ..signals import name as signal_name
from ..zeroshot import ZeroShotSet, evaluate_zeroshot, load_zeroshot_set, read_templates
from .budget import Plan, decide_steps
from .card import CardFacts, model_card, versions
from .checkpoint import (
    gpu_rng_entries,
    latest_checkpoint,
    manifest_digest,
    objective_tensors,
    own_gpu_rng,  # noqa: F401 - tests reach it here
    resume_run,
    save_checkpoint,
    step_dir_name,
    verify,
)
from .launch import make_accelerator
from .levers import TowerCache, apply_freezing, apply_lora, enable_gradient_checkpointing, tower_locked
from .probe import ProbeResult, device_key, optimizer_state_bytes, probe_micro_batch
from .rundir import explain_changes, open_run_dir
from .step import (
    backward_with_oom_retry,
    build_optimizer,
    build_scheduler,
    capture_rng,
    restore_rng,
    step_parameters,
    sum_gradients_across_processes,
)
from .tracking import Trackers, check_trackers, flatten, make_trackers

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything about progress that a resume needs besides model/optimizer/scheduler tensors."""

    global_step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0
    step_in_epoch: int = 0
    micro_batch_size: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    samples_seen: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    nonfinite_streak: int = 0
    planned_steps: int = 0  # the step count a time budget decided (0: not decided yet, or no budget)
    before: dict[str, float] | None = None  # validation figures of pretrained weights before the first step


@dataclass
class TrainResult:
    run_dir: Path
    best_model: Path
    state: TrainState
    final: EvalResult | None
    seconds: float
    train_pairs: int
    is_main: bool = True  # False in the other processes of a multi-process run


@dataclass
class Run:
    """The objects of one training run, built once by ``setup``; derived numbers included."""

    cfg: Config
    accelerator: Any
    device: torch.device
    precision: str
    encoder: DualEncoder
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    batches: Batches  # defines each step's pairs; set_position() seeks
    loader: DataLoader
    val: EvalSet | None
    trackers: Trackers
    state: TrainState
    plan: Plan
    lock: FolderLock | None = None  # the run folder's lock (main process)
    zeroshot: list[tuple[ZeroShotSet, list[str]]] = dataclasses.field(default_factory=list)  # eval.zeroshot, read
    last_figures: dict[str, float] = dataclasses.field(default_factory=dict)  # of the latest validation (figures())

    @property
    def total_steps(self) -> int:
        return self.plan.total

    @property
    def model(self) -> nn.Module:
        return self.encoder.model

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @functools.cached_property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        """The forward pass's precision context (``env.autocast_factory``), built once for the run."""
        return autocast_factory(self.device, self.precision)


def train(cfg: Config, *, resume: str | None = None, overwrite: bool = False) -> TrainResult:
    """Fine-tune (or train from scratch) a dual encoder as configured; returns where the results are.

    ``resume``: a checkpoint or run folder, or ``"auto"`` (the newest complete checkpoint of this run, if any).
    ``overwrite``: start over in a run folder that holds an earlier run (its checkpoints, best model and metrics
    are deleted). Without either, a run folder that holds a run is refused: runs are never mixed.
    """
    start = time.perf_counter()
    run = setup(cfg, resume, overwrite)
    try:
        _log_plan(run)
        _validate_before(run)
        stepped = run.state.global_step < run.total_steps  # False when resuming a finished run
        # SIGINT / SIGTERM: the step in progress is finished and checkpointed (signals.py), by every process
        with StopRequest("finishing the current step and writing a checkpoint") as stop:
            final = _loop(run, stop)
            saved = stop.agreed and run.state.global_step % cfg.train.checkpoint_every == 0  # by the loop, just now
            if stepped and not saved:
                _save_checkpoint(run)
    finally:
        run.trackers.close()
        if run.lock is not None:
            run.lock.release()
    if stop.agreed:
        raise _stopped(run, stop)
    best = run.run_dir / "best_model"
    result = TrainResult(
        run.run_dir, best, run.state, final, time.perf_counter() - start, run.batches.num_rows, run.is_main
    )
    if run.is_main:
        _summary(run, result)
    return result


# --------------------------------------------------------------------------------------------------------------
# Setup


def setup(cfg: Config, resume: str | None, overwrite: bool = False) -> Run:
    """Everything a run needs, resumed where asked: ``train`` calls it first (benchmarks wrap it to adjust a run).

    In a multi-process run the main process alone locks the run folder, decides what the run does with it and
    chooses the checkpoint to resume; the others wait for that decision (``processes.from_main``) and load the
    same checkpoint, after checking it is the same file (checkpoints must be on a filesystem all processes share).
    """
    start = time.perf_counter()  # a time budget counts from here
    configure_cuda_allocator()  # before CUDA's first allocation (a no-op if the user set it)
    check_trackers(cfg.tracking)  # a tracker that is not installed: refused before the run folder is touched
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    precision = resolve_precision(cfg.train.precision, device)
    lock: FolderLock | None = None

    def decide() -> Resume | None:
        nonlocal lock
        lock, chosen = open_run_dir(cfg, resume, overwrite)
        return _choose_checkpoint(cfg.run_dir, chosen)

    try:
        chosen = from_main(decide)
        return _build_run(cfg, accelerator, device, precision, chosen, lock, start)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from, as the main process chose it: its path and its manifest's SHA-256."""

    path: Path  # checked against its manifest by the main process; every other process checks it again
    manifest_sha256: str


def _choose_checkpoint(run_dir: Path, resume: str | None) -> Resume | None:
    """The checkpoint ``--resume`` names (a checkpoint, a run folder, or ``auto``, the newest intact one)."""
    if resume is None:
        return None
    checkpoints = run_dir / "checkpoints"
    found = None  # a checkpoint latest_checkpoint() chose: already checked against its manifest
    if resume == "auto":
        found = latest_checkpoint(checkpoints)
        if found is None:
            log.info("--resume auto: no complete checkpoint in %s; starting from scratch", checkpoints)
            return None
    elif (Path(resume) / "checkpoints").is_dir():  # a run folder was given
        found = latest_checkpoint(Path(resume) / "checkpoints")
    path = Path(os.path.abspath(found or resume))
    if found is None and (problem := verify(path)):
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
    return Resume(path, manifest_digest(path))


def _build_run(
    cfg: Config,
    accelerator: Any,
    device: torch.device,
    precision: str,
    resume: Resume | None,
    lock: FolderLock | None,
    start: float,
) -> Run:
    from accelerate.utils import set_seed

    if device.type == "cpu":
        log.warning(
            "no CUDA GPU: training on the CPU in %s; expect minutes for the tiny model, hours for ViT-B/32", precision
        )
    set_seed(cfg.seed)
    data = open_training_data(
        cfg.data,
        Passes.of(cfg.train),
        need_captions=cfg.model.is_tiny or cfg.model.arch is not None,
        progress=accelerator.is_main_process,
    )
    zeroshot = _zeroshot_sets(cfg, data.val is not None)
    encoder = _load_encoder(cfg, data.captions, resume is not None, accelerator.is_main_process)
    if accelerator.is_main_process and (
        cut := long_captions_note(data.captions, encoder.tokenizer, encoder.context_length)
    ):
        log.warning("%s", cut[1])  # once per run: the collator truncates these captions silently
    model = _prepare_model(encoder, cfg, device, precision)

    world = accelerator.num_processes
    global_batch = _effective_batch(cfg.train.batch_size, data.num_rows, world)
    state = TrainState()
    batches, loader = data.batches(_loading(cfg, encoder, global_batch, accelerator.process_index, world, device))
    plan = Plan.from_config(cfg.train, batches.steps_per_epoch, start)
    # a model saved by a SigLIP run starts a SigLIP run from its saved temperature and bias
    objective = build_objective(cfg.train.loss, model, local_loss=cfg.train.local_loss, record=encoder.objective_record)
    optimizer = build_optimizer(model, objective, cfg)
    scheduler = build_scheduler(
        optimizer, plan.warmup_now if plan.budget_s else plan.warmup, plan.total_now, cfg.train.min_lr_ratio
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    run = Run(
        cfg,
        accelerator,
        device,
        precision,
        encoder,
        objective,
        optimizer,
        scheduler,
        scaler,
        batches,
        loader,
        data.val,
        Trackers(),
        state,
        plan,
        lock,
        zeroshot,
    )
    if resume:
        saved = resume_run(run, resume)
        plan.adopt(state)
        explain_changes(run, saved, resume.path)
    if not state.micro_batch_size:  # a resumed run keeps the micro-batch it had (results do not depend on it)
        state.micro_batch_size = _choose_micro_batch(run, global_batch // world)
    run.trackers = make_trackers(cfg, accelerator, start_step=state.global_step, enabled=accelerator.is_main_process)
    return run


def _zeroshot_sets(cfg: Config, validating: bool) -> list[tuple[ZeroShotSet, list[str]]]:
    """eval.zeroshot read up front (a bad set stops the run before training), with each set's templates."""
    if cfg.eval.zeroshot and not validating:
        raise ConfigError("eval.zeroshot is evaluated at each validation, but data.val_split is disabled; set one")
    sets = [
        (load_zeroshot_set(s.path, s.class_names, name=s.set_name), read_templates(s.templates))
        for s in cfg.eval.zeroshot
    ]
    for zset, _ in sets:
        if cfg.eval.best_metric == f"zeroshot/{zset.name}/top5" and len(zset.classes) < 5:
            raise ConfigError(
                f"eval.best_metric: zero-shot set {zset.name} has {len(zset.classes)} classes; top5 needs 5"
            )
    return sets


def _loading(
    cfg: Config, encoder: DualEncoder, global_batch: int, rank: int, world: int, device: torch.device
) -> Loading:
    """How this process loads training batches: the augmentation, the collator, its share of each batch."""
    aug = cfg.data.augment
    return Loading(
        transform=TrainTransform(encoder.image_spec, tuple(aug.crop_scale), aug.hflip, aug.color_jitter),
        collate=Collator(encoder.text_tokenizer()),
        global_batch=global_batch,
        rank=rank,
        world=world,
        seed=cfg.seed,
        device=device,
        workers=num_workers(cfg.data.num_workers),
    )


def _load_encoder(cfg: Config, captions: list[str], resuming: bool, is_main: bool) -> DualEncoder:
    """The starting model. The tiny model's tokenizer is learnt once and kept in the run folder for resumes."""
    saved = cfg.run_dir / "tokenizer"
    if cfg.model.is_tiny and resuming and saved.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(saved)
        encoder = build_tiny(cfg.model.tiny, [], seed=cfg.seed, tokenizer=tokenizer)
    else:
        encoder = build_model(cfg.model, captions=captions, seed=cfg.seed)
        if encoder.kind == TINY_KIND and is_main:
            with storage_errors(saved, f"the tokenizer {saved}"):
                encoder.tokenizer.save_pretrained(saved)
    return encoder


def _effective_batch(batch_size: int, rows: int, world: int) -> int:
    """The contrastive batch, shrunk for a data set smaller than one batch so that an epoch has >= 1 step."""
    if batch_size % world:
        raise ConfigError(f"train.batch_size {batch_size} must be divisible by the {world} processes")
    if rows >= batch_size:
        return batch_size
    smaller = (rows // world) * world
    if smaller < 2:
        raise ConfigError(f"only {rows} training pair(s): a contrastive batch needs at least 2 per step")
    log.warning("only %d training pairs: using a contrastive batch of %d instead of %d", rows, smaller, batch_size)
    return smaller


def _prepare_model(encoder: DualEncoder, cfg: Config, device: torch.device, precision: str | None = None) -> nn.Module:
    """Memory levers (freezing, LoRA, gradient checkpointing), then onto the device."""
    m = cfg.model
    log.info("attention: %s", set_attention(encoder.model, m.attention, device, precision))
    if precision is not None and enable_tf32(device, precision):
        log.info("fp32 on an Ampere or newer GPU: matmuls use TF32 tensor cores (fp32 accumulation)")
    apply_freezing(encoder.model, **m.freeze.model_dump(exclude={"cache_locked"}))
    if m.freeze.cache_locked and not m.lora.enabled:  # LiT: each caption (image) through a locked tower once
        if tower_locked(encoder.model.text_model):
            encoder.text_cache = TowerCache(encoder.model.text_model)
            log.info("text tower locked: its output is computed once per caption and cached")
        aug = cfg.data.augment
        if tower_locked(encoder.model.vision_model):
            if tuple(aug.crop_scale) == (1.0, 1.0) and not aug.hflip and not aug.color_jitter:
                encoder.image_cache = TowerCache(encoder.model.vision_model)
                log.info("vision tower locked: its output is computed once per image and cached")
            else:
                log.info("vision tower locked but not cached: augmentation changes every image each epoch")
    if m.lora.enabled:
        encoder.model = apply_lora(
            encoder.model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules
        )
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(encoder.model)
    model = encoder.model.to(device)
    if cfg.train.compile:
        # In place (nn.Module.compile), so parameter names and checkpoints are unchanged; captions vary in length.
        model.vision_model.compile()
        model.text_model.compile(dynamic=True)
    return model


def _choose_micro_batch(run: Run, local_batch: int) -> int:
    setting = run.cfg.train.micro_batch_size
    if setting != "auto":
        return min(int(setting), local_batch)
    result = probe_run(run, local_batch)
    log.info("micro-batch %d of %d chosen: %s", result.micro_batch_size, local_batch, result.reason)
    return result.micro_batch_size


def probe_run(run: Run, local_batch: int, *, cache: bool = True, memory_cap_bytes: int | None = None) -> ProbeResult:
    """The micro-batch probe for this run's model, objective, precision and device (cached per setup unless
    ``cache`` is False: the trial measures afresh and writes nothing). ``memory_cap_bytes``: a CPU process's
    resident-memory cap (a CUDA cap is set on the device: ``set_per_process_memory_fraction``, which the probe reads)."""
    spec = run.encoder.image_spec
    key = "|".join(
        str(x)
        for x in (
            run.cfg.model.name,
            sum(p.numel() for p in run.model.parameters()),
            sum(p.numel() for p in run.model.parameters() if p.requires_grad),
            run.precision,
            device_key(run.device),  # name, total memory, memory cap
            spec.crop,
            run.encoder.context_length,
            run.cfg.model.gradient_checkpointing,
            local_batch,
            run.batches.world_size,
            run.cfg.train.memory_reserve_gb,
        )
    )
    return probe_micro_batch(
        run.encoder,
        run.objective,
        local_batch=local_batch,
        device=run.device,
        autocast=run.autocast,
        reserve_bytes=int(run.cfg.train.memory_reserve_gb * 2**30),
        state_bytes=optimizer_state_bytes(run.optimizer),
        cache_key=key if cache else None,
        agree=all_min,  # every process probes alone; all of them use the smallest size any found
        world_size=run.batches.world_size,
        memory_cap_bytes=memory_cap_bytes,
    )


def _log_plan(run: Run) -> None:
    if not run.is_main:
        return
    n_params = sum(p.numel() for p in run.model.parameters())
    n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    log.info(
        "model %s: %.1fM parameters (%.1fM trainable) on %s in %s; contrastive batch %d (%d per process, micro-batch %d); "
        "%s (%d per epoch)",
        run.cfg.model.name,
        n_params / 1e6,
        n_train / 1e6,
        run.device,
        run.precision,
        run.batches.global_batch,
        run.batches.global_batch // run.batches.world_size,
        run.state.micro_batch_size,
        run.plan.describe(),
        run.batches.steps_per_epoch,
    )


# --------------------------------------------------------------------------------------------------------------
# The loop


def _stopped(run: Run, stop: StopRequest) -> Stopped:
    step, checkpoint = run.state.global_step, run.run_dir / "checkpoints" / step_dir_name(run.state.global_step)
    why = signal_name(stop.signum) if stop.signum is not None else "a stop signal to another process"
    if not run.is_main:
        return Stopped(f"{why}: stopped with the other processes after step {step}")
    return Stopped(
        f"{why}: stopped after step {step} of {run.total_steps} and saved checkpoint {checkpoint}; "
        "continue with --resume auto"
    )


def _loop(run: Run, stop: StopRequest | None = None) -> EvalResult | None:
    state, cfg = run.state, run.cfg
    final: EvalResult | None = None
    total = run.total_steps if run.plan.decided else None  # a time budget fixes it after the first steps
    bar = Progress(total=total, initial=state.global_step, desc="training", unit="step", disable=not run.is_main)
    window = _Window()
    run.plan.begin(state.global_step)
    while state.global_step < run.total_steps:
        run.batches.set_position(state.epoch, state.step_in_epoch)
        window.mark_data_start()
        for batch in run.loader:
            window.mark_data_end()
            _train_step(run, batch, window)
            if run.plan.step_done(state.global_step):
                decide_steps(run)
                bar.set_total(run.total_steps)
            bar.update(1)
            bar.set_postfix(
                loss=f"{window.last_loss:.3f}",
                lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                samples_s=f"{window.samples_per_s:.0f}",
            )
            if state.global_step % cfg.train.log_every == 0 or state.global_step >= run.total_steps:
                _log_window(run, window)  # the last window too, however short
            if state.global_step % cfg.train.checkpoint_every == 0 and state.global_step < run.total_steps:
                _log_window(run, window)  # a resume starts after the checkpoint: its steps are logged before it
                with window.paused(), run.plan.paused("checkpoint"):
                    _save_checkpoint(run)  # the last step is saved by train(), after the final validation
            if state.global_step >= run.total_steps:
                break
            if stop is not None and any_true(stop.requested):  # voted by every process at this step boundary
                stop.agreed = True
                break
            window.mark_data_start()
        if stop is not None and stop.agreed:
            break  # before the epoch's end is counted: the state a checkpoint after this step has
        epoch_done = state.step_in_epoch >= run.batches.steps_per_epoch
        last = state.global_step >= run.total_steps
        if epoch_done:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if (epoch_done and state.epoch % cfg.train.eval_every_epochs == 0) or last:
            with window.paused(), run.plan.paused("validation"):
                final = _validate(run)
    bar.close()
    if final is None and run.val is None and run.is_main:
        _save_best(run, None)  # no validation split: the final model is the best we know
    return final


def _log_window(run: Run, window: _Window) -> None:
    if window.losses:
        run.trackers.log(window.flush(run), run.state.global_step)


class _Window:
    """Running figures between two log lines: loss, throughput, time waiting for data."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.samples = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()
        self._data_start = self.start
        self.last_loss = float("nan")
        self.samples_per_s = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave time spent outside training steps (checkpoints, validation) out of the throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0

    def mark_data_start(self) -> None:
        self._data_start = time.perf_counter()

    def mark_data_end(self) -> None:
        self.data_wait += time.perf_counter() - self._data_start

    def add(self, loss: float, grad_norm: float, samples: int) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.samples += samples
        self.last_loss = loss
        elapsed = time.perf_counter() - self.start
        self.samples_per_s = self.samples / elapsed if elapsed > 0 else 0.0

    def flush(self, run: Run) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        finite = [x for x in self.losses if math.isfinite(x)]
        metrics = {
            "train/loss": sum(finite) / len(finite) if finite else float("nan"),
            "train/grad_norm": max(self.grad_norms) if self.grad_norms else float("nan"),
            "train/lr": run.scheduler.get_last_lr()[0],
            **{f"train/{name}": value for name, value in run.objective.log_values().items()},
            "train/samples_per_s": self.samples / elapsed,
            "train/data_wait_fraction": self.data_wait / elapsed,
            "train/epoch": run.state.epoch + run.state.step_in_epoch / max(1, run.batches.steps_per_epoch),
            "train/micro_batch_size": run.state.micro_batch_size,
        }
        self.__init__()
        return metrics


def _train_step(run: Run, batch: Batch, window: _Window) -> None:
    """One optimizer step on one contrastive batch; non-finite steps are skipped, OOM halves the micro-batch."""
    state = run.state
    if batch.skipped:
        state.skipped_samples += len(batch.skipped)
        for s in batch.skipped:
            log.warning("step %d: skipped %s (%s)", state.global_step + 1, s.path, s.reason)
    batch = batch.to(run.device, non_blocking=True)
    loss, state.micro_batch_size = backward_with_oom_retry(
        run.encoder,
        run.objective,
        batch,
        micro_batch_size=state.micro_batch_size,
        autocast=run.autocast,
        backward=lambda loss: run.scaler.scale(loss).backward(),
        oom_advice=lambda micro: _oom_advice(run, micro),
        step=state.global_step + 1,
    )
    sum_gradients_across_processes(run.model, run.objective)
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)
    params = [p for p in step_parameters(run.model, run.objective) if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.train.grad_clip or float("inf"))
    loss_value, norm_value = float(loss), float(grad_norm)
    if math.isfinite(loss_value) and (math.isfinite(norm_value) or run.scaler.is_enabled()):
        run.scaler.step(run.optimizer)  # plain optimizer.step() when the scaler is disabled
        run.scaler.update()
        run.objective.clamp_()
        state.nonfinite_streak = 0
        run.scheduler.step()
    else:
        if run.scaler.is_enabled():
            # unscale_ ran above: only update() closes the step for the scaler (the next unscale_ raises otherwise),
            # and it lowers the scale after the overflow it recorded
            run.scaler.update()
        _skip_nonfinite(run, loss_value, norm_value)
        with warnings.catch_warnings():  # a skipped step still advances the schedule: the warning says otherwise
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.step_in_epoch += 1
    state.samples_seen += run.batches.global_batch
    window.add(loss_value, norm_value, len(batch) * run.batches.world_size)


def _oom_advice(run: Run, micro_batch_size: int) -> str:
    where = " (in one of the processes)" if run.batches.world_size > 1 else ""
    return (
        f"out of memory at micro-batch {micro_batch_size}{where} ({run.precision}, model {run.cfg.model.name}). "
        "To fit: precision bf16/fp16 (train.precision), model.gradient_checkpointing: true, a smaller image size, "
        "freezing a tower (model.freeze.image_tower / text_tower) or LoRA (model.lora.enabled)"
    )


def _skip_nonfinite(run: Run, loss: float, grad_norm: float) -> None:
    state = run.state
    state.nonfinite_steps += 1
    state.nonfinite_streak += 1
    log.warning(
        "step %d: non-finite loss (%s) or gradient norm (%s): step skipped (%d in a row, %d in total)",
        state.global_step + 1,
        loss,
        grad_norm,
        state.nonfinite_streak,
        state.nonfinite_steps,
    )
    if state.nonfinite_streak >= run.cfg.train.max_nonfinite_steps:
        raise TrainingError(
            f"{state.nonfinite_streak} steps in a row had a non-finite loss or gradient (step {state.global_step + 1}). "
            "Lower train.lr, use precision bf16 instead of fp16, or check the data; the last checkpoint is intact."
        )


# --------------------------------------------------------------------------------------------------------------
# Time budget: after the first steps, how many fit


# --------------------------------------------------------------------------------------------------------------
# Validation, best model, checkpoints


def _evaluate(run: Run) -> tuple[EvalResult, dict[str, dict[str, float]]]:
    """The validation split's result and each eval.zeroshot set's figures (every process embeds its share)."""
    assert run.val is not None
    cfg = run.cfg
    result = evaluate_split(
        run.encoder,
        run.val,
        device=run.device,
        autocast=run.autocast,
        batch_size=cfg.eval.batch_size,
        objective=run.objective,
        loss_batch_size=run.batches.global_batch,
        chunk_size=cfg.eval.chunk_size,
        # worker processes only pay off for large splits (each evaluation would start them anew)
        num_workers=num_workers(cfg.data.num_workers) if len(run.val.images) >= 2000 else 0,
        distributed=True,
    )
    zeroshot = {
        zset.name: evaluate_zeroshot(
            run.encoder,
            zset,
            templates=templates,
            device=run.device,
            autocast=run.autocast,
            batch_size=cfg.eval.batch_size,
            distributed=True,  # like the split: each process embeds a share, all get the same figures
        ).metrics
        for zset, templates in run.zeroshot
    }
    run.model.train()
    return result, zeroshot


def _validate_before(run: Run) -> None:
    """Training from pretrained weights (not the random tiny model): validate once before the first step, so that
    the summary and the model card show before -> after. Kept in the training state: a resume does not repeat it."""
    state = run.state
    if run.val is None or run.cfg.model.is_tiny or state.global_step > 0 or state.before is not None:
        return
    rng = capture_rng()  # training continues exactly as without this validation
    try:
        with run.plan.paused("validation"):
            result, zeroshot = _evaluate(run)
    finally:
        restore_rng(rng)
    state.before = figures(result, zeroshot)
    if run.is_main:
        run.trackers.log(flatten({"val": {**result.summary(), "zeroshot": zeroshot}}), 0)
        run.trackers.log_validation(result, run.val, 0)
        log.info(
            "before training (%s as it starts): val loss %.4f, mean recall %.4f%s",
            run.cfg.model.name,
            result.loss,
            result.mean_recall,
            "".join(f"; zero-shot {name} top-1 {f['top1']:.4f}" for name, f in zeroshot.items()),
        )


def _validate(run: Run) -> EvalResult | None:
    """Validate on every process (each embeds its share of the split); the main process logs and saves the best model.

    Every process keeps the same ``best_metric`` / ``best_step`` (the main process's value is broadcast), so that
    all make the same decision whichever checkpoint they later resume from.
    """
    if run.val is None:
        return None
    cfg = run.cfg
    result, zeroshot = _evaluate(run)
    run.last_figures = figures(result, zeroshot)
    name = cfg.eval.best_metric
    if name.startswith("zeroshot/"):
        _, zset_name, metric = name.split("/", 2)
        selected = zeroshot[zset_name][metric]
    else:
        selected = result.select(name)
    value = torch.tensor([selected], dtype=torch.float64, device=run.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(value, src=0)  # the same everywhere already; this makes the decision provably common
    improved = run.state.best_metric is None or float(value) > run.state.best_metric
    if improved:
        run.state.best_metric, run.state.best_step = float(value), run.state.global_step
    if run.is_main:
        run.trackers.log(flatten({"val": {**result.summary(), "zeroshot": zeroshot}}), run.state.global_step)
        run.trackers.log_validation(result, run.val, run.state.global_step)
        for zset_name, values in zeroshot.items():
            log.info("zero-shot %s: %s", zset_name, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        log.info(
            "step %d, epoch %d: val loss %.4f (at contrastive batch %d, the training batch), mean recall %.4f",
            run.state.global_step,
            run.state.epoch,
            result.loss,
            run.batches.global_batch,
            result.mean_recall,
        )
        if improved:
            _save_best(run, result)
    run.accelerator.wait_for_everyone()
    return result


def _save_best(run: Run, result: EvalResult | None) -> None:
    # SigLIP: its temperature becomes the model's logit_scale (unused by its training) and both of its values go
    # into config.json; CLIP: nothing changes (a record inherited from a SigLIP-trained start is dropped).
    run.encoder.record_objective(run.objective.record())
    run.encoder.record_train_batch_size(run.batches.global_batch)  # `eval` computes its loss at this batch
    card = model_card(card_facts(run), result)
    write_output(
        lambda tmp: save_model(run.encoder, tmp, card=card),
        run.run_dir / "best_model",
        "best_model",
        {"experiment": run.cfg.experiment},
        what=f"the best model {run.run_dir / 'best_model'}",
        flag="the best model folder",
    )
    log.info("best model (step %d) saved to %s", run.state.global_step, run.run_dir / "best_model")


def card_facts(run: Run) -> CardFacts:
    return CardFacts(
        cfg=run.cfg,
        kind=run.encoder.kind,
        model_class=plain_model_class(run.model).__name__,
        mean_pooling=getattr(run.model.config, "text_pooling", "pooler") == "mean",
        vocabulary=len(run.encoder.tokenizer),
        context_length=run.encoder.context_length,
        step=run.state.global_step,
        epoch=run.state.epoch,
        global_batch=run.batches.global_batch,
        precision=run.precision,
        train_pairs=run.batches.num_rows,
        samples_seen=run.state.samples_seen,
        objective=run.objective.record(),
        before=run.state.before,
        after=run.last_figures,
    )


def _save_checkpoint(run: Run) -> None:
    rng = capture_rng()
    gpu = [rng["cuda"][1] if "cuda" in rng else None]  # each process saves its own GPU's generator
    if dist.is_initialized() and dist.get_world_size() > 1:
        gpu = [None] * dist.get_world_size()
        dist.all_gather_object(gpu, rng["cuda"][1] if "cuda" in rng else None)
    if run.is_main:
        tensors = {"cpu": rng["cpu"], **gpu_rng_entries(gpu)}
        state = {
            "trainer": dataclasses.asdict(run.state),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "config": config_to_dict(run.cfg),
            "world_size": run.batches.world_size,
            "versions": versions(),
        }
        save_checkpoint(
            run.run_dir / "checkpoints",
            run.state.global_step,
            model={**run.model.state_dict(), **objective_tensors(run)},
            optimizer=run.optimizer.state_dict(),
            rng=tensors,
            state=state,
            keep=run.cfg.train.keep_checkpoints,
        )
    run.accelerator.wait_for_everyone()


def _summary(run: Run, result: TrainResult) -> None:
    state = run.state
    lines = [
        f"finished {state.global_step} steps ({state.samples_seen} pairs) in {result.seconds / 60:.1f} min",
        f"run folder: {run.run_dir}",
        f"best model: {result.best_model} (step {state.best_step}, {run.cfg.eval.best_metric} = {state.best_metric})"
        if state.best_step is not None
        else f"model: {result.best_model}",
    ]
    if state.skipped_samples or state.nonfinite_steps:
        lines.append(
            f"skipped: {state.skipped_samples} unreadable sample(s), {state.nonfinite_steps} non-finite step(s)"
        )
    if result.final is not None:
        lines += ["final validation:", format_metrics(result.final.metrics)]
        if state.before is not None and run.last_figures:
            lines += [
                f"before -> after fine-tuning ({run.cfg.model.name}):",
                format_change(state.before, run.last_figures),
            ]
    log.info("\n".join(lines))
