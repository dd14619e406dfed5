"""Starting a run's processes: Accelerate's process state, and the launcher set-ups this trainer refuses.

This trainer is data parallel and sums gradients itself (see recipe.py), so Accelerate's sharding plugins are
refused, and so is an ``accelerate launch`` that asked for several processes but started one.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

from ..config import Config
from ..env import resolve_device
from ..errors import ConfigError, UsageError
from .tracking import accelerator_options

log = logging.getLogger(__name__)

# Accelerate plugins that shard or wrap the model: this trainer sums gradients itself (see the module docstring).
_UNSUPPORTED_PLUGINS = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def make_accelerator(cfg: Config) -> Any:
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
