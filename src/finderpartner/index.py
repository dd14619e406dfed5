"""Gallery index: a folder of images embedded into a FAISS index, kept up to date incrementally, searched.

An index folder holds ``index.faiss`` (inner product over L2-normalised vectors = cosine similarity) and
``index.json`` (the gallery root, one entry per vector with the file's size and mtime, files that failed
to load, and the fingerprint of the model that made the vectors). Updating re-embeds only new and changed
files (a file counts as changed when its size or modification time changed) and drops removed ones. An
index made by another model is refused: its vectors mean nothing here.

This module is the store and its update logic only. What embeds is an ``Embedder``: ``embedding.Searcher``
(the PyTorch model) or ``onnx_runtime.OnnxSearcher`` (an export folder through onnxruntime alone). Both carry
the source model's fingerprint, so either can search an index the other built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .data.files import IMAGE_EXTENSIONS, FileStamp, scan_images
from .errors import DataError, FinderPartnerError, IndexMismatchError, Stopped
from .outputs import claim_output, write_output
from .paths import default_cache_dir
from .progress import Progress
from .signals import received

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# paths -> (normalised float32 embeddings with NaN rows for failures, [(row, reason)] failures)
EmbedFn = Callable[[Sequence[Path]], tuple[np.ndarray, list[tuple[int, str]]]]


@dataclass
class SearchHit:
    rank: int
    path: Path
    score: float


@dataclass
class UpdateStats:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_embedded: int = 0  # new or changed files left for the next run (a stop signal came first)

    @property
    def embedded(self) -> int:
        return self.added + self.changed

    def __str__(self) -> str:
        return f"{self.added} new, {self.changed} changed, {self.removed} removed, {self.unchanged} unchanged" + (
            f", {len(self.failed)} unreadable" if self.failed else ""
        )


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise FinderPartnerError(
            "the gallery index needs FAISS: pip install 'finderpartner[index]' (faiss-cpu)"
        ) from None
    return faiss


@dataclass
class GalleryIndex:
    root: Path
    fingerprint: str
    files: list[str]  # paths relative to root, one per vector
    stamps: list[FileStamp]
    vectors: np.ndarray  # (N, D) float32, L2-normalised
    failed: dict[str, tuple[FileStamp, str]] = field(default_factory=dict)
    _faiss_index: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def faiss_index(self) -> Any:
        if self._faiss_index is None:
            faiss = _faiss()
            index = faiss.IndexFlatIP(self.dim)  # exact search: galleries of a person's photos stay small
            index.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            self._faiss_index = index
        return self._faiss_index

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 5) -> list[list[SearchHit]]:
        """Top-k files for each query vector (rows of ``queries``, L2-normalised), best first."""
        if k < 1:
            raise FinderPartnerError(f"top-k must be at least 1 (got {k})")
        q = np.asarray(queries, dtype=np.float32)
        q = np.ascontiguousarray(q[None] if q.ndim == 1 else q)
        if len(self) == 0:
            return [[] for _ in range(len(q))]
        if q.ndim != 2 or q.shape[1] != self.dim:
            # a reshape would silently turn a wrong-sized query into several wrong queries
            raise IndexMismatchError(
                f"query vectors have shape {tuple(q.shape)} but the index holds {self.dim}-d "
                "vectors: the query was embedded by another model"
            )
        scores, ids = self.faiss_index.search(q, min(k, len(self)))
        return [
            [
                SearchHit(r + 1, self.root / self.files[i], float(s))
                for r, (s, i) in enumerate(zip(srow, irow))
                if i >= 0
            ]
            for srow, irow in zip(scores, ids)
        ]

    def check_model(self, fingerprint: str, where: Path | str) -> None:
        if fingerprint != self.fingerprint:
            raise IndexMismatchError(
                f"index {where} was built by another model (fingerprint {self.fingerprint[:12]}, this model "
                f"{fingerprint[:12]}); rebuild it: finderpartner index --model <model> --images {self.root} --out {where} "
                "--overwrite"
            )

    def save(self, path: Path) -> None:
        """Write ``index.faiss`` and ``index.json`` atomically (a crash leaves the previous index intact; files a
        user put beside them stay: ``outputs.write_output``)."""

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            _faiss().write_index(self.faiss_index, str(tmp / "index.faiss"))
            meta = {
                "format": FORMAT_VERSION,
                "root": str(self.root),
                "fingerprint": self.fingerprint,
                "dim": self.dim,
                "files": [[f, s.size, s.mtime_ns] for f, s in zip(self.files, self.stamps)],
                "failed": [[f, s.size, s.mtime_ns, reason] for f, (s, reason) in self.failed.items()],
            }
            (tmp / "index.json").write_text(json.dumps(meta), encoding="utf-8")

        write_output(write, path, "index", {"images": self.root}, what=f"gallery index {path}")

    @classmethod
    def load(cls, path: Path) -> GalleryIndex:
        if path.exists() and not path.is_dir():
            raise DataError(f"{path} is a file, not a gallery index (a folder made by `finderpartner index`)")
        try:
            meta = json.loads((path / "index.json").read_text(encoding="utf-8"))
            faiss_index = _faiss().read_index(str(path / "index.faiss"))
            files, failed = meta["files"], meta["failed"]
            consistent = (
                meta.get("format") == FORMAT_VERSION
                and faiss_index.ntotal == len(files)
                and faiss_index.d == meta["dim"]
            )
        except FileNotFoundError:
            raise DataError(
                f"{path} is not a gallery index (index.json/index.faiss missing); build one with `finderpartner index`"
            ) from None
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            raise DataError(
                f"gallery index {path} is damaged ({type(e).__name__}: {e}); rebuild it: finderpartner index "
                f"--model <model> --images <folder> --out {path} --overwrite"
            ) from None
        if not consistent:
            raise DataError(
                f"gallery index {path} is from another version or inconsistent; rebuild it: finderpartner "
                f"index --model <model> --images <folder> --out {path} --overwrite"
            )
        vectors = (
            faiss_index.reconstruct_n(0, faiss_index.ntotal)
            if faiss_index.ntotal
            else np.zeros((0, meta["dim"]), np.float32)
        )
        return cls(
            root=Path(meta["root"]),
            fingerprint=meta["fingerprint"],
            files=[f for f, _, _ in files],
            stamps=[FileStamp(s, m) for _, s, m in files],
            vectors=vectors,
            failed={f: (FileStamp(s, m), r) for f, s, m, r in failed},
            _faiss_index=faiss_index,
        )


def _plan(index: GalleryIndex | None, current: dict[str, FileStamp]) -> tuple[list[int], list[str], UpdateStats]:
    """Rows of ``index`` to keep, files to embed, and the counts, for the files found now."""
    stats = UpdateStats()
    keep_rows: list[int] = []
    to_embed: list[str] = []
    known = {f: i for i, f in enumerate(index.files)} if index is not None else {}
    failed_before = index.failed if index is not None else {}
    for name, stamp in current.items():
        row = known.get(name)
        if row is not None and index is not None and index.stamps[row] == stamp:
            keep_rows.append(row)
            stats.unchanged += 1
        elif name in failed_before and failed_before[name][0] == stamp:
            stats.unchanged += 1  # still the same unreadable file: don't retry it every time
        else:
            to_embed.append(name)
            if row is not None or name in failed_before:
                stats.changed += 1
            else:
                stats.added += 1
    stats.removed = sum(1 for f in known if f not in current)
    return sorted(keep_rows), to_embed, stats  # kept rows stay in their order: a no-op update changes nothing


EMBED_CHUNK = 512  # images embedded between two points where a stop keeps the work done (update_index)
EMBED_BATCHES_PER_CHUNK = 8  # index / search: a chunk is 8 of the embedder's batches (--batch-size)


def update_index(
    index: GalleryIndex | None,
    root: Path,
    fingerprint: str,
    embed: EmbedFn,
    *,
    progress: bool = False,
    chunk_size: int = EMBED_CHUNK,
) -> tuple[GalleryIndex, UpdateStats]:
    """Bring ``index`` up to date with the files under ``root`` (a new index when None); embeds only what changed.

    Files are embedded ``chunk_size`` at a time: a Ctrl-C or SIGTERM (a ``KeyboardInterrupt``, signals.py) after
    the first chunk returns the index of what was embedded until then, with ``stats.not_embedded`` the files left
    (they count as new on the next run); during the first chunk it propagates.
    """
    root = Path(os.path.abspath(root))
    current = scan_images(root)
    if index is None and not current:
        raise DataError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    keep_rows, to_embed, stats = _plan(index, current)
    failed = {
        f: v for f, v in (index.failed if index is not None else {}).items() if f in current and f not in to_embed
    }
    new_vectors: np.ndarray | None = None
    embedded_ok: list[str] = []
    done: list[tuple[list[str], Any, Any]] = []  # (files, vectors, failures) of each chunk embedded
    bar = Progress(total=len(to_embed), desc="embedding images", unit="image", disable=not progress or not to_embed)
    try:
        with bar:
            for start in range(0, len(to_embed), chunk_size):
                chunk = to_embed[start : start + chunk_size]
                vectors, failures = embed([root / f for f in chunk])
                done.append((chunk, vectors, failures))  # one step: a chunk counts whole or not at all
                bar.update(len(chunk))
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (signals.py): keep the chunks embedded so far
        if not done:
            raise
        stats.not_embedded = len(to_embed) - sum(len(chunk) for chunk, _, _ in done)
    parts_done = []
    for chunk, vectors, failures in done:
        bad_rows = {row for row, _ in failures}
        for row, reason in failures:
            failed[chunk[row]] = (current[chunk[row]], reason)
            stats.failed.append((chunk[row], reason))
        good = [i for i in range(len(chunk)) if i not in bad_rows]
        parts_done.append(np.asarray(vectors, np.float32)[good])
        embedded_ok += [chunk[i] for i in good]
    if parts_done:
        new_vectors = np.concatenate(parts_done)
    if index is not None and new_vectors is not None and new_vectors.shape[1] != index.dim:
        raise IndexMismatchError(
            f"embedding size changed ({index.dim} -> {new_vectors.shape[1]}): the index was built by another model"
        )
    parts = ([index.vectors[keep_rows]] if index is not None else []) + (
        [new_vectors] if new_vectors is not None else []
    )
    files = ([index.files[r] for r in keep_rows] if index is not None else []) + embedded_ok
    updated = GalleryIndex(
        root=root,
        fingerprint=fingerprint,
        files=files,
        stamps=[current[f] for f in files],
        vectors=np.ascontiguousarray(np.concatenate(parts), dtype=np.float32),
        failed=failed,
    )
    return updated, stats


def gallery_cache_path(images: Path) -> Path:
    """Where ``search --images DIR`` keeps the index of DIR (one per folder; rebuilt if the model changes)."""
    key = hashlib.sha256(os.path.abspath(images).encode()).hexdigest()[:16]  # the index's own notion of its root
    return default_cache_dir() / "galleries" / key


class Embedder(Protocol):
    """What indexing and search need from a model (``embedding.Searcher``, ``onnx_runtime.OnnxSearcher``).

    Declared here, by its user, so that the index imports no inference back end.
    """

    @property
    def fingerprint(self) -> str: ...

    def embed_paths(
        self, paths: Sequence[Path], progress: bool = False
    ) -> tuple[np.ndarray, list[tuple[int, str]]]: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def index_folder(
    embedder: Embedder,
    images: Path,
    out: Path,
    *,
    overwrite: bool = False,
    model: str | None = None,
    progress: bool = False,
) -> tuple[GalleryIndex, UpdateStats]:
    """Create or update the index at ``out`` for the folder ``images`` and save it.

    ``out`` follows the output rule (``outputs.claim_output``): never the gallery itself, inside it, or the model
    folder; an index of the same folder is updated; one of another folder, another model, or a damaged one is
    replaced only with ``overwrite``; a folder holding anything else is refused.
    """
    state = claim_output(
        out,
        "index",
        {"images": Path(os.path.abspath(images))},
        overwrite=overwrite,
        legacy=_legacy_index,
        protect={"model": model} if model else None,
    )
    existing = None
    if state == "same":
        try:
            existing = GalleryIndex.load(out)
            existing.check_model(embedder.fingerprint, out)
        except (IndexMismatchError, DataError):
            if not overwrite:
                raise
            log.warning("replacing gallery index %s (--overwrite)", out)
            existing = None
    return _update_and_save(embedder, existing, images, out, progress)


def _legacy_index(folder: Path) -> dict[str, Any] | None:
    """The inputs of an index written before output markers existed (its index.json names the gallery)."""
    try:
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        return {"images": str(meta["root"])} if (folder / "index.faiss").is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_gallery(embedder: Embedder, images: Path, *, progress: bool = False) -> tuple[GalleryIndex, UpdateStats]:
    """The index of ``images`` kept in the user cache: made on first use, updated when files change."""
    path = gallery_cache_path(images)
    existing = None
    if (path / "index.json").is_file():
        try:
            existing = GalleryIndex.load(path)
            existing.check_model(embedder.fingerprint, path)
        except (IndexMismatchError, DataError):
            log.info("gallery cache %s was made by another model (or is damaged): rebuilding", path)
            existing = None
            shutil.rmtree(path)
    return _update_and_save(embedder, existing, images, path, progress)


def _update_and_save(
    embedder: Embedder, existing: GalleryIndex | None, images: Path, out: Path, progress: bool
) -> tuple[GalleryIndex, UpdateStats]:
    index, stats = update_index(
        existing,
        images,
        embedder.fingerprint,
        lambda p: embedder.embed_paths(p, False),
        progress=progress,
        chunk_size=EMBED_BATCHES_PER_CHUNK * getattr(embedder, "batch_size", 64),
    )
    if existing is None or stats.embedded or stats.removed or stats.failed:
        index.save(out)
    if stats.not_embedded:
        done = stats.embedded - stats.not_embedded
        raise Stopped(
            f"{received() or 'interrupted'}: stopped after embedding {done} of {stats.embedded} new or changed "
            f"images; those {done} are saved in the index {out}, so running the same command again embeds only "
            f"the other {stats.not_embedded}"
        )
    return index, stats
