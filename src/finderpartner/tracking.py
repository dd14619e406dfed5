"""Where metrics go: JSONL, TensorBoard and Weights & Biases behind one small interface (main process only)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlTracker:
    """One JSON object per line: ``{"step": ..., "time": ..., "<name>": value, ...}``; appended across resumes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: _json_number(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("tracking.tensorboard needs the tensorboard package: pip install tensorboard") from None
        self._writer = SummaryWriter(str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """W&B run; offline (synced later with ``wandb sync``) when no API key is configured."""

    def __init__(self, project: str, name: str, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ImportError("tracking.wandb needs wandb: pip install 'finderpartner[wandb]'") from None
        has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
        if mode == "offline":
            log.info("W&B in offline mode (no credentials found); `wandb sync %s/wandb` uploads it later", run_dir)
        self._run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, mode=mode, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """Fans out to every configured tracker; a no-op on non-main processes."""

    def __init__(self, trackers: list[Tracker]):
        self._trackers = trackers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for t in self._trackers:
            t.log(metrics, step)

    def close(self) -> None:
        for t in self._trackers:
            t.close()


def make_trackers(
    run_dir: Path, *, jsonl: bool, tensorboard: bool, wandb: bool, wandb_project: str, config: dict[str, Any], enabled: bool
) -> Trackers:
    if not enabled:
        return Trackers([])
    trackers: list[Tracker] = []
    if jsonl:
        trackers.append(JsonlTracker(run_dir / "metrics.jsonl"))
    if tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
    if wandb:
        trackers.append(WandbTracker(wandb_project, run_dir.name, run_dir, config))
    return Trackers(trackers)


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"val": {"text_to_image": {"R@1": x}}} -> {"val/text_to_image/R@1": x}."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out |= flatten(value, name)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def _json_number(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf
