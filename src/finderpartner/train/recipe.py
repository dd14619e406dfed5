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
import logging
import math
import os
import platform
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__
from ..config import Config, config_to_dict
from ..data.collate import Batch, Collator
from ..data.dataset import num_workers
from ..data.sources import Batches, EvalSet, Loading, open_training_data
from ..data.transforms import TrainTransform
from ..data.validate import long_captions_note
from ..env import autocast_factory, configure_cuda_allocator, enable_tf32, resolve_device, resolve_precision
from ..errors import CheckpointError, ConfigError, Stopped, TrainingError, UsageError
from ..evaluate import EvalResult, evaluate_split, figures, format_change, format_metrics
from ..loss import Objective, build_objective
from ..model import (
    ARCH_KIND,
    TINY_KIND,
    DualEncoder,
    TowerCache,
    apply_freezing,
    apply_lora,
    build_model,
    build_tiny,
    enable_gradient_checkpointing,
    plain_model_class,
    save_model,
    set_attention,
    tower_locked,
)
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
from .budget import MARGIN, Plan, format_duration, steps_that_fit
from .checkpoint import (
    MANIFEST,
    latest_checkpoint,
    load_checkpoint,
    manifest_digest,
    save_checkpoint,
    step_dir_name,
    verify,
)
from .probe import ProbeResult, device_key, optimizer_state_bytes, probe_micro_batch
from .rundir import RESUME_SCHEDULE, changed_settings, open_run_dir, resume_notes
from .step import backward_with_oom_retry, capture_rng, restore_rng, step_parameters, sum_gradients_across_processes
from .tracking import Trackers, accelerator_options, check_trackers, flatten, make_trackers

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
    accelerator = _accelerator(cfg)
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


