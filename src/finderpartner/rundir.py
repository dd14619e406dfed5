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

from .checkpoint import latest_checkpoint, list_checkpoints, prune, remove_checkpoint, verify
from .config import Config, render_yaml
from .data.dataset import split_paths
from .errors import CheckpointError, OutputError, UsageError
from .outputs import (
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
    lock = FolderLock(run_dir).acquire()
    try:
        resume = decide_run(run_dir, resume, overwrite)
        with storage_errors(run_dir, f"the run folder {run_dir}"):
            write_marker(run_dir, "run", {"experiment": cfg.experiment})
            write_text_atomic(run_dir / "config.yaml", render_yaml(cfg))
    except BaseException:
        lock.release()
        raise
    return lock, resume


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
