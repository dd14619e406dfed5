"""Output folders and writes: the one rule every command that writes follows.

**Never delete or overwrite what this command did not create.** Every folder a command makes carries a marker,
``.finderpartner.json`` (``{"kind": "index", "inputs": {...}}``). Before a command writes to a folder,
``claim_output`` decides:

* an output equal to or inside one of the command's inputs (or an input inside the output) is always refused;
* a missing or empty folder, or one this command made for the same inputs, is written to;
* a folder this command made for other inputs (or one too damaged to read) is refused unless ``--overwrite``;
* anything else (files finderpartner did not write, or another command's folder) is always refused: nothing
  in it is touched.

Folders are replaced atomically (``replace_dir``: written beside as ``.tmp-NAME``, then renamed), files too
(``write_text_atomic``). A failed write (disk full, read-only, no permission) removes its own temporary files,
leaves the earlier version intact and ends in a ``StorageError`` that names the path and the free space.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import FinderPartnerError, OutputError, StorageError

MARKER = ".finderpartner.json"
# errno values that mean "the storage refused the write", not a bug
_STORAGE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EFBIG,
    errno.EIO,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
    errno.ELOOP,
}
# How libraries that do not raise OSError word ENOSPC (torch.save: PytorchStreamWriter; safetensors: Rust io::Error)
_DISK_FULL_WORDS = ("no space left", "os error 28", "storagefull", "file write failed", "unexpected pos", "disk quota")
# Names a folder may hold without counting as content (lock files, OS litter)
_IGNORED = {".lock", ".DS_Store", "Thumbs.db", "desktop.ini"}


# --------------------------------------------------------------------------------------------------------------
# Claiming an output folder


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_marker(folder: Path, kind: str, inputs: Mapping[str, Any], **extra: Any) -> None:
    write_text_atomic(folder / MARKER, json.dumps({"kind": kind, "inputs": _plain(inputs), **extra}, indent=2))


def describe_kind(kind: str) -> str:
    return {
        "run": "a training run folder",
        "index": "a gallery index",
        "export": "an ONNX export folder",
        "shards": "a WebDataset shard folder",
        "sample-data": "a sample data set",
        "eval": "an evaluation report folder",
        "convert": "a converted model folder (finderpartner convert)",
    }.get(kind, f"a finderpartner {kind} folder")


def check_not_input(out: Path, inputs: Mapping[str, Any], flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside an input folder or file (symlinks resolved)."""
    out_real = Path(os.path.realpath(out))
    for name, value in inputs.items():
        if value is None or not isinstance(value, (str, Path)) or not Path(value).exists():
            continue
        in_real = Path(os.path.realpath(value))
        if out_real == in_real:
            how = "is"
        elif in_real in out_real.parents:
            how = "is inside"
        elif out_real in in_real.parents:
            how = "contains"
        else:
            continue
        raise OutputError(
            f"{flag} {out} {how} the input {name} {value}: writing there could replace your files; "
            f"choose a {flag} outside it"
        )


def claim_output(
    out: Path,
    kind: str,
    inputs: Mapping[str, Any],
    *,
    overwrite: bool = False,
    flag: str = "--out",
    legacy: Callable[[Path], dict[str, Any] | None] | None = None,
    same: Callable[[Mapping[str, Any], Mapping[str, Any]], bool] | None = None,
    protect: Mapping[str, Any] | None = None,
    overlap: Mapping[str, Any] | None = None,
) -> str:
    """Decide whether ``out`` may be written by command ``kind`` for ``inputs``; raise ``OutputError`` if not.

    Returns ``"new"`` (missing or empty), ``"same"`` (made by this command for these inputs) or ``"replace"``
    (made by this command for other inputs, and ``overwrite`` was given). ``legacy`` recognises folders written
    before markers existed and returns their inputs; ``same`` compares inputs (default: equality); ``protect``
    names further paths the output must stay out of (a model folder, say) without being part of its identity;
    ``overlap``, when given, replaces ``inputs`` in that check (a shard folder may sit inside the data folder,
    not inside its images).
    """
    check_not_input(out, {**(inputs if overlap is None else overlap), **(protect or {})}, flag)
    if not out.exists() and not out.is_symlink():
        return "new"
    if not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a folder; choose a folder name")
    contents = _contents(out)
    if not contents:
        return "new"
    marker = read_marker(out)
    if marker is None and legacy is not None:
        found = legacy(out)
        marker = {"kind": kind, "inputs": found} if found is not None else None
    if marker is None:
        listing = ", ".join(sorted(contents)[:5]) + (", ..." if len(contents) > 5 else "")
        raise OutputError(
            f"{flag} {out} already exists and holds {len(contents)} item(s) that finderpartner did not "
            f"write ({listing}); it never replaces them: choose a new or empty folder"
        )
    if marker["kind"] != kind:
        raise OutputError(
            f"{flag} {out} is {describe_kind(marker['kind'])}, not {describe_kind(kind)}; choose another folder"
        )
    previous = marker.get("inputs") or {}
    if (same or _same_inputs)(previous, _plain(inputs)):
        return "same"
    if overwrite:
        return "replace"
    made_from = ", ".join(f"{k} {v}" for k, v in previous.items()) or "other inputs"
    raise OutputError(
        f"{flag} {out} is {describe_kind(kind)} made from {made_from}; pass --overwrite to replace it, "
        "or choose another folder"
    )


