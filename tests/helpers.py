"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import signal
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


def modes_off_usual(folder: Path) -> dict[str, str]:
    """Files under ``folder`` whose mode (``stat -c %a``) is not 0666 minus the umask, as {path: octal mode}."""
    umask = os.umask(0o022)
    os.umask(umask)
    usual = 0o666 & ~umask
    return {
        str(f.relative_to(folder)): oct(f.stat().st_mode & 0o777)[2:]
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.stat().st_mode & 0o777 != usual
    }


# A sitecustomize.py that hides the distributions named in $FP_HIDE (comma-separated) from importlib.metadata and
# their modules from import, in a fresh interpreter only (put its folder first on PYTHONPATH).
HIDE_PACKAGES = r'''
import importlib.machinery, os, re, sys

HIDDEN = set(os.environ["FP_HIDE"].split(","))  # distribution names == top-level module names here
_norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()


class _Hidden:
    """Wraps the path finder: hidden packages cannot be imported and have no installed metadata."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, context=None):
        from importlib.metadata import DistributionFinder

        found = self.inner.find_distributions(context or DistributionFinder.Context())
        return (d for d in found if _norm(d.metadata["Name"] or "") not in {_norm(h) for h in HIDDEN})

    def invalidate_caches(self):
        self.inner.invalidate_caches()


sys.meta_path[:] = [_Hidden(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


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


def end_worker() -> None:
    """The last line of a torchrun test worker, after ``destroy_process_group``: its work is done and checked through
    its output files. Gloo's threads can still abort the interpreter's teardown ("terminate called without an active
    exception", SIGABRT: pytorch/pytorch#190489; seen once in a full run here even after a barrier), which torchrun
    would report as the test failing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment of a launched job: this checkout's src/ importable, one thread per process."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1", **extra}


def torchrun_command(*args: str, processes: int = 2) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--standalone", "--nproc_per_node", str(processes), *args]


def run_torchrun(
    *args: str, processes: int = 2, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone`` with ``processes`` real processes (gloo on a CPU), this checkout's src/ importable.

    A hang is a failure: ``timeout`` raises ``subprocess.TimeoutExpired`` (and the job is killed).
    """
    return run_job(torchrun_command(*args, processes=processes), env=env, timeout=timeout)


def run_job(
    command: list[str], *, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """A launcher and the processes it starts, in a session of their own: on a timeout all of them are killed."""
    proc = subprocess.Popen(
        command,
        env=launcher_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