# Accelerate plugins that shard or wrap the model: this trainer sums gradients itself (see the module docstring).
_UNSUPPORTED_PLUGINS = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def _accelerator(cfg: Config) -> Any:
    """Accelerate's process state: the process group (with ``train.dist_timeout``) and this process's device."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    asked = [name for key, name in _UNSUPPORTED_PLUGINS.items() if os.environ.get(key, "").lower() in ("1", "true")]
    if asked:
        raise ConfigError(
            f"the accelerate config asks for {' and '.join(asked)}, which this trainer does not use: it is data "
            "parallel (each process holds the whole model; gradients are summed across processes). To fit a large "
            "model use train.precision bf16, model.gradient_checkpointing, a frozen tower or LoRA; launch with a "
            "plain multi-GPU accelerate config or torchrun"
        )
    asked_for = _accelerate_launch_processes()
    if asked_for > 1:
        raise UsageError(
            f"accelerate launch was asked for {asked_for} processes but started only this one (its single-process "
            f"launcher, used when it sees no GPUs or gets --cpu): add --multi_gpu instead of --cpu (without GPUs the "
            f"processes then train on the CPU, over gloo), "
            f"or launch with torchrun --nproc_per_node {asked_for}"
        )
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed not in ("no", "", cfg.train.precision):
        log.warning(
            "the accelerate config's mixed_precision %s is not used: train.precision (%s) decides",
            mixed,
            cfg.train.precision,
        )
    device_type = resolve_device(cfg.train.device).type
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    # autocast is ours (see env.py): accelerate's mixed precision stays off
    return Accelerator(
        cpu=device_type == "cpu",
        mixed_precision="no",
        kwargs_handlers=[timeout],
        **accelerator_options(cfg.tracking, cfg.run_dir),  # W&B, MLflow, ... (tracking.py)
    )


def _accelerate_launch_processes() -> int:
    """The --num_processes of an ``accelerate launch`` that started this process alone (0 when not that case).

    Accelerate's single-process launcher sets ACCELERATE_USE_CPU and no WORLD_SIZE; the number asked for is read
    from the launcher's command line (Linux /proc; elsewhere this check is skipped).
    """
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return 0
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return 0
    for i, arg in enumerate(parent):
        for flag in ("--num_processes", "--num-processes"):
            value = arg[len(flag) + 1 :] if arg.startswith(flag + "=") else parent[i + 1] if arg == flag else None
            if value is not None and value.isdigit():
                return int(value)
    return 0


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
        cfg, need_captions=cfg.model.is_tiny or cfg.model.arch is not None, progress=accelerator.is_main_process
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
    scheduler = _scheduler(
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
        saved = _resume(run, resume)
        plan.adopt(state)
        _explain_changes(run, saved, resume.path)
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
        autocast=autocast_factory(run.device, run.precision),
        reserve_bytes=int(run.cfg.train.memory_reserve_gb * 2**30),
        state_bytes=optimizer_state_bytes(run.optimizer),
        cache_key=key if cache else None,
        agree=all_min,  # every process probes alone; all of them use the smallest size any found
        world_size=run.batches.world_size,
        memory_cap_bytes=memory_cap_bytes,
    )


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


def _scheduler(
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


def _resume(run: Run, resume: Resume) -> dict[str, Any]:
    path = resume.path
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"process {run.accelerator.process_index} cannot read the checkpoint {path} that the main process chose: "
            "a multi-machine run needs output_dir on a filesystem every machine shares (NFS, Lustre, ...)"
        )
    if manifest_digest(path) != resume.manifest_sha256:
        raise CheckpointError(
            f"process {run.accelerator.process_index} sees a different {path / MANIFEST} than the main process: "
            "every machine must see the same output_dir (a shared filesystem), not a copy of its own"
        )
    ckpt = load_checkpoint(path, verified=run.is_main)  # the main process verified it while choosing it
    saved_cfg = ckpt.state.get("config", {})
    if saved_cfg.get("model") != config_to_dict(run.cfg)["model"]:
        raise CheckpointError(
            f"{path} was trained with another model section in its config; resume with the same model settings"
        )
    saved_world, world = int(ckpt.state.get("world_size", 1)), run.batches.world_size
    if saved_world != world and run.cfg.data.format == "webdataset":
        raise CheckpointError(
            f"{path} was trained by {saved_world} process(es), this run has {world}: a shard stream's order depends "
            f"on the number of processes, so resume it with {saved_world} (torchrun --nproc_per_node ... / --nnodes)"
        )
    run.model.load_state_dict({k: v for k, v in ckpt.model.items() if not k.startswith(OBJECTIVE_PREFIX)})
    _restore_objective(run, ckpt.model, path)
    run.optimizer.load_state_dict(ckpt.optimizer)
    run.scheduler.load_state_dict(ckpt.state["scheduler"])
    _load_scaler(run.scaler, ckpt.state.get("scaler") or {}, path)
    for f in dataclasses.fields(TrainState):
        setattr(run.state, f.name, ckpt.state["trainer"].get(f.name, getattr(run.state, f.name)))
    if saved_world != world:
        # The data position is global (batch k of an epoch is the same pairs for any number of processes), so
        # the run continues exactly; only the per-process share, and with it the micro-batch, changes.
        log.info(
            "%s was trained by %d process(es), this run has %d: each contrastive batch of %d is re-split "
            "(%d per process); the micro-batch is chosen again",
            path,
            saved_world,
            world,
            run.batches.global_batch,
            run.batches.global_batch // world,
        )
        run.state.micro_batch_size = 0
    rng: dict[str, Any] = {"cpu": ckpt.rng["cpu"]}
    if run.device.type == "cuda":
        rank = run.accelerator.process_index
        own = own_gpu_rng(ckpt.rng, rank)
        if own is not None:
            rng["cuda"] = (run.device.index, own)
        else:
            log.warning(
                "%s holds no GPU random state for process %d (trained by %d): its dropout continues from the seed, so "
                "this resume is not bitwise identical to an uninterrupted run",
                path,
                rank,
                saved_world,
            )
    restore_rng(rng)
    log.info(
        "resumed from %s (step %d, epoch %d, batch %d of the epoch)",
        path,
        run.state.global_step,
        run.state.epoch,
        run.state.step_in_epoch,
    )
    return ckpt.state


def _explain_changes(run: Run, saved: dict[str, Any], path: Path) -> None:
    """Settings changed since the checkpoint: refused (rundir.RESUME_REFUSED), or said with what they do now."""
    changes = changed_settings(saved.get("config", {}), config_to_dict(run.cfg))
    notes = resume_notes(changes, path)
    schedule = {k: v for k, v in changes.items() if k in RESUME_SCHEDULE}
    step = run.state.global_step
    if schedule:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in schedule.items())
        if run.plan.decided and run.total_steps <= step:
            raise CheckpointError(
                f"--resume {path}: {what} since the checkpoint, so the run now ends at step {run.total_steps}, but the "
                f"checkpoint is at step {step}: nothing is left to train. Give more steps, or use its best model"
            )
        before = saved.get("scheduler", {}).get("_last_lr", [float("nan")])[0]
        now = run.scheduler.base_lrs[0] * run.scheduler.lr_lambdas[0](step)
        ends = f"at step {run.total_steps}" if run.plan.decided else "when its time budget decides"
        notes.insert(
            0,
            f"{what} since the checkpoint: the run now ends {ends}, and the learning-rate schedule is recomputed "
            f"for it: at step {step} the learning rate goes from {before:.3g} (the checkpoint's schedule) to "
            f"{now:.3g}",
        )
    if run.is_main:
        for note in notes:
            log.warning("%s", note)


def _load_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any], path: Path) -> None:
    """The fp16 loss scale of a checkpoint; one saved in another precision holds none (``{}``): start afresh."""
    if saved:
        scaler.load_state_dict(saved)  # a disabled scaler (bf16/fp32 now) ignores it
    elif scaler.is_enabled():
        log.info("%s was saved without fp16 loss scaling (another precision): the loss scale starts afresh", path)


def gpu_rng_entries(states: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Checkpoint RNG tensors of each process's own GPU generator (``states[rank]``; None: no GPU)."""
    return {f"cuda_rank_{rank}": s for rank, s in enumerate(states) if s is not None}