def _contents(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name not in _IGNORED and not p.name.startswith((".tmp-", ".old-"))]


def _same_inputs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return dict(a) == dict(b)


def _plain(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs as JSON values; paths made absolute so the same folder reached from another cwd compares equal."""
    return {k: os.path.abspath(v) if isinstance(v, Path) else v for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------------------------
# Writing without losing anything


def storage_error(e: BaseException, path: Path, what: str = "", verb: str = "write") -> StorageError | None:
    """A ``StorageError`` naming ``path`` and its disk's free space when ``e`` is a refused write, else None."""
    if isinstance(e, StorageError):
        return e
    if isinstance(e, FinderPartnerError):
        return None
    text = str(e).lower()
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or any(
        w in text for w in _DISK_FULL_WORDS
    )
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS and not full:
        reason = e.strerror or str(e)
        return StorageError(
            f"could not {verb} {what or path}: {reason} ({e.filename or path}); check the path, the "
            "folder's permissions, and whether the disk is mounted read-only"
        )
    if not full:
        return None
    return StorageError(
        f"disk full while writing {what or path}: {free_space(path)}; free space there (or choose "
        "another disk) and run the command again"
    )


def free_space(path: Path) -> str:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the disk holding {probe}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@contextmanager
def storage_errors(path: Path, what: str = "") -> Iterator[None]:
    """Turn a refused write inside the block into a ``StorageError`` naming ``path`` (other errors pass)."""
    try:
        yield
    except BaseException as e:
        err = storage_error(e, path, what)
        if err is None or err is e:
            raise
        raise err from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file beside its final name and rename it: a failure leaves the previous file untouched."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with storage_errors(path):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# A new file's mode when open() creates it: 0666 minus the umask (read once, at import, before threads start).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def usual_modes(path: Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode any file we write has: 0666 minus the umask.

    Some writers create their files private (safetensors' ``save_file`` writes 0600), which a web server or a
    colleague running as another user then cannot read.
    """
    for file in [path] if path.is_file() else (f for f in path.rglob("*") if f.is_file() and not f.is_symlink()):
        if file.stat().st_mode & 0o777 != FILE_MODE:
            os.chmod(file, FILE_MODE)


def replace_dir(write: Callable[[Path], Any], target: Path, *, what: str = "") -> None:
    """Write a folder with ``write(tmp)`` and swap it in, so ``target`` is never half-written.

    The caller has claimed ``target`` (``claim_output``) or owns it (a run's ``best_model/``). Whatever ``write``
    raises, its temporary folder is removed and the previous ``target`` stays; a refused write becomes a
    ``StorageError``.
    """
    tmp = target.with_name(f".tmp-{target.name}")
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        usual_modes(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:  # a failing writer (export, index, best model) leaves nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        err = storage_error(e, target, what)
        if err is None or err is e:
            raise
        kept = "; the previous version is intact" if target.exists() else ""
        raise StorageError(f"{err}{kept}") from None


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
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


# --------------------------------------------------------------------------------------------------------------
# One process per run folder


class FolderLock:
    """An exclusive OS lock on ``<folder>/.lock``: released when the process ends, however it ends (a SIGKILL
    leaves no stale lock). A second process gets ``OutputError("... in use by PID N")``."""

    def __init__(self, folder: Path, what: str = "run folder"):
        self.path = folder / ".lock"
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        with storage_errors(self.path, f"the lock file of {self.path.parent}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            try:
                os.lseek(fd, 0, os.SEEK_SET)  # (os.pread/pwrite do not exist on Windows)
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise OutputError(
                f"{self.what} {self.path.parent} is in use by PID {holder} (another finderpartner "
                "process); wait for it to finish, or write elsewhere (e.g. --set experiment=NEW_NAME)"
            ) from None
        try:  # best effort: the PID is only for the message above
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
