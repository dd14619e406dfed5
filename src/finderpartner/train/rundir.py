"""The run folder of ``train``: lock it, and decide whether this run starts, resumes or starts over in it.

A run folder holds one run. ``open_run_dir`` takes an OS lock on it (a second process is refused), refuses a
folder that is an input or holds files ``train`` did not write, and decides from what is inside and from
``--resume`` / ``--overwrite``: a fresh start, a resume from a named or the latest intact checkpoint, or (with
``--overwrite``) removing only what an earlier run wrote (``RUN_ARTEFACTS``) first. A folder whose earlier attempt
never took a step does not count as a run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Run

from ..config import Config, config_to_dict, render_yaml
from ..data.dataset import split_paths
from ..errors import CheckpointError, OutputError, UsageError
from ..outputs import (
    MARKER,
    FolderLock,
    check_not_input,
    describe_kind,
    marked_files,
    read_marker,
    remove_owned,
    storage_errors,
    write_marker,
    write_text_atomic,
)
from .checkpoint import MANIFEST, latest_checkpoint, list_checkpoints, prune, remove_checkpoint, verify

log = logging.getLogger(__name__)


# What `train` writes in a run folder: the only entries --overwrite removes (eval/ belongs to `finderpartner eval`).
RUN_ARTEFACTS = (
    "config.yaml",
    "metrics.jsonl",
    "tensorboard",
    "checkpoints",
    "best_model",
    "tokenizer",
    "wandb",
    "tracking.json",  # the W&B run id (tracking.py)
    "trackers",  # local files of Accelerate's trackers (Aim)
    MARKER,
)


def open_run_dir(cfg: Config, resume: str | None, overwrite: bool) -> tuple[FolderLock, str | None]:
    """Lock the run folder and decide what this run does with it; returns the lock and the checkpoint to resume.

    Runs are never mixed: a folder that holds an earlier run is resumed (``--resume``), or started over
    (``--overwrite``), or refused with those choices. A folder holding anything else is refused.
    """
    run_dir = cfg.run_dir
    if overwrite and resume:
        raise UsageError("--overwrite starts the run over and --resume continues it: give one of them")
    if resume not in (None, "auto"):
        check_resume_path(Path(resume))  # before anything is written: a wrong path leaves no run folder behind
    if cfg.data.format == "csv":
        splits = [s for s in (cfg.data.train_split, cfg.data.val_split) if s]
        check_not_input(
            run_dir,
            {
                f"{kind} of split {s}": p
                for s in splits
                for kind, p in zip(("images", "captions"), split_paths(cfg.data.root, s))
            },
            flag="the run folder (output_dir/experiment)",
        )
    created = not run_dir.exists()
    lock = FolderLock(run_dir).acquire()
    try:
        resume = decide_run(run_dir, resume, overwrite)
        with storage_errors(run_dir, f"the run folder {run_dir}"):
            write_marker(run_dir, "run", {"experiment": cfg.experiment})
            write_text_atomic(run_dir / "config.yaml", render_yaml(cfg))
    except BaseException:
        lock.release()
        if created and [p.name for p in run_dir.iterdir()] == [".lock"]:  # refused before writing: leave nothing
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return lock, resume


def check_resume_path(path: Path) -> None:
    """``--resume PATH`` must name a checkpoint folder (with its manifest) or a run folder (with checkpoints/)."""
    if not path.exists():
        raise CheckpointError(
            f"--resume {path}: no such file or folder; give a checkpoint folder (<run>/checkpoints/step_NNNNNN), a "
            "run folder, or --resume auto (the newest complete checkpoint of this run)"
        )
    if not path.is_dir() or not ((path / "checkpoints").is_dir() or (path / MANIFEST).is_file()):
        what = "a file" if not path.is_dir() else "a folder without manifest.json or checkpoints/"
        raise CheckpointError(
            f"--resume {path} is {what}: neither a checkpoint (<run>/checkpoints/step_NNNNNN) nor a run folder"
        )


def decide_run(run_dir: Path, resume: str | None, overwrite: bool) -> str | None:
    entries = sorted(p.name for p in run_dir.iterdir() if p.name not in (".lock",) and not p.name.startswith(".tmp-"))
    if not entries:
        return resume if resume != "auto" else None
    marker = read_marker(run_dir)
    if marker is None and not (run_dir / "config.yaml").is_file():  # config.yaml: a run of a version before markers
        listing = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputError(
            f"the run folder {run_dir} already exists and holds files that finderpartner train did not "
            f"write ({listing}); it never replaces them: choose another output_dir or experiment"
        )
    if marker is not None and marker.get("kind") != "run":
        raise OutputError(
            f"the run folder {run_dir} is {describe_kind(marker['kind'])}; choose another output_dir or experiment"
        )
    checkpoints = run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    trained = (
        checkpoints.exists() or (run_dir / "best_model").exists() or (metrics.is_file() and metrics.stat().st_size)
    )
    if not trained:  # an attempt that stopped before its first step (bad data, say): nothing to keep or resume
        clear_run(run_dir)
        return resume if resume != "auto" else None
    if resume == "auto":
        found = latest_checkpoint(checkpoints)
        if found is not None:
            return str(found)
        damaged = list_checkpoints(checkpoints)
        if damaged:
            problems = "; ".join(f"{p.name}: {verify(p) or 'incomplete'}" for _, p in damaged[-3:])
            raise CheckpointError(
                f"--resume auto: none of the {len(damaged)} checkpoint(s) in {checkpoints} is usable "
                f"({problems}). Resume from a copy with --resume PATH, or start the run over with "
                "--overwrite (deletes its checkpoints, best model and metrics)"
            )
        log.warning(
            "--resume auto: %s holds an earlier attempt that never reached a checkpoint: starting over", run_dir
        )
        clear_run(run_dir)
        return None
    if resume is not None:
        given = Path(os.path.realpath(resume))
        if given == Path(os.path.realpath(run_dir)) or Path(os.path.realpath(run_dir)) in given.parents:
            return resume  # this run's own checkpoint (or the run folder itself)
        raise OutputError(
            f"the run folder {run_dir} already holds a run; continuing {resume} there would mix two runs: "
            "start it in a new folder with --set experiment=NEW_NAME"
        )
    if overwrite:
        log.warning("--overwrite: deleting the earlier run in %s (checkpoints, best model, metrics)", run_dir)
        clear_run(run_dir)
        return None
    steps = [n for n, _ in list_checkpoints(checkpoints)]
    held = (
        ", ".join(
            x
            for x in (
                f"checkpoints up to step {steps[-1]}" if steps else "",
                "best_model/" if (run_dir / "best_model").exists() else "",
                "metrics.jsonl" if (run_dir / "metrics.jsonl").exists() else "",
            )
            if x
        )
        or "its config"
    )
    raise OutputError(
        f"the run folder {run_dir} already holds a training run ({held}). Continue it with --resume auto, "
        "start a separate run with --set experiment=NEW_NAME, or start this one over with --overwrite "
        "(deletes its checkpoints, best model and metrics)"
    )


def clear_run(run_dir: Path) -> None:
    """Delete what an earlier run wrote; in ``best_model/`` and ``checkpoints/`` only the files their marker and
    manifests list (a user's file put there stays, and so does its folder)."""
    with storage_errors(run_dir, f"the run folder {run_dir}"):
        for name in RUN_ARTEFACTS:
            p = run_dir / name
            if name == "best_model" and marked_files(read_marker(p)) is not None:
                remove_owned(p)
            elif name == "checkpoints" and p.is_dir() and not p.is_symlink():
                for _, step in list_checkpoints(p):
                    remove_checkpoint(step)
                prune(p, keep=1)  # what is left: leftovers of a crash mid-write
                _remove_empty(p)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        log.warning("%s keeps files that finderpartner did not write: left in place", folder)


# --------------------------------------------------------------------------------------------------------------
# Settings changed between a checkpoint and the run that resumes it (the model section is refused in recipe.py)

# A resume under another value means nothing: refused (with why)
RESUME_REFUSED = {
    "train.batch_size": "the checkpoint's place in the data is counted in contrastive batches of {old}",
    "train.loss": "the checkpoint holds the state of the {old} objective",
}
# The checkpoint's optimizer state holds these: a new value is not used (said, so nobody believes it is)
RESUME_KEPT = ("train.lr", "train.betas", "train.eps", "train.weight_decay")
# These reshape the rest of the learning-rate schedule and the step count (recipe.py says how)
RESUME_SCHEDULE = ("train.epochs", "train.max_steps", "train.time_budget", "train.warmup_steps", "train.min_lr_ratio")
# These change which pairs the coming steps read, or in which order
RESUME_DATA = ("seed", "data.root", "data.train_split", "data.format", "data.train_shards", "data.augment")


def changed_settings(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """key -> (checkpoint's value, this run's) for every setting that differs (nested keys dotted)."""
    found: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found |= changed_settings(old, new, f"{prefix}{key}.")
        elif old != new and key in saved:  # a key the checkpoint's version did not have is no change
            found[f"{prefix}{key}"] = (old, new)
    return found


def resume_notes(changes: dict[str, tuple[Any, Any]], checkpoint: Path) -> list[str]:
    """What a resume does with each changed setting but the schedule's (recipe.py words those with its figures);
    raises ``CheckpointError`` for a change that makes the resume meaningless."""
    refused = [
        f"{key} {old} -> {new} ({RESUME_REFUSED[key].format(old=old)})"
        for key, (old, new) in changes.items()
        if key in RESUME_REFUSED
    ]
    if refused:
        raise CheckpointError(
            f"--resume {checkpoint}: {'; '.join(refused)}. Resume with the checkpoint's value, or start a new run "
            "(--set experiment=NEW_NAME) from its best model (model.name: <run>/best_model)"
        )
    notes = []
    kept = {k: v for k, v in changes.items() if k in RESUME_KEPT}
    if kept:
        notes.append(
            f"{', '.join(f'{k} {old} -> {new}' for k, (old, new) in kept.items())} since the checkpoint: not used, "
            "the resumed run keeps the checkpoint's values (its optimizer state holds them); to train with new ones, "
            "start a new run from the best model"
        )
    data = {k: v for k, v in changes.items() if k.startswith(RESUME_DATA)}
    if data:
        notes.append(
            f"{', '.join(f'{k} {old} -> {new}' for k, (old, new) in data.items())} since the checkpoint: the coming "
            "steps read the data as now configured (other pairs, or another order, than the run would have)"
        )
    rest = [k for k in changes if k not in RESUME_KEPT and not k.startswith(RESUME_DATA) and k not in RESUME_SCHEDULE]
    if rest:
        notes.append(f"also changed since the checkpoint, used from now on: {', '.join(rest)}")
    return notes


def explain_changes(run: Run, saved: dict[str, Any], path: Path) -> None:
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
