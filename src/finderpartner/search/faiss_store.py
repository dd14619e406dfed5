"""The default store: one folder, embedded, FAISS + SQLite (docs/search.md explains it whole).

    STORE/
      .finderpartner.json   the output marker (kind "index"): the folder is ours
      .lock                 held by the one writer (a second one is refused: outputs.FolderLock)
      manifest.json         format, model fingerprint, dim, generation, segments, base index and its recall
      meta.sqlite           one row per photo (meta.py); the tombstones
      segments/seg-NNNNNN.vec.npy + .ids.npy    raw vectors (float32) and their ids, appended, never rewritten
      ann/base-GGGGGG.faiss the base index over the segments of the last compaction (ann.py)

Search = the base index (an id selector keeps removed rows and rows outside the filter out) + an exact scan of
the segments added since, merged. Adding photos writes one new segment: nothing else is rewritten. Compaction
rebuilds the base from the live rows (one new segment), swaps the manifest atomically, then deletes the files
it replaced and the removed rows. Every multi-file step lists the files it is about to write (``pending``) or
to delete (``obsolete``) in the manifest first, so that a process killed anywhere leaves a folder the next
writer finishes or rolls back, and nothing it did not write is ever touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, IndexMismatchError, OutputError, UsageError
from ..outputs import (
    FolderLock,
    claim_output,
    fsync_dir,
    fsync_file,
    read_marker,
    storage_errors,
    write_marker,
    write_text_atomic,
)
from . import ann
from .filters import INTEGER, REAL, TEXT, Filter
from .meta import Meta, check_column_name, coerce
from .store import CompactStats, Hit, PhotoRow, SearchKnobs

log = logging.getLogger(__name__)

FORMAT = "finderpartner-photo-store"
VERSION = 1
KIND = "index"  # the output marker's kind: `finderpartner index` makes it
MANIFEST = "manifest.json"
META = "meta.sqlite"
EXACT_SUBSET_BELOW = 20_000  # a filter matching fewer live rows is answered exactly over them
SUBSET_CACHE_BYTES = 256 * 2**20
SCAN_ROWS = 65_536  # rows of a segment scored at once in an exact scan
LOAD_ATTEMPTS = 5  # a reader re-reads the manifest when a writer's commit removed the files it was opening
# test hook: called with a step name at each point a crash is interesting (tests kill the process there)
_crash_point: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _crash_point is not None:
        _crash_point(name)


@dataclass
class _Segment:
    number: int
    ids: np.ndarray  # int64, (n,)
    vectors: np.ndarray  # memory map (n, d) of the manifest's vector_dtype
    order: np.ndarray  # argsort of ids (ids are usually sorted already; given ids need not be)
    sorted_ids: np.ndarray = field(init=False)  # ids[order], made once: every re-scored query looks ids up in it

    def __post_init__(self) -> None:
        self.sorted_ids = self.ids[self.order]


def segment_files(number: int) -> tuple[str, str]:
    return f"segments/seg-{number:06d}.vec.npy", f"segments/seg-{number:06d}.ids.npy"


def base_file(generation: int) -> str:
    return f"ann/base-{generation:06d}.faiss"


def is_store(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _legacy_message(path: Path) -> str | None:
    try:
        meta = json.loads((path / "index.json").read_text(encoding="utf-8"))
        root = meta.get("root", "<folder>")
    except (OSError, ValueError, AttributeError):
        return None
    return (
        f"{path} is a gallery index of an earlier version (index.json + index.faiss), which this version no "
        f"longer reads; rebuild it: finderpartner index --model <model> --images {root} --out <new folder> "
        f"(or --out {path} --overwrite)"
    )


class FaissStore:
    """A ``VectorStore`` in one folder (module docstring). Open with ``create`` or ``open``."""

    def __init__(
        self, path: Path, manifest: dict[str, Any], meta: Meta, lock: FolderLock | None, *, stamp: int | None = None
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.meta = meta
        self._lock = lock
        self._segments: list[_Segment] = []
        self._base: Any = None
        self._base_segments: set[int] = set()
        self._removed = np.zeros(0, np.int64)
        self._version = -1
        self._manifest_stamp: int | None = None
        self._filter_cache: dict[Filter, tuple[int, np.ndarray]] = {}
        # small subsets' vectors, gathered once per filter (and state of the store): 256 MB at most
        self._subset_cache: dict[Filter, tuple[int, np.ndarray, np.ndarray]] = {}
        self._load_files(stamp)
        self._load_removed()

    # ------------------------------------------------------------------------------------------ open / create

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        dim: int,
        fingerprint: str,
        model: str | None = None,
        protect: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        vector_dtype: str = "float32",
        options: Mapping[str, Any] | None = None,
    ) -> FaissStore:
        """Open the store at ``path`` for writing, making it if needed (the output rule: a folder holding what
        we did not write is refused; a store of another model is replaced only with ``overwrite``)."""
        path = Path(os.path.abspath(path))
        state = claim_output(path, KIND, {}, protect=protect, same=lambda a, b: True, legacy=_legacy_inputs)
        if state == "same" and not is_store(path):
            message = _legacy_message(path)
            if message is not None and not overwrite:
                raise DataError(message)
        if state == "same" and is_store(path) and overwrite:
            try:
                _read_manifest(path)
            except DataError:
                log.warning("replacing the damaged photo store %s (--overwrite)", path)
                _remove_damaged(path)
        if state == "same" and is_store(path):
            store = cls.open(path, writable=True)
            if store.fingerprint == fingerprint and store.dim == dim:
                return store
            if not overwrite:
                store.close()
                raise IndexMismatchError(
                    f"store {path} holds vectors of another model (fingerprint {store.fingerprint[:12]}, dim "
                    f"{store.dim}; this model {fingerprint[:12]}, dim {dim}): pass --overwrite to replace it, or "
                    "choose another --out"
                )
            store._remove_own_files()
            store.close()
        elif state == "same":  # an old-format index of ours, replaced with --overwrite
            _remove_legacy(path)
        lock = FolderLock(path, "photo store").acquire()
        try:
            with storage_errors(path, f"photo store {path}"):
                write_marker(path, KIND, {})
                (path / "segments").mkdir(exist_ok=True)
                (path / "ann").mkdir(exist_ok=True)
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "fingerprint": fingerprint,
                    "dim": int(dim),
                    "model": model,
                    "vector_dtype": vector_dtype,
                    "generation": 0,
                    "next_segment": 1,
                    "segments": [],
                    "base": None,
                    "options": {
                        "memory_fraction": ann.MEMORY_FRACTION,
                        "flat_below": ann.FLAT_BELOW,
                        "recall_target": ann.RECALL_TARGET,
                        "exact_subset_below": EXACT_SUBSET_BELOW,
                        **(options or {}),
                    },
                    "pending": [],
                    "obsolete": [],
                }
                meta = Meta(path / META)
                write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
        except BaseException:
            lock.release()
            raise
        return cls(path, manifest, meta, lock)

    @classmethod
    def open(cls, path: Path, *, writable: bool = False) -> FaissStore:
        """Open an existing store; ``writable`` takes the folder's lock (one writer at a time) and finishes or
        rolls back what a killed writer left halfway."""
        path = Path(os.path.abspath(path))
        if path.exists() and not path.is_dir():
            raise DataError(
                f"{path} is a file, not a gallery index (a photo store folder made by `finderpartner index`)"
            )
        if not path.is_dir():
            raise DataError(f"gallery index {path} not found; build one with `finderpartner index --out {path}`")
        if not is_store(path):
            raise DataError(
                _legacy_message(path)
                or f"{path} is not a gallery index (no {MANIFEST}); build one with `finderpartner index`"
            )
        lock = FolderLock(path, "photo store").acquire() if writable else None
        try:
            stamp = _stamp(path / MANIFEST)  # before the read: a commit after it is seen by the next refresh
            manifest = _read_manifest(path)
            meta = Meta(path / META)
            manifest = _recover(path, manifest, meta) if writable else _as_committed(path, manifest, meta)
            return cls(path, manifest, meta, lock, stamp=stamp)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        self.meta.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> FaissStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def writable(self) -> bool:
        return self._lock is not None

    def columns(self) -> dict[str, str]:
        return self.meta.columns()

    def count(self) -> int:
        return self.meta.count()

    def describe(self) -> dict[str, Any]:
        base = self.manifest.get("base") or {}
        return {
            "path": str(self.path),
            "live": self.count(),
            "removed": int(len(self._removed)),
            "segments": len(self._segments),
            "segments_after_base": sum(1 for s in self._segments if s.number not in self._base_segments),
            "generation": self.manifest["generation"],
            "base": base.get("info"),
            "columns": self.columns(),
        }

    # ------------------------------------------------------------------------------------------ loading

    def _load_files(self, stamp: int | None = None, manifest: dict[str, Any] | None = None) -> None:
        """Load the segments and the base that ``manifest`` (default: ``self.manifest``) names, then make it the
        store's; ``stamp``: the manifest file's stamp taken before it was read (what ``refresh`` compares with).

        A reader can lose this race to a writer: it reads the manifest, the writer commits a compaction and
        deletes the segments it merged, the reader opens one of them. Then the reader reads the new manifest and
        tries again (``LOAD_ATTEMPTS``); the store keeps its previous files until a load is complete.
        """
        manifest = self.manifest if manifest is None else manifest
        for attempt in range(LOAD_ATTEMPTS):
            try:
                segments, base, base_segments = self._open_files(manifest)
                break
            except FileNotFoundError:
                if self.writable or attempt == LOAD_ATTEMPTS - 1:
                    raise
                stamp = _stamp(self.path / MANIFEST)
                manifest = _as_committed(self.path, _read_manifest(self.path), self.meta)
        self.manifest = manifest
        self._segments, self._base, self._base_segments = segments, base, base_segments
        self._manifest_stamp = stamp if stamp is not None else _stamp(self.path / MANIFEST)

    def _open_files(self, manifest: dict[str, Any]) -> tuple[list[_Segment], Any, set[int]]:
        faiss = ann.faiss_module()
        segments = []
        for number in manifest["segments"]:
            vec, ids = segment_files(number)
            v = np.load(self.path / vec, mmap_mode="r")
            i = np.load(self.path / ids)
            segments.append(_Segment(number, i, v, np.argsort(i, kind="stable")))
        base = manifest.get("base")
        if not base:
            return segments, None, set()
        file = self.path / base["file"]
        try:
            index = faiss.read_index(str(file))
        except RuntimeError:
            if not file.exists():  # replaced by a newer base since the manifest was read (_load_files retries)
                raise FileNotFoundError(str(file)) from None
            raise
        nprobe = (base.get("info") or {}).get("nprobe")
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and nprobe:
            ivf.nprobe = int(nprobe)
        return segments, index, set(base["segments"])

    def _load_removed(self) -> None:
        self._version = self.meta.data_version()
        self._removed = self.meta.removed_ids()
        self._filter_cache.clear()
        self._subset_cache.clear()

    def refresh(self) -> None:
        """Pick up another process's commits (a reader beside the writer): tombstones at once, new segments and
        a new base when the manifest changed."""
        if self.writable:
            return
        stamp = _stamp(self.path / MANIFEST)
        if stamp != self._manifest_stamp:
            self._load_files(stamp, _as_committed(self.path, _read_manifest(self.path), self.meta))
            self._load_removed()
        elif self.meta.data_version() != self._version:
            self._load_removed()

    # ------------------------------------------------------------------------------------------ writing

    def _require_writable(self) -> None:
        if not self.writable:
            raise UsageError(f"photo store {self.path} was opened read-only")

    def save_manifest(self) -> None:
        """Write the manifest after a change to a free-form entry (``roots``)."""
        self._require_writable()
        self._save_manifest()

    def _save_manifest(self) -> None:
        write_text_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=1))
        self._manifest_stamp = _stamp(self.path / MANIFEST)

    def add(self, rows: Sequence[PhotoRow], vectors: np.ndarray) -> list[int]:
        """Append one segment with these photos (store.VectorStore.add)."""
        self._require_writable()
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(rows):
            raise ValueError(f"{len(rows)} rows but vectors of shape {vectors.shape}")
        if not rows:
            return []
        if vectors.shape[1] != self.dim:
            raise IndexMismatchError(
                f"vectors of dim {vectors.shape[1]} for a store of dim {self.dim}: they come from another model"
            )
        if not np.isfinite(vectors).all():
            raise DataError("some vectors are not finite (NaN or inf); the embedder failed on those photos")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        paths = [r.path for r in rows]
        if len(set(paths)) != len(paths):
            dup = next(p for p in paths if paths.count(p) > 1)
            raise DataError(f"{dup} is given twice in one add")
        taken = self.meta.live_ids_of_paths(paths)
        if taken:
            p = next(iter(taken))
            raise DataError(f"{p} is already in the store (id {taken[p]}); remove it first to replace it")
        self._ensure_columns(rows)
        kinds = self.meta.attribute_columns()
        first = self.meta.reserve_ids(len(rows))
        ids = [r.id if r.id is not None else first + i for i, r in enumerate(rows)]
        if any(r.id is not None for r in rows) and len(set(ids)) != len(ids):
            raise DataError("ids given twice in one add")
        values = [
            (
                int(i),
                r.path,
                int(r.size),
                int(r.mtime_ns),
                {c: coerce(r.attributes.get(c), kinds[c], f"{r.path}, column {c!r}") for c in kinds},
            )
            for i, r in zip(ids, rows)
        ]
        number = int(self.manifest["next_segment"])
        vec_name, ids_name = segment_files(number)
        self.manifest["pending"] = [vec_name, ids_name]
        self.manifest["next_segment"] = number + 1
        with storage_errors(self.path, f"photo store {self.path}"):
            self._save_manifest()
            dtype = np.dtype(self.manifest["vector_dtype"])
            _save_npy(self.path / vec_name, vectors.astype(dtype))
            _save_npy(self.path / ids_name, np.asarray(ids, dtype=np.int64))
            _step("segment-written")
            self.meta.insert(values, number)  # the commit point: the rows exist with their segment
            _step("rows-committed")
            self.manifest["segments"].append(number)
            self.manifest["pending"] = []
            self._save_manifest()
        id_arr = np.asarray(ids, dtype=np.int64)
        self._segments.append(
            _Segment(number, id_arr, np.load(self.path / vec_name, mmap_mode="r"), np.argsort(id_arr))
        )
        self._filter_cache.clear()
        self._subset_cache.clear()
        return ids

    def _ensure_columns(self, rows: Sequence[PhotoRow]) -> None:
        known = self.meta.columns()
        new: dict[str, str] = {}
        for r in rows:
            for name, value in r.attributes.items():
                if name in known or value is None or name in new:
                    continue
                check_column_name(name, f"attributes of {r.path}")
                new[name] = (
                    INTEGER
                    if isinstance(value, int) and not isinstance(value, bool)
                    else (REAL if isinstance(value, float) else TEXT)
                )
        if new:
            self.meta.ensure_columns(new)

    def ensure_columns(self, kinds: Mapping[str, str], where: str = "attributes") -> None:
        """Declare attribute columns (and their kinds) before adding rows that use them."""
        self._require_writable()
        self.meta.ensure_columns(kinds, where)

    def remove(
        self, *, ids: Sequence[int] | None = None, paths: Sequence[str] | None = None, where: Filter | None = None
    ) -> int:
        """Tombstone photos (store.VectorStore.remove): committed to meta.sqlite before returning."""
        self._require_writable()
        n = self.meta.tombstone(list(ids or ()), list(paths or ()), where)
        self._load_removed()
        return n

    def compact(self, *, queries: np.ndarray | None = None, factory: str | None = None) -> CompactStats:
        """Rebuild the base from the live rows: one new segment, a new base index, the manifest swapped, then the
        replaced files and the removed rows deleted. ``factory`` overrides the rule (ann.choose_factory)."""
        self._require_writable()
        self._load_removed()
        ids, vectors = self._live_vectors(None)
        order = np.argsort(ids, kind="stable")
        ids, vectors = ids[order], vectors[order]
        options = self.manifest["options"]
        factory = (
            factory
            or options.get("factory")
            or ann.choose_factory(len(ids), self.dim, options["memory_fraction"], options["flat_below"])
        )
        index, info = ann.build(vectors, ids, factory, queries=queries, recall_target=options["recall_target"])
        generation = int(self.manifest["generation"]) + 1
        number = int(self.manifest["next_segment"])
        vec_name, ids_name = segment_files(number)
        base_name = base_file(generation)
        old = [f for n in self.manifest["segments"] for f in segment_files(n)]
        if self.manifest.get("base"):
            old.append(self.manifest["base"]["file"])
        with storage_errors(self.path, f"photo store {self.path}"):
            self.manifest["pending"] = [vec_name, ids_name, base_name]
            self.manifest["next_segment"] = number + 1
            self._save_manifest()
            _save_npy(self.path / vec_name, vectors.astype(np.dtype(self.manifest["vector_dtype"])))
            _save_npy(self.path / ids_name, ids)
            _write_index(index, self.path / base_name)
            _step("compaction-written")
            self.manifest.update(
                generation=generation,
                segments=[number],
                base={"file": base_name, "segments": [number], "info": info.to_json()},
                pending=[],
                obsolete=old,
            )
            self._save_manifest()  # the commit point
            _step("compaction-swapped")
            removed = _finish_compaction(self.path, self.manifest, self.meta)
        self._load_files()
        self._load_removed()
        log.info("compacted %s: %d live, %d removed dropped, base %s", self.path, len(ids), removed, factory)
        return CompactStats(removed=removed, live=len(ids), generation=generation)

    def _remove_own_files(self) -> None:
        """--overwrite: remove exactly the files this store wrote (manifest, segments, base, meta), nothing else."""
        names = [f for n in self.manifest["segments"] for f in segment_files(n)]
        names += list(self.manifest.get("pending", [])) + list(self.manifest.get("obsolete", []))
        if self.manifest.get("base"):
            names.append(self.manifest["base"]["file"])
        self.meta.close()
        names += [META, META + "-wal", META + "-shm", MANIFEST]
        for name in names:
            (self.path / name).unlink(missing_ok=True)
        for d in ("segments", "ann"):
            try:
                (self.path / d).rmdir()
            except OSError:
                pass

    # ------------------------------------------------------------------------------------------ searching

    def _live_vectors(self, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of live rows (restricted to the sorted ``allowed`` ids when given)."""
        ids_out, vec_out = [], []
        for seg in self._segments:
            if allowed is None:
                keep = ~np.isin(seg.ids, self._removed) if len(self._removed) else slice(None)
                rows = np.arange(len(seg.ids))[keep]
            else:
                sorted_ids = seg.sorted_ids
                pos = np.clip(np.searchsorted(sorted_ids, allowed), 0, max(0, len(sorted_ids) - 1))
                hit = sorted_ids[pos] == allowed if len(sorted_ids) else np.zeros(len(allowed), bool)
                rows = np.sort(seg.order[pos[hit]])
            if len(rows):
                ids_out.append(seg.ids[rows])
                vec_out.append(np.asarray(seg.vectors[rows], dtype=np.float32))
        if not ids_out:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(ids_out), np.concatenate(vec_out)

    def _subset(self, where: Filter | None, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the live rows in ``allowed``; a small subset is kept for the next query with the
        same filter (a service answers many queries within one city)."""
        if where is None or allowed is None or len(allowed) * self.dim * 4 > SUBSET_CACHE_BYTES // 8:
            return self._live_vectors(allowed)
        cached = self._subset_cache.get(where)
        if cached is not None and cached[0] == self._version and len(cached[1]) == len(allowed):
            return cached[1], cached[2]
        ids, vectors = self._live_vectors(allowed)
        if sum(v.nbytes for _, _, v in self._subset_cache.values()) + vectors.nbytes > SUBSET_CACHE_BYTES:
            self._subset_cache.clear()
        self._subset_cache[where] = (self._version, ids, vectors)
        return ids, vectors

    def _allowed(self, where: Filter | None) -> np.ndarray | None:
        if where is None:
            return None
        cached = self._filter_cache.get(where)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        ids = self.meta.select_ids(where)
        if len(self._filter_cache) > 64:
            self._filter_cache.clear()
        self._filter_cache[where] = (self._version, ids)
        return ids

    def search(
        self, queries: np.ndarray, k: int, where: Filter | None = None, knobs: SearchKnobs | None = None
    ) -> list[list[Hit]]:
        """Top-k live photos matching ``where`` for each query row (store.VectorStore.search)."""
        if k < 1:
            raise UsageError(f"top-k must be at least 1 (got {k})")
        knobs = knobs or SearchKnobs()
        q = np.asarray(queries, dtype=np.float32)
        q = np.ascontiguousarray(q[None] if q.ndim == 1 else q)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatchError(
                f"query vectors have shape {tuple(q.shape)} but the store holds {self.dim}-d vectors: the query "
                "was embedded by another model"
            )
        self.refresh()
        scores, ids = self.search_ids(q, k, where, knobs)
        found = sorted({int(i) for i in ids.ravel() if i >= 0})
        rows = self.meta.rows(found) if found else {}
        return [
            [
                Hit(int(i), rows[int(i)][0], float(s), rows[int(i)][1])
                for s, i in zip(srow, irow)
                if i >= 0 and int(i) in rows
            ]
            for srow, irow in zip(scores, ids)
        ]

    def search_ids(
        self, q: np.ndarray, k: int, where: Filter | None, knobs: SearchKnobs
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) arrays (Q, k), -1 where fewer than k rows qualify: the search without the metadata."""
        allowed = self._allowed(where)
        options = self.manifest["options"]
        exact_below = knobs.exact_below if knobs.exact_below is not None else options["exact_subset_below"]
        if allowed is not None and len(allowed) == 0:
            return _empty(len(q), k)
        if knobs.exact or self._base is None or (allowed is not None and len(allowed) < exact_below):
            ids, vectors = self._subset(where, allowed)
            return _exact(q, vectors, ids, k)
        parts = [self._search_base(q, k, allowed, knobs)]
        for seg in self._segments:
            if seg.number in self._base_segments:
                continue
            mask = np.isin(seg.ids, allowed) if allowed is not None else None
            if len(self._removed):
                live = ~np.isin(seg.ids, self._removed)
                mask = live if mask is None else mask & live
            parts.append(_scan(q, seg, mask, k))
        return _merge(parts, k)

    def _search_base(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None, knobs: SearchKnobs
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = ann.faiss_module()
        keep: list[Any] = []  # the arrays a selector points into must outlive the search
        sel = None
        if allowed is not None:
            sel = _selector(allowed, keep)
        elif len(self._removed):
            inner = faiss.IDSelectorBatch(len(self._removed), faiss.swig_ptr(self._removed))
            keep.append(inner)
            sel = faiss.IDSelectorNot(inner)
        nprobe = knobs.nprobe
        ivf = faiss.try_extract_index_ivf(self._base)
        if ivf is not None and allowed is not None:
            # a filter keeping a fraction s of the rows: visit 1/s times the lists, so that about as many
            # qualifying vectors are scored as an unfiltered search scores (the recall stays where it was)
            live = max(1, self.meta_count_cached())
            share = max(len(allowed) / live, 1e-6)
            nprobe = min(ivf.nlist, math.ceil((nprobe or ivf.nprobe) / share))
        params = ann.search_params(self._base, sel, nprobe, knobs.ef_search)
        info = (self.manifest.get("base") or {}).get("info") or {}
        refine = knobs.refine if knobs.refine is not None else int(info.get("refine", 1))
        scores, ids = self._base.search(q, k * max(1, refine), params=params)
        del keep
        if refine > 1:
            return ann.rescore(q, ids, self._vectors_of, k)
        return scores, ids

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of these ids (each in some segment), in their order."""
        out = np.zeros((len(ids), self.dim), np.float32)
        for seg in self._segments:
            sorted_ids = seg.sorted_ids
            if not len(sorted_ids):
                continue
            pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
            hit = sorted_ids[pos] == ids
            if hit.any():
                rows = seg.order[pos[hit]]
                out[hit] = np.asarray(seg.vectors[np.sort(rows)], np.float32)[np.argsort(np.argsort(rows))]
        return out

    def meta_count_cached(self) -> int:
        return sum(len(s.ids) for s in self._segments) - len(self._removed)


# ---------------------------------------------------------------------------------------------- helpers


def _selector(allowed: np.ndarray, keep: list[Any]) -> Any:
    faiss = ann.faiss_module()
    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    top = int(allowed[-1]) + 1 if len(allowed) else 0
    if len(allowed) * 64 > top:  # dense: a bitmap (1 bit per id) is smaller and faster than a hash set
        bits = np.zeros(top, dtype=bool)
        bits[allowed] = True
        bitmap = np.packbits(bits, bitorder="little")
        keep.append(bitmap)
        return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    keep.append(allowed)
    return faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def _topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score descending) of ``scores`` (Q, n) whose columns are ``ids``."""
    nq, n = scores.shape
    out_s, out_i = _empty(nq, k)
    if n == 0:
        return out_s, out_i
    kk = min(k, n)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (nq, 1))
    s = np.take_along_axis(scores, part, 1)
    i = ids[part]
    order = np.argsort(-s, axis=1, kind="stable")
    out_s[:, :kk] = np.take_along_axis(s, order, 1)
    out_i[:, :kk] = np.take_along_axis(i, order, 1)
    return out_s, out_i


def _exact(q: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for s in range(0, len(ids), SCAN_ROWS):
        parts.append(_topk(q @ vectors[s : s + SCAN_ROWS].T, ids[s : s + SCAN_ROWS], k))
    return _merge(parts, k) if parts else _empty(len(q), k)


def _scan(q: np.ndarray, seg: _Segment, mask: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for s in range(0, len(seg.ids), SCAN_ROWS):
        ids = seg.ids[s : s + SCAN_ROWS]
        vec = np.asarray(seg.vectors[s : s + SCAN_ROWS], dtype=np.float32)
        if mask is not None:
            m = mask[s : s + SCAN_ROWS]
            ids, vec = ids[m], vec[m]
        parts.append(_topk(q @ vec.T, ids, k))
    return _merge(parts, k) if parts else _empty(len(q), k)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _stamp(path: Path) -> int | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns ^ st.st_ino


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("segments"), list)
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"photo store {path} is damaged ({MANIFEST}: {e}); {_rebuild(path)}") from None
    if not ok:
        raise DataError(f"photo store {path} is damaged ({MANIFEST} is not a store manifest); {_rebuild(path)}")
    if manifest.get("version", 0) > VERSION:
        raise DataError(f"photo store {path} was written by a newer finderpartner (format {manifest['version']})")
    return manifest


def _rebuild(path: Path) -> str:
    return f"rebuild it: finderpartner index --model <model> --images <folder> --out {path} --overwrite"


def _remove_damaged(path: Path) -> None:
    """--overwrite of a store whose manifest is unreadable: the files of the store's own layout, nothing else."""
    for name in (MANIFEST, META, META + "-wal", META + "-shm"):
        (path / name).unlink(missing_ok=True)
    for pattern in ("segments/seg-*.npy", "segments/.tmp-seg-*", "ann/base-*.faiss", "ann/.tmp-base-*"):
        for f in path.glob(pattern):
            f.unlink()


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``path`` whole or not at all (a temporary, then a rename)."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_index(index: Any, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    ann.faiss_module().write_index(index, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _finish_compaction(path: Path, manifest: dict[str, Any], meta: Meta) -> int:
    """After the swap: delete the replaced files, then the removed rows (they are in no file any more)."""
    for name in manifest.get("obsolete", []):
        (path / name).unlink(missing_ok=True)
    removed = meta.purge_removed()
    meta.set_segment(manifest["segments"][0] if manifest["segments"] else 0)
    manifest["obsolete"] = []
    write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
    return removed


def _committed_add(path: Path, manifest: dict[str, Any], meta: Meta) -> int | None:
    """The segment of an add killed after its commit (its rows are in meta.sqlite, its files complete), if any."""
    pending = list(manifest.get("pending", []))
    vec = [n for n in pending if n.endswith(".vec.npy")]
    if len(pending) != 2 or len(vec) != 1:
        return None  # nothing pending, or a compaction (three files): never committed before its swap
    number = int(Path(vec[0]).name.split("-")[1].split(".")[0])
    rows = meta.db.execute("SELECT count(*) FROM photos WHERE segment = ?", (number,)).fetchone()[0]
    return number if rows > 0 and all((path / n).is_file() for n in pending) else None


def _as_committed(path: Path, manifest: dict[str, Any], meta: Meta) -> dict[str, Any]:
    """The manifest as a reader sees it: an add committed in meta.sqlite counts even before its writer (or the
    next one) records it in the manifest."""
    number = _committed_add(path, manifest, meta)
    if number is None or number in manifest["segments"]:
        return manifest
    return {**manifest, "segments": [*manifest["segments"], number]}


def _recover(path: Path, manifest: dict[str, Any], meta: Meta) -> dict[str, Any]:
    """Finish or roll back what a killed writer left (module docstring): the files of an add whose rows were
    committed are adopted, other pending files deleted (with their temporaries); the obsolete files of a swapped
    compaction are deleted, with the removed rows."""
    pending = list(manifest.get("pending", []))
    obsolete = list(manifest.get("obsolete", []))
    if not pending and not obsolete:
        return manifest
    for name in pending:
        (path / name).with_name(f".tmp-{Path(name).name}").unlink(missing_ok=True)
    number = _committed_add(path, manifest, meta)
    if number is not None:
        manifest["segments"].append(number)
        log.warning("photo store %s: finished an add that was interrupted after its commit", path)
    else:
        for name in pending:
            (path / name).unlink(missing_ok=True)
        if pending:
            log.warning("photo store %s: rolled back a write that was interrupted (%s)", path, ", ".join(pending))
    manifest["pending"] = []
    write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
    if obsolete:
        _finish_compaction(path, manifest, meta)
    return manifest


def _legacy_inputs(folder: Path) -> dict[str, Any] | None:
    """An index folder of the earlier format without a marker counts as ours (claim_output's ``legacy``)."""
    return {} if (folder / "index.json").is_file() and (folder / "index.faiss").is_file() else None


def _remove_legacy(path: Path) -> None:
    """--overwrite of an earlier-format index of ours: its two files and marker, nothing else."""
    marker = read_marker(path)
    if marker is not None and marker.get("kind") != KIND:
        raise OutputError(f"{path} is not an index folder")
    for name in ("index.json", "index.faiss"):
        (path / name).unlink(missing_ok=True)
