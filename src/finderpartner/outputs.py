"""Output folders and writes: the one rule every command that writes follows.

**Never delete or overwrite what this command did not create.** Every folder a command makes carries a marker,
``.finderpartner.json``: ``{"kind": "index", "inputs": {...}, "files": [...]}``, where ``files`` lists, relative
to the folder, every file the command wrote there. Before a command writes to a folder, ``claim_output`` decides:

* an output equal to or inside one of the command's inputs (or an input inside the output) is always refused;
* a missing or empty folder, or one this command made for the same inputs, is written to;
* a folder this command made for other inputs (or one too damaged to read) is refused unless ``--overwrite``;
* anything else (files finderpartner did not write, or another command's folder) is always refused: nothing
  in it is touched.

"Empty" ignores only the lock file, the tool's own proven temporaries and the litter operating systems drop into
any folder a user opens (``.DS_Store``, ``Thumbs.db``, ``desktop.ini``); those are never removed either. A hidden
user file (``.old-drafts/``) is content like any other.

**Replacing its own output** (``write_output``) removes exactly the files the previous marker lists (and the
folders that held them, only when they are then empty) and leaves everything else a user put there since. A user
file where the command wants to write one is refused, by name, before anything moves. The write is atomic for
the command's own files: the new files are written into a staging folder *inside* the output,
``.finderpartner-staging/`` (never a sibling: the output's parent is not touched, and ``--out .`` works), which
holds a proof file naming it as ours and the lock of the write. Only once the whole output is written are the
old files moved aside into the staging folder and the new ones moved in, by rename, after a journal listing
both; the new marker, renamed over the old one, is the commit point. A failure before the commit (an exception,
a full disk, Ctrl-C, SIGTERM) moves everything back at once; a process killed outright (SIGKILL, power loss)
leaves the journal, and the next command that claims the folder finishes the job (rolls back before the commit,
cleans up after it). A staging folder without the proof file is a user's and is never touched; one whose lock
is held is another process's write in progress, and the command is refused ("in use by PID N").

Single files are written atomically too (``write_text_atomic``: a temporary beside them, created exclusively,
then renamed). Commands that add files to their own folder one at a time (evaluation reports, the export's
verification) record each name in the marker before writing it (``claim_files``), after checking it is free or
already theirs. A failed write (disk full, read-only, no permission) removes its own temporary files, leaves the
earlier version intact and ends in a ``StorageError`` that names the path and the free space.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import FinderPartnerError, OutputError, StorageError

MARKER = ".finderpartner.json"
STAGING = ".finderpartner-staging"  # inside an output: where its next version is written (write_output)
PROOF = "staging.json"  # inside STAGING (and inside a checkpoint's .tmp-step_*): proof that finderpartner made it
_JOURNAL = "journal.json"  # inside STAGING: which files move where; present from the first move to the cleanup
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
# How libraries word ENOSPC without an errno (torch.save: PytorchStreamWriter; safetensors: Rust io::Error; numpy's
# tofile, which the ONNX exporter writes external data with: an OSError with no errno)
_DISK_FULL_WORDS = (
    "no space left",
    "os error 28",
    "storagefull",
    "file write failed",
    "unexpected pos",
    "disk quota",
    "problem writing element",
)
# What operating systems drop into any folder a user opens: never content, never removed
_LITTER = {".DS_Store", "Thumbs.db", "desktop.ini"}


# --------------------------------------------------------------------------------------------------------------
# Claiming an output folder


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def marked_files(marker: Mapping[str, Any] | None) -> set[str] | None:
    """The files a marker says its command wrote (relative paths); None for a marker of a version that did not
    list them (then only the files a new write puts at the same paths count as ours: see ``write_output``)."""
    files = (marker or {}).get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {f for f in files if _safe_relative(f)}


def write_marker(
    folder: Path, kind: str, inputs: Mapping[str, Any], *, files: Iterable[str] | None = None, **extra: Any
) -> None:
    """The folder's marker: what made it, from what, and every file it wrote there (relative paths). Without
    ``files`` (the run folder, which keeps its own list: ``rundir.RUN_ARTEFACTS``) no list is written."""
    write_text_atomic(folder / MARKER, _marker_text(kind, inputs, files, extra))


def _marker_text(kind: str, inputs: Mapping[str, Any], files: Iterable[str] | None, extra: Mapping[str, Any]) -> str:
    marker = {"kind": kind, "inputs": _plain(inputs), **extra}
    if files is not None:
        marker["files"] = sorted(set(files) - {MARKER})
    return json.dumps(marker, indent=2)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_kind(kind: str) -> str:
    return {
        "run": "a training run folder",
        "index": "a gallery index",
        "export": "an ONNX export folder",
        "shards": "a WebDataset shard folder",
        "sample-data": "a sample data set",
        "eval": "an evaluation report folder",
        "convert": "a converted model folder (finderpartner convert)",
        "best_model": "a run's best model folder",
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
    not inside its images). An earlier write of this folder that was killed halfway is finished first
    (``recover``); one still running in another process is refused.
    """
    check_not_input(out, {**(inputs if overlap is None else overlap), **(protect or {})}, flag)
    if not out.exists() and not out.is_symlink():
        return "new"
    if not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a folder; choose a folder name")
    recover(out)
    held = contents(out)
    if not held:
        return "new"
    marker = read_marker(out)
    if marker is None and legacy is not None:
        found = legacy(out)
        marker = {"kind": kind, "inputs": found} if found is not None else None
    if marker is None:
        listing = ", ".join(sorted(held)[:5]) + (", ..." if len(held) > 5 else "")
        raise OutputError(
            f"{flag} {out} already exists and holds {len(held)} item(s) that finderpartner did not "
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
    made_from = ", ".join(f"{k}: {v}" for k, v in previous.items() if v is not None) or "other inputs"
    raise OutputError(
        f"{flag} {out} is {describe_kind(kind)} made from {made_from}; pass --overwrite to replace it, "
        "or choose another folder"
    )


def contents(folder: Path) -> list[str]:
    """What makes a folder non-empty: everything but the lock file, OS litter and our own proven staging folder."""
    return [
        p.name
        for p in folder.iterdir()
        if p.name not in _LITTER and p.name != ".lock" and not (p.name == STAGING and is_ours(p))
    ]


def _same_inputs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return dict(a) == dict(b)


def _plain(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs as JSON values; paths made absolute so the same folder reached from another cwd compares equal."""
    return {k: os.path.abspath(v) if isinstance(v, Path) else v for k, v in inputs.items()}


def _safe_relative(name: str) -> bool:
    """A marker's file name that stays inside its folder (a hand-edited marker cannot point elsewhere)."""
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and p.parts[0] != STAGING


# --------------------------------------------------------------------------------------------------------------
# Replacing an output: only our own files, atomically


def mark_as_ours(folder: Path, purpose: str) -> None:
    """Put the proof into a temporary folder of ours (a folder without it is a user's and is never removed)."""
    (folder / PROOF).write_text(json.dumps({"finderpartner": purpose, "pid": os.getpid()}), encoding="utf-8")


def remove_temporary(folder: Path) -> None:
    """Remove a temporary folder of ours, its proof last: killed halfway, it is still recognisably ours."""
    for child in folder.iterdir():
        if child.name == PROOF:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / PROOF).unlink(missing_ok=True)
    folder.rmdir()


def is_ours(folder: Path) -> bool:
    """Whether ``folder`` is a temporary folder finderpartner made (it holds the proof ``mark_as_ours`` wrote)."""
    try:
        proof = json.loads((folder / PROOF).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(proof, dict) and "finderpartner" in proof and not folder.is_symlink()


def write_output(
    write: Callable[[Path], Any],
    target: Path,
    kind: str,
    inputs: Mapping[str, Any],
    *,
    what: str = "",
    keep: Iterable[str] = (),
    flag: str = "--out",
    **extra: Any,
) -> Any:
    """Write the folder ``target`` with ``write(folder)`` (a new, empty path) and put it in place; returns what
    ``write`` returned. The caller has claimed ``target`` (``claim_output``) or owns it (a run's ``best_model/``).

    Of the previous version, exactly the files its marker lists are replaced or removed, except ``keep`` (files
    of it that stay, and stay listed: an export's other variants); everything else in ``target`` stays. A user
    file where ``write`` put one refuses the whole write, naming it, before anything in ``target`` changes. The
    new marker (``kind``, ``inputs``, ``extra``) lists the new files. Whatever fails, the previous version is
    what ``target`` holds afterwards (module docstring: how), and a refused write becomes a ``StorageError``.
    """
    target = Path(os.path.abspath(target))
    created = not target.exists()
    stage = _open_stage(target, what, flag)
    lock = FolderLock(stage, what="output folder", place=target)
    try:
        with storage_errors(target, what):
            lock.acquire()
            mark_as_ours(stage, f"the next version of {target.name}")
        result = write(stage / "new")
        with storage_errors(target, what):
            (stage / "new" / MARKER).unlink(missing_ok=True)  # the marker is written here, at the commit
            new = _files_under(stage / "new")
            usual_modes(stage / "new")  # some writers (safetensors) make their files 0600
            for f in new:
                fsync_file(stage / "new" / f)
        marker = read_marker(target)
        listed = marked_files(marker)
        kept = set(keep) & (listed or set()) - new
        _refuse_collisions(target, new, listed, flag)
        old = sorted((listed if listed is not None else new & _files_under(target)) - kept - {MARKER})
        marker_text = _marker_text(kind, inputs, new | kept, extra)
        journal = {
            "marker": _digest(marker_text),
            "old": old,
            "new": sorted(new),
            "dirs": _missing_dirs(target, new, stage / "new"),
        }
        with _signals_held(), storage_errors(target, what):
            write_text_atomic(stage / MARKER, marker_text)
            write_text_atomic(stage / _JOURNAL, json.dumps(journal))
            try:
                _move_in(target, stage, journal)
                os.replace(stage / MARKER, target / MARKER)  # the commit
            except BaseException:
                _roll_back(target, stage, journal)
                raise
            fsync_dir(target)
            _finish(target, stage, journal)
        return result
    except BaseException as e:
        lock.release()
        if stage.exists() and not (stage / _JOURNAL).exists():  # made by this call (its proof may be unwritten)
            shutil.rmtree(stage, ignore_errors=True)
        if created:
            _remove_empty(target)
        err = storage_error(e, target, what)
        if err is None:
            raise
        note = "; the previous version is intact" if not created and "previous version" not in str(err) else ""
        if err is e and not note:
            raise
        raise StorageError(f"{err}{note}") from None
    finally:
        lock.release()


def _open_stage(target: Path, what: str, flag: str) -> Path:
    """Make ``target`` (finishing or undoing an interrupted write first) and its new, empty staging folder."""
    stage = target / STAGING
    with storage_errors(target, what):
        target.mkdir(parents=True, exist_ok=True)
        recover(target)
        _refuse_foreign_stage(stage)
        try:
            stage.mkdir()
        except FileExistsError:  # another process began writing here this very moment
            raise OutputError(
                f"{flag} {target} is being written by another finderpartner process; wait for it "
                "to finish, or choose another folder"
            ) from None
    return stage


def _files_under(folder: Path) -> set[str]:
    """Every file (or symlink) under ``folder``, as relative POSIX paths; the staging folder left out."""
    if not folder.is_dir():
        return set()
    found = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        dirs[:] = [d for d in dirs if not (rel == Path(".") and d == STAGING)]
        dirs_links = [d for d in dirs if (Path(root) / d).is_symlink()]
        for name in [*files, *dirs_links]:
            found.add((rel / name).as_posix())
        dirs[:] = [d for d in dirs if d not in dirs_links]
    return found


def _refuse_collisions(target: Path, new: set[str], listed: set[str] | None, flag: str) -> None:
    """A new file whose path holds something we did not write (or runs through a file or a symlink): refused."""
    for name in sorted(new):
        parts = Path(name).parts
        for i in range(1, len(parts)):  # the folders on the way
            folder = target.joinpath(*parts[:i])
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise OutputError(
                    f"{flag} {target}: {folder} is in the way (this command writes {name} there, and "
                    f"{folder.name} is {'a link' if folder.is_symlink() else 'a file'} it did not write); move it "
                    "away or choose another folder. Nothing was changed"
                )
        dest = target / name
        if not (dest.exists() or dest.is_symlink()):
            continue
        ours = name in listed if listed is not None else dest.is_file() and not dest.is_symlink()
        if not ours:
            raise OutputError(
                f"{flag} {target}: {dest} was not written by finderpartner, and this command writes a file of that "
                "name there; move it away or choose another folder. Nothing was changed"
            )


def _missing_dirs(target: Path, new: set[str], written: Path) -> list[str]:
    """The folders the new files need (and the empty ones ``written`` holds) that ``target`` lacks, parents first
    (the roll-back removes them again)."""
    empty = {Path(root).relative_to(written) for root, dirs, files in os.walk(written) if not dirs and not files}
    dirs = ({Path(n).parent for n in new} | empty) - {Path(".")}
    wanted = sorted({p for d in dirs for p in [d, *d.parents] if p != Path(".")}, key=lambda p: len(p.parts))
    return [d.as_posix() for d in wanted if not (target / d).exists()]


def _move_in(target: Path, stage: Path, journal: Mapping[str, Any]) -> None:
    for name in journal["old"]:  # the previous version's files, aside (kept until the commit)
        src = target / name
        if src.exists() or src.is_symlink():
            (stage / "old" / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, stage / "old" / name)
    for d in journal["dirs"]:
        (target / d).mkdir(exist_ok=True)
    for name in journal["new"]:
        os.replace(stage / "new" / name, target / name)


def _roll_back(target: Path, stage: Path, journal: Mapping[str, Any]) -> None:
    """Undo ``_move_in`` as far as it went: new files back into the stage, old ones back in place."""
    for name in journal["new"]:
        dest, staged = target / name, stage / "new" / name
        if (dest.exists() or dest.is_symlink()) and not (staged.exists() or staged.is_symlink()):
            staged.parent.mkdir(parents=True, exist_ok=True)
            os.replace(dest, staged)
    for name in journal["old"]:
        aside = stage / "old" / name
        if aside.exists() or aside.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(aside, target / name)
    for d in reversed(journal["dirs"]):
        _remove_empty(target / d)
    (stage / _JOURNAL).unlink()  # from here on the stage is a plain leftover
    remove_temporary(stage)


def _finish(target: Path, stage: Path, journal: Mapping[str, Any]) -> None:
    """After the commit: drop the old files (in the stage) and the folders only they used."""
    remove_temporary(stage)
    new_dirs = {p for n in journal["new"] for p in Path(n).parents}
    old_dirs = {p for n in journal["old"] for p in Path(n).parents} - new_dirs - {Path(".")}
    for d in sorted(old_dirs, key=lambda p: -len(p.parts)):
        _remove_empty(target / d)


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` if it is empty (a folder holding anything, a user's file say, stays)."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _refuse_foreign_stage(stage: Path) -> None:
    """A staging folder without our proof: a user's (never touched), or one another process is just creating."""
    if not (stage.exists() or stage.is_symlink()) or _remove_if_stillborn(stage):
        return
    holder = _lock_holder(stage)
    if holder is not None:
        raise OutputError(
            f"{stage.parent} is being written by another finderpartner process (PID {holder}); wait for it to "
            "finish, or choose another folder"
        )
    raise OutputError(
        f"{stage.parent} holds {STAGING}, which finderpartner did not make (it has no proof file inside); "
        "finderpartner stages its output under that name: move it away and run the command again"
    )


def _remove_if_stillborn(stage: Path) -> bool:
    """Remove a staging folder of ours that died (killed, or out of space) before its proof was written whole:
    nothing but a lock nobody holds and at most an unreadable proof file inside. True when it was removed."""
    if not stage.is_dir() or stage.is_symlink() or {p.name for p in stage.iterdir()} - {".lock", PROOF}:
        return False
    if is_ours(stage) or _lock_holder(stage) is not None:  # a proven one (recover's business) or a live write
        return False
    shutil.rmtree(stage)
    return True


def _lock_holder(folder: Path) -> str | None:
    """The PID written in ``folder/.lock`` when another process holds that lock; None when nobody does (or there
    is no lock file: none is created here, the folder may be a user's)."""
    try:
        fd = os.open(folder / ".lock", os.O_RDWR)
    except OSError:
        return None
    try:
        _lock(fd)
    except OSError:
        return os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def recover(target: Path) -> None:
    """Finish an earlier write of ``target`` that was killed halfway (``write_output``'s staging folder).

    Before its commit the previous version is restored, after it the old files are dropped; a staging folder
    without a journal (killed while writing) is removed. One whose lock another process holds is refused.
    """
    stage = Path(target) / STAGING
    if not stage.is_dir() or _remove_if_stillborn(stage) or not is_ours(stage):
        return
    lock = FolderLock(stage, what="output folder", place=Path(target))
    with storage_errors(target, f"the interrupted write in {target}"):
        lock.acquire()  # refused with the PID while another process writes here
        try:
            journal = json.loads((stage / _JOURNAL).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            journal = None
        try:
            if journal is None:
                remove_temporary(stage)
            elif _committed(Path(target), journal):
                _finish(Path(target), stage, journal)
            else:
                _roll_back(Path(target), stage, journal)
        finally:
            lock.release()


def _committed(target: Path, journal: Mapping[str, Any]) -> bool:
    """Whether the write the journal describes reached its commit: the marker in place is the one it wrote."""
    try:
        return _digest((target / MARKER).read_text(encoding="utf-8")) == journal.get("marker")
    except OSError:
        return False


def remove_owned(folder: Path) -> None:
    """Delete what the folder's marker lists (and the marker, and folders left empty), nothing else: the folder
    itself goes only if that leaves it empty. A folder without a listing marker is left alone."""
    marker = read_marker(folder)
    listed = marked_files(marker)
    if listed is None:
        return
    for name in listed:
        p = folder / name
        if p.is_file() or p.is_symlink():
            p.unlink()
    (folder / MARKER).unlink(missing_ok=True)
    for d in sorted({q for n in listed for q in Path(n).parents} - {Path(".")}, key=lambda q: -len(q.parts)):
        _remove_empty(folder / d)
    _remove_empty(folder)


def claim_files(folder: Path, kind: str, inputs: Mapping[str, Any], names: Iterable[str], **extra: Any) -> None:
    """Before adding files to a folder of ours one by one (an evaluation report, the export's verification):
    refuse a name that holds a file we did not write, then record the names in the marker (before writing them,
    so that an interrupted write is still ours). The folder has been claimed (``claim_output``)."""
    names = set(names)
    marker = read_marker(folder) if folder.is_dir() else None
    listed = marked_files(marker)
    for name in sorted(names):
        dest = folder / name
        if (dest.exists() or dest.is_symlink()) and (listed is None or name not in listed):
            if listed is None and marker is not None and dest.is_file():
                continue  # a marker of a version that listed nothing: its own files had these names
            raise OutputError(
                f"{dest} was not written by finderpartner, and this command writes a file of that name there; "
                "move it away or choose another folder. Nothing was changed"
            )
    keep = {k: v for k, v in (marker or {}).items() if k not in ("kind", "inputs", "files")}
    with storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        write_marker(folder, kind, inputs, files=(listed or set()) | names, **{**keep, **extra})


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait while files are renamed (milliseconds), so that the moves finish together; each
    one received is delivered right after, to the handler that was in place. Main thread only (elsewhere Python
    runs no signal handler anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not None:  # None: a handler installed outside Python, left alone
            previous[s] = signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:
            signal.raise_signal(s)


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


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` for the block to write (a plot, say); renamed to ``path`` when the
    block succeeds, removed when it fails: ``path`` is the previous file or the new one, never half of one."""
    path = Path(path)
    with storage_errors(path):
        tmp, fd = _new_file(path.parent, f".tmp-{path.name}.")
        os.close(fd)
    try:
        yield tmp
        with storage_errors(path):
            fsync_file(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file beside its final name and rename it: a failure leaves the previous file untouched.

    The temporary is created exclusively under a fresh name (``.tmp-NAME.XXXXXXXX``), so no file of a user's is
    ever overwritten or removed on the way.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        with storage_errors(path):
            tmp, fd = _new_file(path.parent, f".tmp-{path.name}.")
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


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


def _new_file(folder: Path, prefix: str) -> tuple[Path, int]:
    """A new file under a fresh name (created exclusively, so nothing is overwritten), with the usual permissions
    (0666 less the umask, as ``open`` gives; ``tempfile.mkstemp`` would make it 0600)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}"
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


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

    def __init__(self, folder: Path, what: str = "run folder", place: Path | None = None):
        self.path = folder / ".lock"
        self.what = what
        self.place = place or folder  # the folder named in the message
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
            elsewhere = "(e.g. --set experiment=NEW_NAME)" if self.what == "run folder" else "(another --out)"
            raise OutputError(
                f"{self.what} {self.place} is in use by PID {holder} (another finderpartner "
                f"process); wait for it to finish, or write elsewhere {elsewhere}"
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
