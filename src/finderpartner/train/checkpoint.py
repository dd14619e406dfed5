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

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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
