"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# A very small CLIP so that whole training runs take seconds on a 2-core CPU.
MICRO_SPEC = {
    "image_size": 32,
    "patch_size": 8,
    "vision_width": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "text_width": 64,
    "text_layers": 2,
    "text_heads": 2,
    "context_length": 16,
    "embed_dim": 32,
    "vocab_size": 1024,
}


def micro_config(tmp: Path, data: Path, **train: object) -> dict:
    """A config dict for a seconds-long CPU run of the micro model on ``data``."""
    return {
        "experiment": "run",
        "output_dir": str(tmp / "outputs"),
        "seed": 7,
        "model": {"name": "tiny", "tiny": MICRO_SPEC},
        "data": {"root": str(data), "num_workers": 0},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "lr": 1e-3,
            "warmup_steps": 2,
            "precision": "fp32",
            "checkpoint_every": 4,
            "log_every": 2,
            **train,
        },
        "tracking": {"tensorboard": False},
    }


def run_torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone`` with ``processes`` real processes (gloo on a CPU), this checkout's src/ importable."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--standalone", "--nproc_per_node", str(processes), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
