"""Crash-safe training-state checkpoints and the best-model folder.

A checkpoint is a folder ``checkpoints/step_XXXXXX/`` written as ``.tmp-step_XXXXXX``, every file fsynced,
a ``manifest.json`` (sizes and SHA-256 of every file) written last, then renamed into place. A folder without
a valid manifest is never resumed from. Nothing is unpickled: tensors are safetensors, the optimizer state is
read with ``torch.load(weights_only=True)``, everything else is JSON.
"""

from __future__ import annotations

import errno
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

from .errors import CheckpointError

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
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write(tmp / "model.safetensors", lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, p))
        _write(tmp / "optimizer.pt", lambda p: torch.save(optimizer, p))
        _write(tmp / "rng.safetensors", lambda p: save_file({k: v.contiguous() for k, v in rng.items()}, p))
        _write(tmp / "state.json", lambda p: Path(p).write_text(json.dumps(state, indent=2), encoding="utf-8"))
        manifest = {"format": FORMAT_VERSION, "step": step, "files": {f.name: _describe(f) for f in sorted(tmp.iterdir())}}
        _write(tmp / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2), encoding="utf-8"))
        _fsync_dir(tmp)
        if final.exists():  # same step written again (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoints_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(checkpoints_dir, check_files=False)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while writing checkpoint {final}: free space on that disk{kept}") from None
        raise CheckpointError(f"could not write checkpoint {final}: {e}{kept}") from None
    prune(checkpoints_dir, keep)
    return final


def load_checkpoint(path: Path, *, verified: bool = False) -> Checkpoint:
    """Read a checkpoint folder, checking it against its manifest unless the caller just did (``verified``)."""
    problem = None if verified else verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return Checkpoint(path, load_file(path / "model.safetensors"), optimizer, load_file(path / "rng.safetensors"), state)
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


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path, check_files: bool = True) -> Path | None:
    """Newest complete checkpoint; incomplete or corrupt ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(checkpoints_dir)):
        problem = verify(path) if check_files else (None if (path / MANIFEST).is_file() else "no manifest")
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def prune(checkpoints_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (a damaged one never pushes a good one out)."""
    complete = [path for _, path in list_checkpoints(checkpoints_dir) if (path / MANIFEST).is_file()]
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for tmp in checkpoints_dir.glob(".tmp-step_*"):  # left behind by a crash mid-write
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(write: Callable[[Path], Any], target: Path) -> None:
    """Write a folder with ``write(tmp)`` and swap it in, so ``target`` is never half-written."""
    tmp = target.with_name(f".tmp-{target.name}")
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:  # a failing writer (export, index) must not leave its half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        if not isinstance(e, OSError):
            raise
        reason = "disk full" if e.errno == errno.ENOSPC else str(e)
        raise CheckpointError(f"could not write {target}: {reason}; the previous version is intact") from None


def _write(path: Path, writer: Callable[[str], Any]) -> None:
    writer(str(path))
    _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}
