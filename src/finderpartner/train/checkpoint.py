"""Crash-safe training-state checkpoints and the best-model folder.

A checkpoint is a folder ``checkpoints/step_XXXXXX/`` written as ``.tmp-step_XXXXXX`` (with a proof file that
it is ours: ``outputs.mark_as_ours``), every file fsynced, a ``manifest.json`` (sizes and SHA-256 of every file)
written last, then renamed into place. A folder without a valid manifest is never resumed from. Nothing is
unpickled: tensors are safetensors, the optimizer state is read with ``torch.load(weights_only=True)``,
everything else is JSON.

Rotation (``prune``) keeps the checkpoint just written and the newest others up to ``train.keep_checkpoints``,
counting only usable ones: a damaged checkpoint (a file missing or of the wrong size) is deleted first and never
pushes a good one out. Deleting a checkpoint deletes the files its manifest lists, nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from ..config import config_to_dict
from ..errors import CheckpointError, OutputError
from ..outputs import (
    PROOF,
    fsync_dir,
    fsync_file,
    is_ours,
    mark_as_ours,
    remove_temporary,
    storage_error,
    usual_modes,
)
from .step import restore_rng

if TYPE_CHECKING:
    from .recipe import Resume, Run

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d{6,})")


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]  # trainer state, scheduler, scaler, config, versions


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint atomically, then delete all but the newest ``keep``. Returns its folder."""
    for name, tensor in model.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"refusing to write a checkpoint with non-finite weights ({name})")
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{final.name}"
    _remove_leftover(tmp)
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        mark_as_ours(tmp, f"checkpoint {final.name} being written")
        _write(
            tmp / "model.safetensors",
            lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, p),
        )
        _write(tmp / "optimizer.pt", lambda p: torch.save(optimizer, p))
        _write(tmp / "rng.safetensors", lambda p: save_file({k: v.contiguous() for k, v in rng.items()}, p))
        _write(tmp / "state.json", lambda p: Path(p).write_text(json.dumps(state, indent=2), encoding="utf-8"))
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "files": {f.name: _describe(f) for f in sorted(tmp.iterdir()) if f.name != PROOF},
        }
        _write(tmp / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2), encoding="utf-8"))
        fsync_dir(tmp)
        if final.exists():  # same step written again (e.g. final save right after a periodic one)
            remove_checkpoint(final)
        _put_in_place(tmp, final)
        fsync_dir(checkpoints_dir)
        (final / PROOF).unlink(missing_ok=True)
    except BaseException as e:  # torch.save reports a full disk as RuntimeError, safetensors as its own error
        if tmp.exists():  # made by this call (its proof may be unwritten on a full disk)
            shutil.rmtree(tmp, ignore_errors=True)
        err = storage_error(e, final, f"checkpoint {final}")
        if err is None:
            raise
        previous = latest_checkpoint(checkpoints_dir, check_files=False)
        kept = (
            f"; the previous checkpoint {previous.name} is intact: resume from it with --resume auto"
            if previous
            else ""
        )
        raise type(err)(f"{err}{kept}") from None
    prune(checkpoints_dir, keep, written=final)
    return final


def load_checkpoint(path: Path, *, verified: bool = False) -> Checkpoint:
    """Read a checkpoint folder, checking it against its manifest unless the caller just did (``verified``)."""
    problem = None if verified else verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return Checkpoint(
            path, load_file(path / "model.safetensors"), optimizer, load_file(path / "rng.safetensors"), state
        )
    except Exception as e:  # the manifest matched, so this means a format from another version
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from None