def own_gpu_rng(saved: dict[str, torch.Tensor], rank: int) -> torch.Tensor | None:
    """This process's GPU generator state in a checkpoint's RNG tensors (None: not saved, e.g. more processes now).

    Checkpoints before ``cuda_rank_<r>`` kept ``cuda_<i>``: every GPU generator of the main process, of which only
    its own device's (0) was ever used; that one is the main process's state, the others are not anyone's.
    """
    if f"cuda_rank_{rank}" in saved:
        return saved[f"cuda_rank_{rank}"]
    return saved.get("cuda_0") if rank == 0 else None


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
                _decide_steps(run)
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
        autocast=autocast_factory(run.device, run.precision),
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


def _decide_steps(run: Run) -> None:
    """Fix the step count of a time-budget run: the main process decides from what it measured, the others agree."""
    plan, state, cfg = run.plan, run.state, run.cfg
    total = torch.zeros(1, dtype=torch.long, device=run.device if dist.is_initialized() else "cpu")
    validation_s = 0.0 if run.val is None else _validation_cost(run)  # every process: validation is shared
    if run.is_main:
        checkpoint_s = plan.measured_cost("checkpoint") or _checkpoint_cost_estimate(run)
        remaining = plan.remaining_s() * MARGIN
        more = steps_that_fit(
            remaining,
            state.global_step,
            plan.rate,
            validation_s=validation_s,
            checkpoint_s=checkpoint_s,
            steps_per_epoch=run.batches.steps_per_epoch,
            eval_every_epochs=cfg.train.eval_every_epochs,
            checkpoint_every=cfg.train.checkpoint_every,
        )
        fits = state.global_step + more
        total[0] = min(fits, plan.cap) if plan.cap else fits
        capped = ""
        if plan.cap and fits > plan.cap:
            capped = f"; capped at train.max_steps {plan.cap} (the budget allows {fits})"
        log.info(
            "time budget %s: %d steps planned at %.2f steps/s (%.1f epochs; %d steps and %.0f s spent so far, "
            "validation ~%.1f s, checkpoint ~%.1f s)%s",
            format_duration(plan.budget_s or 0),
            int(total[0]),
            plan.rate,
            int(total[0]) / run.batches.steps_per_epoch,
            state.global_step,
            time.perf_counter() - plan.start,
            validation_s,
            checkpoint_s,
            capped,
        )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(total, src=0)
    plan.fix(max(int(total[0]), state.global_step))
    state.planned_steps = plan.total


