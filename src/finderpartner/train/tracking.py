"""Where metrics go: metrics.jsonl, TensorBoard and Accelerate's trackers (W&B, MLflow, ...), main process only.

Who writes what, and why:

* ``metrics.jsonl``: ours (``JsonlTracker``); Accelerate has no such tracker. It writes whole lines only and, on
  a resume, drops the lines an interrupted run logged after its checkpoint.
* TensorBoard: ours (``TensorBoardTracker``), not Accelerate's. Measured with accelerate 1.15: after a start and
  one resume its tracker leaves three TensorBoard runs (``<logging_dir>/<project>/`` plus one hparams-only run per
  start, each beside a ``hparams.yml`` folder); ours leaves one run, ``<run>/tensorboard/``, holding its hparams
  itself (so the HParams dashboard's metric columns are the run's own validation scalars), and on a resume hides
  what was logged after the checkpoint (``purge_step``), as the JSONL does. The histograms and the retrieval grid
  need the writer either way.
* W&B, MLflow, Comet, Aim, ClearML, DVCLive: Accelerate's trackers (``tracking.log_with``, ``tracking.wandb``),
  started by ``Accelerator.init_trackers`` with the flattened config. W&B's run id is kept in ``<run>/tracking.json``
  so that ``--resume`` continues the same W&B run; it also gets the histograms and the grid.

A tracker that is configured but not installed is refused before the run folder is touched (``check_trackers``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import netrc
import os
import secrets
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..config import Config, TrackingConfig, config_to_dict, render_yaml
from ..data.sources import EvalSet
from ..env import tracker_problems
from ..errors import CheckpointError, FinderPartnerError
from ..evaluate import EvalResult
from ..outputs import storage_errors, write_text_atomic
from .retrieval_grid import retrieval_grid

log = logging.getLogger(__name__)

IDS_FILE = "tracking.json"  # in the run folder: {"wandb_run_id": ...}
HISTOGRAM_BINS = np.linspace(-1.0, 1.0, 81)  # cosine similarity, as evaluate.plot_similarity
HPARAM_METRICS = ("train/loss", "val/loss", "val/mean_recall")  # the HParams dashboard's metric columns


# --------------------------------------------------------------------------------------------------------------
# Which trackers, and whether they can run here


def check_trackers(tracking: TrackingConfig) -> None:
    """Refuse a run whose configured trackers cannot start, before anything is written."""
    if problems := tracker_problems(tracking):
        raise FinderPartnerError("; ".join(problems))


def accelerator_options(tracking: TrackingConfig, run_dir: Path) -> dict[str, Any]:
    """``Accelerator(**...)`` arguments for the configured Accelerate trackers (none: no arguments).

    A tracker that writes local files (Aim) writes them in ``<run>/trackers/``; nothing is created here.
    """
    names = _accelerate_trackers(tracking)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    folders = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "trackers"))
    return {"log_with": names, "project_config": folders}


def _accelerate_trackers(tracking: TrackingConfig) -> list[str]:
    return [name for name in tracking.trackers if name != "tensorboard"]  # TensorBoard is ours


# --------------------------------------------------------------------------------------------------------------
# The trackers of one run


class Trackers:
    """Every tracker of a run; empty on the other processes of a multi-process run."""

    def __init__(
        self,
        jsonl: JsonlTracker | None = None,
        tensorboard: TensorBoardTracker | None = None,
        accelerator: Any = None,
    ):
        self._jsonl = jsonl
        self._tensorboard = tensorboard
        self._accelerator = accelerator if accelerator is not None and accelerator.trackers else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._jsonl is not None:
            self._jsonl.log(metrics, step)
        if self._tensorboard is not None:
            self._tensorboard.log(metrics, step)
        if self._accelerator is not None:
            self._accelerator.log(metrics, step=step)

    def log_validation(self, result: EvalResult, data: EvalSet, step: int) -> None:
        """Histograms of matching and non-matching cosines and the retrieval grid (TensorBoard and W&B)."""
        wandb_run = self._tracker("wandb")
        if self._tensorboard is None and wandb_run is None:
            return
        grid = retrieval_grid(result.examples, data) if result.examples is not None else None
        if self._tensorboard is not None:
            self._tensorboard.log_validation(result.positive, result.negative, grid, step)
        if wandb_run is not None:
            import wandb

            media: dict[str, Any] = {
                f"val/similarity/{name}": wandb.Histogram(np_histogram=np.histogram(values, bins=HISTOGRAM_BINS))
                for name, values in (("matching", result.positive), ("non_matching", result.negative))
            }
            if grid is not None:
                media["val/retrievals"] = wandb.Image(grid, caption="top 5 val images of 4 fixed captions")
            wandb_run.log(media, step=step)

    def _tracker(self, name: str) -> Any:
        """An Accelerate tracker's own object (W&B: its run), or None when it is not one of this run's."""
        if self._accelerator is None:
            return None
        return next((t.tracker for t in self._accelerator.trackers if t.name == name), None)

    def close(self) -> None:
        """Close every tracker; a failure is logged, not raised (it must not hide the error that ended a run)."""
        closers = [
            (name, t.close) for name, t in (("metrics.jsonl", self._jsonl), ("TensorBoard", self._tensorboard)) if t
        ]
        if self._accelerator is not None:
            closers += [(t.name, t.finish) for t in self._accelerator.trackers]
        for name, close in closers:
            try:
                close()
            except Exception as e:
                log.warning("could not close %s cleanly: %s", name, e)


def make_trackers(cfg: Config, accelerator: Any, *, start_step: int = 0, enabled: bool = True) -> Trackers:
    """Open the configured trackers in the run folder (which ``rundir.open_run_dir`` claimed) and log the config."""
    if not enabled:
        return Trackers()
    run_dir, tracking = cfg.run_dir, cfg.tracking
    params = hparams(config_to_dict(cfg))
    jsonl = JsonlTracker(run_dir / "metrics.jsonl", start_step) if tracking.jsonl else None
    tensorboard = None
    if "tensorboard" in tracking.trackers:
        tensorboard = TensorBoardTracker(run_dir / "tensorboard", start_step)
        tensorboard.start(params, render_yaml(cfg, comments=False), start_step)
    try:
        if accelerator is not None and accelerator.log_with:
            init_kwargs = {"wandb": wandb_init_kwargs(cfg)} if "wandb" in tracking.trackers else {}
            accelerator.init_trackers(tracking.wandb_project, config=params, init_kwargs=init_kwargs)
            started = {t.name for t in accelerator.trackers}
            if missing := [name for name in _accelerate_trackers(tracking) if name not in started]:
                raise FinderPartnerError(f"Accelerate did not start the tracker(s) {', '.join(missing)}")
    except BaseException:
        Trackers(jsonl, tensorboard, accelerator).close()  # whatever did start
        raise
    return Trackers(jsonl, tensorboard, accelerator)


def hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The config as flat ``section.key`` values (the names ``--set`` takes); lists and nulls as JSON text."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out |= hparams(value, name)
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


# --------------------------------------------------------------------------------------------------------------
# metrics.jsonl


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


# --------------------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardTracker:
    """``<run>/tensorboard/``: one TensorBoard run across resumes (see the module docstring for why it is ours)."""

    def __init__(self, log_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # A resume hides the events an interrupted run wrote after its checkpoint (steps > start_step).
        with storage_errors(log_dir, "TensorBoard events"):
            self._writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)

    def start(self, params: dict[str, Any], config_yaml: str, step: int) -> None:
        """The hparams (in this run itself, not in a run of their own) and the resolved config as text."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        with storage_errors(Path(self._writer.log_dir), "TensorBoard events"):
            for summary in hparams_summaries(params, dict.fromkeys(HPARAM_METRICS, 0.0)):
                self._writer._get_file_writer().add_summary(summary)
            # indented: Markdown shows it as a code block, one key per line
            self._writer.add_text("config", "".join(f"    {line}\n" for line in config_yaml.splitlines()), step)
            self._writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        with storage_errors(Path(self._writer.log_dir), "TensorBoard events"):
            for name, value in metrics.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def log_validation(self, positive: np.ndarray, negative: np.ndarray, grid: np.ndarray | None, step: int) -> None:
        with storage_errors(Path(self._writer.log_dir), "TensorBoard events"):
            for name, values in (("matching", positive), ("non_matching", negative)):
                if len(values):
                    self._writer.add_histogram(f"val/similarity/{name}", values, step, bins=HISTOGRAM_BINS)
            if grid is not None:
                self._writer.add_image("val/retrievals", grid, step, dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# --------------------------------------------------------------------------------------------------------------
# W&B: the run id kept across resumes, and what the offline mode means


class WandbMode(NamedTuple):
    mode: str | None  # what to pass to wandb.init (None: wandb decides from its own settings)
    effective: str  # online, offline, disabled, ...
    reason: str  # why, in words


def wandb_mode(environ: Mapping[str, str] = os.environ) -> WandbMode:
    """Online, or offline and why: WANDB_MODE set by the user, or no API key found (then we choose offline)."""
    if environ.get("WANDB_MODE"):
        return WandbMode(None, environ["WANDB_MODE"], f"WANDB_MODE={environ['WANDB_MODE']} is set in the environment")
    if environ.get("WANDB_API_KEY"):
        return WandbMode(None, "online", "WANDB_API_KEY is set")
    host = (environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = Path(environ.get("NETRC") or Path.home() / ".netrc")
    try:
        found = netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        found = False
    if found:
        return WandbMode(None, "online", f"an API key for {host} is in {path}")
    return WandbMode(
        "offline",
        "offline",
        f"no W&B API key was found (WANDB_API_KEY is not set and {path} has no entry for {host}; `wandb login` "
        "adds one)",
    )


def wandb_init_kwargs(cfg: Config) -> dict[str, Any]:
    """``wandb.init`` arguments: this run folder's W&B run id (created once, kept in ``<run>/tracking.json``),
    resumed when it exists, files in ``<run>/wandb/``."""
    run_dir = cfg.run_dir
    run_id = _wandb_run_id(run_dir)
    mode = wandb_mode()
    if mode.effective in ("offline", "dryrun"):
        log.info(
            "W&B run %s logs offline: %s; `wandb sync %s` uploads it later", run_id, mode.reason, run_dir / "wandb"
        )
    elif mode.effective == "disabled":
        log.info("W&B is disabled: %s; nothing is logged to W&B", mode.reason)
    else:
        log.info("W&B run %s in project %s (%s; %s)", run_id, cfg.tracking.wandb_project, mode.effective, mode.reason)
    kwargs: dict[str, Any] = {"id": run_id, "resume": "allow", "name": cfg.experiment, "dir": str(run_dir)}
    if mode.mode is not None:
        kwargs["mode"] = mode.mode
    return kwargs


def _wandb_run_id(run_dir: Path) -> str:
    path = run_dir / IDS_FILE
    ids: dict[str, Any] = {}
    if path.is_file():
        try:
            ids = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(ids, dict) or not isinstance(ids.get("wandb_run_id", ""), str):
                raise ValueError("expected an object with a string wandb_run_id")
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} is damaged ({e}); it keeps this run's W&B run id. Write the id back as "
                f'{{"wandb_run_id": "<id>"}} (it ends the folder names in {run_dir / "wandb"}), or delete the file '
                "to log the rest of the run to a new W&B run"
            ) from None
    if not ids.get("wandb_run_id"):
        alphabet = string.ascii_lowercase + string.digits
        ids["wandb_run_id"] = "".join(secrets.choice(alphabet) for _ in range(8))
        with storage_errors(path, f"the W&B run id {path}"):
            write_text_atomic(path, json.dumps(ids, indent=2) + "\n")
    return ids["wandb_run_id"]


# --------------------------------------------------------------------------------------------------------------


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