def verify(path: Path) -> str | None:
    """None when the folder is a complete checkpoint whose files match the manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest (the write did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    if manifest.get("format") != FORMAT_VERSION:
        return f"format {manifest.get('format')} is not {FORMAT_VERSION}"
    for name, expected in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != expected["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(f) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def manifest_digest(path: Path) -> str:
    """SHA-256 of a checkpoint's manifest, which lists every file's SHA-256: the checkpoint's identity."""
    return _sha256(path / MANIFEST)


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()
    ]
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path, check_files: bool = True) -> Path | None:
    """Newest complete checkpoint; incomplete or corrupt ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(checkpoints_dir)):
        problem = verify(path) if check_files else (None if (path / MANIFEST).is_file() else "no manifest")
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def prune(checkpoints_dir: Path, keep: int, written: Path | None = None) -> None:
    """Keep ``written`` (the checkpoint just saved) and the newest usable others, ``keep`` in all; delete the rest.

    A damaged checkpoint (``_damaged``: cheap, no hashing) never counts and is deleted first, so that a truncated
    newest checkpoint that a resume skipped cannot push out the one that run resumed from or has just written.
    """
    found = [path for _, path in list_checkpoints(checkpoints_dir) if (path / MANIFEST).is_file()]
    damaged = {path: problem for path in found if (problem := _damaged(path))}
    usable = [path for path in found if path not in damaged and path != written]
    others = keep - 1 if written is not None else keep
    kept = usable[-others:] if others > 0 else []
    for path, problem in damaged.items():
        if path != written:
            log.warning("deleting damaged checkpoint %s (%s)", path, problem)
            remove_checkpoint(path)
    for path in usable:
        if path not in kept:
            remove_checkpoint(path)
    for tmp in checkpoints_dir.glob(".tmp-step_*"):  # left behind by a crash mid-write (ours only)
        _remove_leftover(tmp)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint: the files its manifest lists, the manifest, the folder if that empties it."""
    try:
        listed = list(json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("files", {}))
    except (OSError, ValueError, AttributeError):
        listed = []
    for name in [*listed, MANIFEST, PROOF]:
        if "/" not in name and name not in ("", ".", ".."):
            (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        log.warning("checkpoint folder %s keeps files that finderpartner did not write: left in place", path)


def _damaged(path: Path) -> str | None:
    """What is wrong with a checkpoint found without hashing (a missing or resized file), else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        for name, expected in manifest["files"].items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != expected["size"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {expected['size']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest ({e})"
    return None


def _remove_leftover(tmp: Path) -> None:
    """Remove a half-written checkpoint folder of ours; refuse to write over one that is not ours."""
    if not (tmp.exists() or tmp.is_symlink()):
        return
    if tmp.is_dir() and not tmp.is_symlink() and {p.name for p in tmp.iterdir()} <= {PROOF} and not is_ours(tmp):
        shutil.rmtree(tmp)  # killed (or out of space) before its proof was written whole: nothing else inside
        return
    if not is_ours(tmp):
        raise OutputError(
            f"{tmp} was not made by finderpartner (it has no proof file), and a checkpoint is written under that "
            "name: move it away and resume with --resume auto"
        )
    remove_temporary(tmp)


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the written folder into place; into a folder that kept a user's files, file by file."""
    if not final.exists():
        os.replace(tmp, final)
        return
    for f in tmp.iterdir():
        os.replace(f, final / f.name)
    tmp.rmdir()


def _write(path: Path, writer: Callable[[str], Any]) -> None:
    writer(str(path))
    usual_modes(path)  # safetensors writes 0600
    fsync_file(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def resume_run(run: Run, resume: Resume) -> dict[str, Any]:
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
    for f in dataclasses.fields(run.state):
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


# Checkpoint keys of the objective's parameters that are not the model's (next to the model's own weights).
OBJECTIVE_PREFIX = "objective."


def objective_tensors(run: Run) -> dict[str, torch.Tensor]:
    """The objective's parameters that the model's state does not hold, by checkpoint key.

    None for CLIP (its temperature is the model's ``logit_scale``), so its checkpoints are as before.
    """
    in_model = {id(p) for p in run.model.parameters()}
    return {
        OBJECTIVE_PREFIX + name: p.detach() for name, p in run.objective.named_parameters() if id(p) not in in_model
    }


def _restore_objective(run: Run, saved: dict[str, torch.Tensor], path: Path) -> None:
    """Load the objective's own parameters; a checkpoint without them (older, or CLIP) leaves their initial values."""
    for key, p in objective_tensors(run).items():
        if key in saved:
            with torch.no_grad():
                p.copy_(saved[key])
        else:
            log.warning("%s holds no %s: it starts from its initial value", path, key)
