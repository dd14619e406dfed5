"""Where metrics go: JSONL, TensorBoard and Weights & Biases behind one small interface (main process only)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from .outputs import storage_errors, write_text_atomic

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlTracker:
    """One JSON object per line: ``{"step": ..., "time": ..., "<name>": value, ...}``; appended across resumes.

    Only whole lines are ever written: a failed write (disk full) is cut back to the previous line. On start,
    lines logged after ``start_step`` (by an interrupted run, past its last checkpoint: they will be logged
    again) and a torn last line (a crash mid-write by an older version) are dropped, with a warning.
    """

    def __init__(self, path: Path, start_step: int = 0):
        self.path = path
        with storage_errors(path, f"metrics {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            _trim_jsonl(path, start_step)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: _json_number(v) for k, v in metrics.items()}}
        data = (json.dumps(record) + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            with storage_errors(self.path, f"metrics {self.path}"):
                if os.write(self._fd, data) != len(data):  # a short write is how a full disk shows up here
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)  # no torn line
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None  # type: ignore[assignment]


def _trim_jsonl(path: Path, start_step: int) -> None:
    if not path.is_file():
        return
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines.pop() if lines else b""  # after the last newline: empty unless the last line is torn
    keep, later = [], 0
    for line in lines:
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            continue
        if step <= start_step:
            keep.append(line)
        else:
            later += 1
    if torn.strip():
        log.warning("%s: ignoring a torn last line (a write that was interrupted)", path)
    if later:
        log.info(
            "%s: dropping %d line(s) logged after step %d (they are logged again from there)", path, later, start_step
        )
    if torn.strip() or later or len(keep) != len(lines):
        write_text_atomic(path, b"".join(line + b"\n" for line in keep).decode("utf-8"))


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("tracking.tensorboard needs the tensorboard package: pip install tensorboard") from None
        self._writer = SummaryWriter(str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        with storage_errors(Path(self._writer.log_dir), "TensorBoard events"):
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
        """Close every tracker; a failure is logged, not raised (it must not hide the error that ended a run)."""
        for t in self._trackers:
            try:
                t.close()
            except Exception as e:
                log.warning("could not close %s cleanly: %s", type(t).__name__, e)


def make_trackers(
    run_dir: Path,
    *,
    jsonl: bool,
    tensorboard: bool,
    wandb: bool,
    wandb_project: str,
    config: dict[str, Any],
    enabled: bool,
    start_step: int = 0,
) -> Trackers:
    if not enabled:
        return Trackers([])
    trackers: list[Tracker] = []
    if jsonl:
        trackers.append(JsonlTracker(run_dir / "metrics.jsonl", start_step))
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