def _validation_cost(run: Run) -> float:
    """Seconds per validation: measured when one ran already, else timed on a slice of the split and scaled up.

    Every process calls this (the slice is validated as validation runs: shared between the processes).
    """
    measured = run.plan.measured_cost("validation")
    if measured is not None:
        return measured
    assert run.val is not None
    val, k = run.val, min(len(run.val.images), 64)
    rows = [i for i, image in enumerate(val.text_to_image) if image < k]
    part = EvalSet(val.name, val.images[:k], [val.captions[i] for i in rows], [val.text_to_image[i] for i in rows])
    rng = capture_rng()  # leaves the run exactly as it was: same random numbers, training mode
    start = time.perf_counter()
    try:
        evaluate_split(
            run.encoder,
            part,
            device=run.device,
            autocast=autocast_factory(run.device, run.precision),
            batch_size=run.cfg.eval.batch_size,
            objective=run.objective,
            loss_batch_size=run.batches.global_batch,
            chunk_size=run.cfg.eval.chunk_size,
            distributed=True,
        )
    finally:
        run.model.train()
        restore_rng(rng)
    seconds = time.perf_counter() - start
    scale = max(len(val.images) / max(1, k), len(val.captions) / max(1, len(rows)))
    return seconds * scale + _bytes(run.model.state_dict()) / 200e6  # + saving the best model


def _checkpoint_cost_estimate(run: Run) -> float:
    """Seconds per checkpoint before one was written: its bytes at 200 MB/s."""
    return 0.05 + (_bytes(run.model.state_dict()) + _bytes(run.optimizer.state_dict()["state"])) / 200e6


def _bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_bytes(v) for v in tree.values())
    return 0


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
        autocast=autocast_factory(run.device, run.precision),
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
            autocast=autocast_factory(run.device, run.precision),
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
    card = _model_card(run, result)
    write_output(
        lambda tmp: save_model(run.encoder, tmp, card=card),
        run.run_dir / "best_model",
        "best_model",
        {"experiment": run.cfg.experiment},
        what=f"the best model {run.run_dir / 'best_model'}",
        flag="the best model folder",
    )
    log.info("best model (step %d) saved to %s", run.state.global_step, run.run_dir / "best_model")


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
            "versions": _versions(),
        }
        save_checkpoint(
            run.run_dir / "checkpoints",
            run.state.global_step,
            model={**run.model.state_dict(), **_objective_tensors(run)},
            optimizer=run.optimizer.state_dict(),
            rng=tensors,
            state=state,
            keep=run.cfg.train.keep_checkpoints,
        )
    run.accelerator.wait_for_everyone()


# Checkpoint keys of the objective's parameters that are not the model's (next to the model's own weights).
OBJECTIVE_PREFIX = "objective."


def _objective_tensors(run: Run) -> dict[str, torch.Tensor]:
    """The objective's parameters that the model's state does not hold, by checkpoint key.

    None for CLIP (its temperature is the model's ``logit_scale``), so its checkpoints are as before.
    """
    in_model = {id(p) for p in run.model.parameters()}
    return {
        OBJECTIVE_PREFIX + name: p.detach() for name, p in run.objective.named_parameters() if id(p) not in in_model
    }


def _restore_objective(run: Run, saved: dict[str, torch.Tensor], path: Path) -> None:
    """Load the objective's own parameters; a checkpoint without them (older, or CLIP) leaves their initial values."""
    for key, p in _objective_tensors(run).items():
        if key in saved:
            with torch.no_grad():
                p.copy_(saved[key])
        else:
            log.warning("%s holds no %s: it starts from its initial value", path, key)


def _versions() -> dict[str, str]:
    import transformers

    return {
        "finderpartner": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _model_card(run: Run, result: EvalResult | None) -> str:
    cfg = run.cfg
    model_class = plain_model_class(run.model).__name__  # CLIPModel, or VisionTextDualEncoderModel (towers)
    processor_class = "CLIPProcessor" if model_class == "CLIPModel" else "VisionTextDualEncoderProcessor"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        f"license: {cfg.card.license}",
        "tags: [clip, finderpartner]",
        "---",
        f"# {cfg.experiment}",
        "",
        f"CLIP dual encoder {'trained from scratch' if run.encoder.kind in (TINY_KIND, ARCH_KIND) else 'fine-tuned'} with "
        f"FinderPartner {__version__} from `{cfg.model.name}` on `{cfg.data.root}`",
        f"(split `{cfg.data.train_split}`), step {run.state.global_step}, epoch {run.state.epoch}, contrastive batch "
        f"{run.batches.global_batch}, precision {run.precision}, seed {cfg.seed}.",
        "",
    ]
    if result is not None:
        lines += [
            f"## Validation (`{cfg.data.val_split}`, {result.num_images} images, {result.num_captions} captions)",
            "",
            "```",
            format_metrics(result.metrics),
            "```",
            "",
            f"Validation loss {result.loss:.4f} (at contrastive batch {result.loss_batch_size}, the training batch; "
            f"`finderpartner eval` uses it too); mean recall {result.mean_recall:.4f}.",
            "",
        ]
        if run.state.before is not None:
            lines += [
                f"### Before -> after fine-tuning (`{cfg.model.name}` before the first step, this model at step "
                f"{run.state.global_step})",
                "",
                "```",
                format_change(run.state.before, run.last_figures),
                "```",
                "",
            ]
    lines += _card_data_and_text(run)
    lines += [
        "## Use",
        "",
        "```python",
        f"from transformers import {model_class}, {processor_class}",
        f'model = {model_class}.from_pretrained("path/to/best_model")',
        f'processor = {processor_class}.from_pretrained("path/to/best_model")',
        "```",
        "",
    ]
    if getattr(run.model.config, "text_pooling", "pooler") == "mean":
        lines += [
            "Text embeddings are the mean of the text tower's token outputs (config.json `text_pooling: mean`), then",
            "`text_projection`, not `get_text_features` (which uses the tower's pooler).",
            "",
        ]
    record = run.objective.record()
    if record is not None:
        lines += [
            "## Scores are sigmoids (SigLIP), not a softmax",
            "",
            f"Trained with the pairwise sigmoid loss (`train.loss: {record['loss']}`): every image-text pair is scored",
            "on its own, `p = sigmoid(exp(logit_scale) * cos + logit_bias)`, independently of the other texts (the",
            "probabilities need not sum to 1). The learnt temperature is the model's `logit_scale` "
            f"({record['logit_scale']:.6g}, exp {math.exp(record['logit_scale']):.6g}); the bias "
            f"({record['logit_bias']:.6g}) is in config.json as `finderpartner_objective.logit_bias`.",
            "",
            "```python",
            "import torch",
            'bias = model.config.finderpartner_objective["logit_bias"]',
            'inputs = processor(text=texts, images=image, return_tensors="pt", padding=True)',
            "logits = model(**inputs).logits_per_image  # exp(logit_scale) * cosine",
            "probs = torch.sigmoid(logits + bias)  # not logits.softmax(-1)",
            "```",
            "",
        ]
    return "\n".join(lines)


def _card_data_and_text(run: Run) -> list[str]:
    """The card's training data, license and text-input sections."""
    cfg, encoder = run.cfg, run.encoder
    source = f"WebDataset shards `{cfg.data.train_shards}`" if cfg.data.format == "webdataset" else f"`{cfg.data.root}`"
    lines = [
        "## Training data",
        "",
        f"{run.batches.num_rows} image-caption pairs per epoch from {source} (split `{cfg.data.train_split}`), "
        f"{run.state.samples_seen} pairs seen in training.",
        "",
        cfg.card.data
        or "No description was given (set `card.data` in the config to say what the images and captions "
        "are, where they come from, and under which terms).",
        "",
        "## License",
        "",
        f"`{cfg.card.license}` (`card.license`)."
        if cfg.card.license != "other"
        else "Not stated (`card.license: other`): the terms of the training data"
        + ("" if encoder.kind in (TINY_KIND, ARCH_KIND) else f" and of the pretrained model ({_base_names(cfg)})")
        + " apply.",
        "",
        "## Text input",
        "",
        f"Texts are truncated to {encoder.context_length} tokens (the text tower's context length), start and end "
        "tokens included.",
    ]
    if encoder.kind == TINY_KIND:
        lines.append(
            f"The tokenizer is a byte-level BPE of {len(encoder.tokenizer)} tokens learnt from the training captions, "
            "not OpenAI CLIP's: words the captions never used are split into pieces the model rarely or never saw, "
            "so write queries in the captions' vocabulary."
        )
    elif encoder.kind == ARCH_KIND:
        lines.append("The tokenizer is OpenAI CLIP's byte-level BPE (49,408 tokens).")
    else:
        lines.append(f"The tokenizer is the pretrained text tower's ({_base_names(cfg)}), unchanged.")
    return [*lines, ""]


def _base_names(cfg: Config) -> str:
    if cfg.model.name == "towers":
        return f"text `{cfg.model.towers.text}`, vision `{cfg.model.towers.vision}`"
    return f"`{cfg.model.name}`"


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
