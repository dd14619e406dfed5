"""Crash-safe training-state checkpoints and the best-model folder.

A checkpoint is a folder ``checkpoints/step_XXXXXX/`` written as ``.tmp-step_XXXXXX``, every file fsynced,
a ``manifest.json`` (sizes and SHA-256 of every file) written last, then renamed into place. A folder without
a valid manifest is never resumed from. Nothing is unpickled: tensors are safetensors, the optimizer state is
read with ``torch.load(weights_only=True)``, everything else is JSON.
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

from .errors import CheckpointError
from .outputs import fsync_dir, fsync_file, storage_error, usual_modes

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
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
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
            "files": {f.name: _describe(f) for f in sorted(tmp.iterdir())},
        }
        _write(tmp / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2), encoding="utf-8"))
        fsync_dir(tmp)
        if final.exists():  # same step written again (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
    except BaseException as e:  # torch.save reports a full disk as RuntimeError, safetensors as its own error
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


def prune(checkpoints_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (a damaged one never pushes a good one out)."""
    complete = [path for _, path in list_checkpoints(checkpoints_dir) if (path / MANIFEST).is_file()]
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for tmp in checkpoints_dir.glob(".tmp-step_*"):  # left behind by a crash mid-write
        shutil.rmtree(tmp, ignore_errors=True)


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
