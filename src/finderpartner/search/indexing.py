"""``finderpartner index``: embed a folder or a list of photos into a photo store, in parallel, in resumable parts.

1. The main process (rank 0) claims the store (its lock is held until the end), lists the photos (a folder, or a
   CSV/JSONL list; ``--attributes`` adds columns), drops those the store holds with the same size and mtime, and
   those embedded already in a part of an earlier, interrupted run. The rest, sorted by path, is the work.
2. Every process (``torchrun`` / ``accelerate launch`` ranks, gloo for the few collectives) takes its contiguous
   share and embeds it chunk by chunk; each chunk is saved at once as a part file (``STORE/parts/``, written to
   a temporary and renamed: whole or absent). Ctrl-C / SIGTERM finishes the chunk in progress, saves it, and
   stops (``Stopped``, exit 12); the same command again re-embeds nothing a part holds.
3. Rank 0 merges every part into the store: changed photos' old rows are removed, the new ones appended as one
   segment in path order (ids follow that order: an interrupted and resumed run ends with the ids of an
   uninterrupted one), photos gone from an indexed folder removed, and the parts deleted. A new store gets its
   base index built (compaction); later runs only append (``finderpartner index compact`` folds them in).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch.distributed as dist

from ..data.files import IMAGE_EXTENSIONS, scan_images
from ..errors import DataError, Stopped, UsageError
from ..outputs import fsync_file, storage_errors
from ..processes import any_true, from_main, world
from ..progress import Progress
from ..signals import StopRequest, received
from .faiss_store import FaissStore
from .meta import check_column_name, infer_kind
from .store import PhotoRow

log = logging.getLogger(__name__)

PARTS = "parts"
ROWS_PER_SEGMENT = 250_000  # one merge appends segments of at most this many rows


class Embedder(Protocol):
    """What indexing needs from a model (embedding.Searcher, onnx_runtime.OnnxSearcher)."""

    @property
    def fingerprint(self) -> str: ...

    def embed_paths(
        self, paths: Sequence[Path], progress: bool = False
    ) -> tuple[np.ndarray, list[tuple[int, str]]]: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Photo:
    path: str  # absolute
    size: int
    mtime_ns: int
    attributes: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class IndexStats:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    resumed: int = 0  # taken from the parts of an interrupted run, not embedded again
    embedded: int = 0  # embedded by this run (all processes)
    failed: list[tuple[str, str]] = field(default_factory=list)
    live: int = 0
    compacted: bool = False

    def __str__(self) -> str:
        text = f"{self.added} new, {self.changed} changed, {self.removed} removed, {self.unchanged} unchanged"
        if self.resumed:
            text += f", {self.resumed} from an interrupted run's parts"
        return text + (f", {len(self.failed)} unreadable" if self.failed else "")


# ---------------------------------------------------------------------------------------------- the photo list


def list_folder(images: Path) -> tuple[Path, list[Photo]]:
    root = Path(os.path.abspath(images))
    found = scan_images(root)
    if not found:
        raise DataError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return root, [Photo(str(root / name), s.size, s.mtime_ns) for name, s in found.items()]


def _read_table(path: Path, what: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of a CSV (header first) or JSONL file as dicts, with the column names in order."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows, names = [], {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{what} {path}, line {n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f'{what} {path}, line {n}: expected an object like {{"path": ...}}')
            rows.append(row)
            names.update(dict.fromkeys(row))
        return list(names), rows
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        raise DataError(f"{what} {path} is empty: expected a header line, then one row per photo")
    return [f for f in reader.fieldnames if f], list(reader)


def _key_column(columns: list[str], path: Path, what: str) -> str:
    for name in ("path", "filename", "file", "image", "image_path"):
        if name in columns:
            return name
    if not columns:
        raise DataError(f"{what} {path} has no columns")
    return columns[0]


def list_file(listing: Path) -> tuple[Path, list[Photo], dict[str, str]]:
    """Photos named in a CSV/JSONL (column path/filename/..., else the first; relative to the list's folder);
    the other columns are attributes. Returns (root, photos, attribute kinds)."""
    columns, rows = _read_table(listing, "--list")
    key = _key_column(columns, listing, "--list")
    base = Path(os.path.abspath(listing)).parent
    attr_names = [c for c in columns if c != key]
    for name in attr_names:
        check_column_name(name, f"--list {listing}")
    kinds = {c: _kind([r.get(c) for r in rows]) for c in attr_names}
    photos, missing, seen = [], [], set()
    for n, row in enumerate(rows, 2):
        raw = row.get(key)
        if not isinstance(raw, str) or not raw.strip():
            raise DataError(f"--list {listing}, row {n}: no {key!r} value")
        p = Path(raw.strip()).expanduser()
        full = Path(os.path.abspath(p if p.is_absolute() else base / p))
        if str(full) in seen:
            raise DataError(f"--list {listing}, row {n}: {raw} is listed twice")
        seen.add(str(full))
        try:
            st = full.stat()
        except OSError:
            missing.append(raw)
            continue
        photos.append(Photo(str(full), st.st_size, st.st_mtime_ns, {c: row.get(c) for c in attr_names}))
    if missing:
        log.warning(
            "--list %s: %d listed file(s) not found, left out: %s", listing, len(missing), ", ".join(missing[:5])
        )
    if not photos:
        raise DataError(f"--list {listing} names no existing image")
    return base, photos, kinds


def _kind(values: list[Any]) -> str:
    return infer_kind("" if v is None else str(v) for v in values)


def attach_attributes(photos: list[Photo], root: Path, attributes: Path) -> tuple[list[Photo], dict[str, str]]:
    """Join ``--attributes`` (a CSV/JSONL: file name + columns) to the photos, by path relative to ``root``, or by
    file name when it is unique. Unknown names are reported, photos without a row get nulls."""
    columns, rows = _read_table(attributes, "--attributes")
    key = _key_column(columns, attributes, "--attributes")
    names = [c for c in columns if c != key]
    if not names:
        raise DataError(f"--attributes {attributes} has only the column {key!r}: add attribute columns")
    for name in names:
        check_column_name(name, f"--attributes {attributes}")
    kinds = {c: _kind([r.get(c) for r in rows]) for c in names}
    by_rel = {os.path.relpath(p.path, root).replace(os.sep, "/"): i for i, p in enumerate(photos)}
    by_name: dict[str, int | None] = {}
    for i, p in enumerate(photos):
        base = Path(p.path).name
        by_name[base] = None if base in by_name else i  # None: ambiguous
    values: dict[int, dict[str, Any]] = {}
    unknown = []
    for n, row in enumerate(rows, 2):
        raw = str(row.get(key) or "").strip().replace("\\", "/")
        i = by_rel.get(raw)
        if i is None:
            i = by_name.get(Path(raw).name) if "/" not in raw else None
        if i is None:
            if Path(raw).name in by_name and by_name[Path(raw).name] is None:
                raise DataError(
                    f"--attributes {attributes}, row {n}: {raw!r} matches several photos; give its path relative "
                    f"to {root}"
                )
            unknown.append(raw)
            continue
        values[i] = {c: row.get(c) for c in names}
    if unknown:
        log.warning(
            "--attributes %s: %d row(s) name no photo being indexed: %s",
            attributes,
            len(unknown),
            ", ".join(unknown[:5]),
        )
    out = [Photo(p.path, p.size, p.mtime_ns, {**p.attributes, **values.get(i, {})}) for i, p in enumerate(photos)]
    return out, kinds


# ---------------------------------------------------------------------------------------------- parts


def parts_dir(store: Path) -> Path:
    return store / PARTS


def _write_part(folder: Path, rank: int, photos: Sequence[Photo], vectors: np.ndarray, failures: list, fp: str) -> None:
    """One chunk's work, whole or not at all (a temporary renamed into place)."""
    bad = {row for row, _ in failures}
    good = [i for i in range(len(photos)) if i not in bad]
    name = f"part-r{rank}-{secrets.token_hex(6)}.npz"
    tmp = folder / f".tmp-{name}"
    with storage_errors(folder, f"a part of the index in {folder}"):
        with open(tmp, "wb") as f:
            np.savez(
                f,
                fingerprint=np.array(fp),
                paths=np.array([photos[i].path for i in good], dtype=str),
                stamps=np.array([[photos[i].size, photos[i].mtime_ns] for i in good], dtype=np.int64).reshape(-1, 2),
                vectors=np.asarray(vectors, dtype=np.float32)[good],
                failed=np.array([photos[r].path for r, _ in failures], dtype=str),
                reasons=np.array([reason for _, reason in failures], dtype=str),
            )
        fsync_file(tmp)
        os.replace(tmp, folder / name)


@dataclass
class _Done:
    vector: np.ndarray
    stamp: tuple[int, int]


def read_parts(folder: Path, fingerprint: str) -> tuple[dict[str, _Done], list[Path]]:
    """What the part files in ``folder`` hold for this model (path -> vector and stamp), and the files. A part of
    another model or an unreadable one is ignored (and removed with the others after the merge)."""
    done: dict[str, _Done] = {}
    files = sorted(folder.glob("part-*.npz")) if folder.is_dir() else []
    for file in files:
        try:
            with np.load(file) as z:
                if str(z["fingerprint"]) != fingerprint:
                    continue
                for path, stamp, vec in zip(z["paths"], z["stamps"], z["vectors"]):
                    done[str(path)] = _Done(vec, (int(stamp[0]), int(stamp[1])))
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable part %s (%s)", file, e)
    return done, files


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class _Plan:
    todo: list[Photo]  # to embed now, sorted by path
    total_new: int  # photos to add (todo + resumed)


def ensure_process_group() -> None:
    """Under torchrun / accelerate launch: join the process group (gloo: the collectives carry a few objects)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))


def index_photos(
    embedder: Embedder,
    out: Path,
    *,
    images: Path | None = None,
    listing: Path | None = None,
    attributes: Path | None = None,
    overwrite: bool = False,
    model: str | None = None,
    chunk_size: int = 512,
    progress: bool = True,
    after_chunk: Callable[[int], None] | None = None,
) -> IndexStats:
    """The whole command (module docstring). Every process of a launched job calls it alike."""
    if (images is None) == (listing is None):
        raise UsageError("give the photos to index: --images DIR or --list FILE (CSV or JSONL)")
    ensure_process_group()
    rank, size = world()
    out = Path(os.path.abspath(out))
    store: FaissStore | None = None
    stats = IndexStats()
    context: dict[str, Any] = {}

    def prepare() -> tuple[list[Photo], int]:
        nonlocal store
        root, photos, kinds = gather_photos(images, listing, attributes)
        protect = {"images": images, "list": listing, "attributes": attributes, "model": model}
        context.update(root=root, photos=photos, kinds=kinds, protect=protect, folder_mode=images is not None)
        dim = int(embedder.embed_texts(["a photo"]).shape[1])  # the store's dim, before any image is embedded
        store = FaissStore.create(
            out, dim=dim, fingerprint=embedder.fingerprint, model=model, protect=protect, overwrite=overwrite
        )
        done, _ = read_parts(parts_dir(out), embedder.fingerprint)
        return to_embed(photos, store.meta.live_stamps(), done, stats), stats.resumed

    try:
        todo, resumed = from_main(prepare)
        stats_total = [len(todo) + resumed]
        share = todo[rank * len(todo) // size : (rank + 1) * len(todo) // size]
        folder = parts_dir(out)
        if share:
            with storage_errors(folder, f"the parts folder {folder}"):
                folder.mkdir(parents=True, exist_ok=True)
                for tmp in folder.glob(f".tmp-part-r{rank}-*"):
                    tmp.unlink(missing_ok=True)  # a part a killed run was writing: never complete
        stopped = _embed_share(
            embedder, share, folder, rank, chunk_size, progress and rank == 0, len(todo), after_chunk
        )
        if any_true(stopped):
            done = from_main(lambda: len(read_parts(folder, embedder.fingerprint)[0]))
            total = stats_total[0] if stats_total else done
            raise Stopped(
                f"{received() or 'interrupted'}: stopped after embedding {done} of {total} new or changed images; "
                f"those {done} are saved in the index {out} (as parts), so running the same command again embeds "
                f"only the other {total - done}"
            )
        result = from_main(lambda: _merge(embedder.fingerprint, out, store, context, stats))
    finally:
        if store is not None:
            store.close()
    return result


def gather_photos(
    images: Path | None, listing: Path | None, attributes: Path | None
) -> tuple[Path, list[Photo], dict[str, str]]:
    """The photos to index (a folder, or a CSV/JSONL list) with their attributes joined: (root, photos, column
    kinds). Every store's ``index`` starts here."""
    if images is not None:
        root, photos = list_folder(images)
        kinds: dict[str, str] = {}
    else:
        assert listing is not None
        root, photos, kinds = list_file(listing)
    if attributes is not None:
        photos, more = attach_attributes(photos, root, attributes)
        kinds.update(more)
    return root, photos, kinds


def to_embed(
    photos: list[Photo],
    live: dict[str, tuple[int, int, int]],
    done: dict[str, _Done] | None,
    stats: IndexStats,
) -> list[Photo]:
    """The photos to embed, in path order: new or changed since the store's rows (``live``: path -> id, size,
    mtime_ns), and not in a saved part (``done``: a stopped run's work); ``stats`` counts each kind."""
    todo = []
    for p in sorted(photos, key=lambda p: p.path):
        now = (p.size, p.mtime_ns)
        had = live.get(p.path)
        if had is not None and (had[1], had[2]) == now:
            stats.unchanged += 1
            continue
        if had is not None:
            stats.changed += 1
        else:
            stats.added += 1
        part = done.get(p.path) if done else None
        if part is not None and part.stamp == now:
            stats.resumed += 1
            continue
        todo.append(p)
    return todo


def _embed_share(
    embedder: Embedder,
    share: list[Photo],
    folder: Path,
    rank: int,
    chunk_size: int,
    progress: bool,
    total: int,
    after_chunk: Callable[[int], None] | None,
) -> bool:
    """Embed this process's share, one part per chunk; True when a stop signal came (the chunk in progress was
    finished and saved first)."""
    bar = Progress(total=total, desc="embedding images", unit="image", disable=not progress or not total)
    with StopRequest("saving the images embedded so far") as stop, bar:
        for start in range(0, len(share), chunk_size):
            if stop.requested:
                return True
            chunk = share[start : start + chunk_size]
            vectors, failures = embedder.embed_paths([Path(p.path) for p in chunk])
            _write_part(folder, rank, chunk, vectors, failures, embedder.fingerprint)
            bar.update(len(chunk) * (world()[1] if progress else 1))  # rank 0 speaks for all: shares are equal
            if after_chunk is not None:
                after_chunk(start + len(chunk))
        return stop.requested


def _merge(
    fingerprint: str, out: Path, store: FaissStore | None, context: dict[str, Any], stats: IndexStats
) -> IndexStats:
    """Rank 0: every part into the store (module docstring, step 3)."""
    assert store is not None
    folder = parts_dir(out)
    done, files = read_parts(folder, fingerprint)
    failed = _failures(files, fingerprint)
    photos: list[Photo] = context["photos"]
    live = store.meta.live_stamps()
    rows, vectors, replaced = [], [], []
    for p in sorted(photos, key=lambda p: p.path):
        had = live.get(p.path)
        if had is not None and (had[1], had[2]) == (p.size, p.mtime_ns):
            continue
        part = done.get(p.path)
        if part is None or part.stamp != (p.size, p.mtime_ns):
            if p.path not in failed:
                raise DataError(f"{p.path} was not embedded by any process (was a part file removed?); run again")
            continue
        if had is not None:
            replaced.append(p.path)
        rows.append(PhotoRow(p.path, p.size, p.mtime_ns, p.attributes))
        vectors.append(part.vector)
    stats.failed = sorted(failed.items())
    stats.embedded = len(rows) + len(failed) - stats.resumed
    if context["kinds"]:
        store.ensure_columns(context["kinds"], "attributes")
    if replaced:
        store.remove(paths=replaced)
    if context["folder_mode"]:  # photos gone from the indexed folder leave the store
        root = str(context["root"]) + os.sep
        present = {p.path for p in photos}
        gone = [path for path in live if path.startswith(root) and path not in present]
        if gone:
            stats.removed = store.remove(paths=gone)
    for s in range(0, len(rows), ROWS_PER_SEGMENT):
        store.add(rows[s : s + ROWS_PER_SEGMENT], np.stack(vectors[s : s + ROWS_PER_SEGMENT]))
    if store.manifest.get("base") is None and store.count():
        store.compact()  # a new store: its base index (later runs only append)
        stats.compacted = True
    for file in files:
        file.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
    roots = store.manifest.setdefault("roots", [])
    if str(context["root"]) not in roots:
        roots.append(str(context["root"]))  # the folders it holds photos of (the demo shows paths under them)
        store.save_manifest()
    stats.live = store.count()
    return stats


def _failures(files: list[Path], fingerprint: str) -> dict[str, str]:
    failed: dict[str, str] = {}
    for file in files:
        try:
            with np.load(file) as z:
                if str(z["fingerprint"]) == fingerprint:
                    failed.update(zip(map(str, z["failed"]), map(str, z["reasons"])))
        except (OSError, ValueError, KeyError):
            continue
    return failed
