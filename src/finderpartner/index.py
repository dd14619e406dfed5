"""Gallery index: a folder of images embedded into a FAISS index, kept up to date incrementally, searched.

An index folder holds ``index.faiss`` (inner product over L2-normalised vectors = cosine similarity) and
``index.json`` (the gallery root, one entry per vector with the file's size and mtime, files that failed
to load, and the fingerprint of the model that made the vectors). Updating re-embeds only new and changed
files and drops removed ones. An index made by another model is refused: its vectors mean nothing here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import replace_dir
from .errors import DataError, FinderPartnerError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMAT_VERSION = 1
# paths -> (normalised float32 embeddings with NaN rows for failures, [(row, reason)] failures)
EmbedFn = Callable[[Sequence[Path]], tuple[np.ndarray, list[tuple[int, str]]]]


class IndexMismatchError(FinderPartnerError):
    """The index was built by a different model (or another gallery)."""

    exit_code = 7


@dataclass(frozen=True)
class FileStamp:
    size: int
    mtime_ns: int


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

    @property
    def embedded(self) -> int:
        return self.added + self.changed

    def __str__(self) -> str:
        return (f"{self.added} new, {self.changed} changed, {self.removed} removed, {self.unchanged} unchanged"
                + (f", {len(self.failed)} unreadable" if self.failed else ""))  # fmt: skip


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise FinderPartnerError("the gallery index needs FAISS: pip install 'finderpartner[index]' (faiss-cpu)") from None
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
    def faiss_index(self) -> Any:
        if self._faiss_index is None:
            faiss = _faiss()
            index = faiss.IndexFlatIP(self.vectors.shape[1])
            index.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            self._faiss_index = index
        return self._faiss_index

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 5) -> list[list[SearchHit]]:
        """Top-k files for each query vector (rows of ``queries``, L2-normalised), best first."""
        if len(self) == 0:
            return [[] for _ in range(len(queries))]
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.vectors.shape[1]))
        scores, ids = self.faiss_index.search(q, min(k, len(self)))
        return [
            [SearchHit(r + 1, self.root / self.files[i], float(s)) for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]

    def check_model(self, fingerprint: str, where: Path | str) -> None:
        if fingerprint != self.fingerprint:
            raise IndexMismatchError(
                f"index {where} was built by another model (fingerprint {self.fingerprint[:12]}, this model "
                f"{fingerprint[:12]}); rebuild it: finderpartner index --model <model> --images {self.root} --out {where}"
            )

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            _faiss().write_index(self.faiss_index, str(tmp / "index.faiss"))
            meta = {
                "format": FORMAT_VERSION,
                "root": str(self.root),
                "fingerprint": self.fingerprint,
                "dim": int(self.vectors.shape[1]),
                "files": [[f, s.size, s.mtime_ns] for f, s in zip(self.files, self.stamps)],
                "failed": [[f, s.size, s.mtime_ns, reason] for f, (s, reason) in self.failed.items()],
            }
            (tmp / "index.json").write_text(json.dumps(meta), encoding="utf-8")

        replace_dir(write, path)

    @classmethod
    def load(cls, path: Path) -> GalleryIndex:
        try:
            meta = json.loads((path / "index.json").read_text(encoding="utf-8"))
            faiss_index = _faiss().read_index(str(path / "index.faiss"))
        except FileNotFoundError:
            raise DataError(f"{path} is not a gallery index (index.json/index.faiss missing); build one with `finderpartner index`") from None
        except (ValueError, RuntimeError) as e:
            raise DataError(f"gallery index {path} is damaged ({e}); rebuild it with `finderpartner index`") from None
        if meta.get("format") != FORMAT_VERSION or faiss_index.ntotal != len(meta["files"]):
            raise DataError(f"gallery index {path} is from another version or inconsistent; rebuild it")
        vectors = faiss_index.reconstruct_n(0, faiss_index.ntotal) if faiss_index.ntotal else np.zeros((0, meta["dim"]), np.float32)
        return cls(
            root=Path(meta["root"]),
            fingerprint=meta["fingerprint"],
            files=[f for f, _, _ in meta["files"]],
            stamps=[FileStamp(s, m) for _, s, m in meta["files"]],
            vectors=vectors,
            failed={f: (FileStamp(s, m), r) for f, s, m, r in meta["failed"]},
            _faiss_index=faiss_index,
        )


def scan_images(root: Path) -> dict[str, FileStamp]:
    """Image files under ``root`` (recursively, by extension; hidden folders skipped) with their stamps."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    found: dict[str, FileStamp] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                full = Path(dirpath) / name
                st = full.stat()
                found[full.relative_to(root).as_posix()] = FileStamp(st.st_size, st.st_mtime_ns)
    return found


def update_index(
    index: GalleryIndex | None, root: Path, fingerprint: str, embed: EmbedFn
) -> tuple[GalleryIndex, UpdateStats]:
    """Bring ``index`` up to date with the files under ``root`` (a new index when None); embeds only what changed."""
    root = Path(os.path.abspath(root))
    current = scan_images(root)
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
    dim = index.vectors.shape[1] if index is not None else None
    new_vectors = np.zeros((0, dim or 0), np.float32)
    failed = {f: v for f, v in failed_before.items() if f in current and f not in to_embed}
    embedded_ok: list[str] = []
    if to_embed:
        vectors, failures = embed([root / f for f in to_embed])
        bad_rows = {row for row, _ in failures}
        for row, reason in failures:
            failed[to_embed[row]] = (current[to_embed[row]], reason)
            stats.failed.append((to_embed[row], reason))
        good = [i for i in range(len(to_embed)) if i not in bad_rows]
        new_vectors = vectors[good].astype(np.float32)
        embedded_ok = [to_embed[i] for i in good]
    old_vectors = index.vectors[keep_rows] if index is not None else np.zeros((0, new_vectors.shape[1]), np.float32)
    if old_vectors.shape[1] != new_vectors.shape[1] and len(new_vectors) and len(old_vectors):
        raise IndexMismatchError("embedding size changed: the index was built by another model")
    files = [index.files[r] for r in keep_rows] if index is not None else []
    updated = GalleryIndex(
        root=root,
        fingerprint=fingerprint,
        files=files + embedded_ok,
        stamps=[current[f] for f in files + embedded_ok],
        vectors=np.concatenate([old_vectors, new_vectors]) if len(old_vectors) else new_vectors,
        failed=failed,
    )
    return updated, stats


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's config and weights: equal exactly when the embeddings would be."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("FINDERPARTNER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finderpartner"
    )
    return Path(base)


def gallery_cache_path(images: Path) -> Path:
    """Where ``search --images DIR`` keeps the index of DIR (one per folder; rebuilt if the model changes)."""
    key = hashlib.sha256(os.path.realpath(images).encode()).hexdigest()[:16]
    return default_cache_dir() / "galleries" / key


class Searcher:
    """A model ready to embed galleries and queries: what ``search``, ``index``, ``src/main.py`` and the demo use."""

    def __init__(self, encoder: Any, *, device: torch.device, precision: str = "fp32", batch_size: int = 64, num_workers: int = 0):
        from .env import autocast_factory

        self.encoder = encoder
        self.device = device
        self.autocast = autocast_factory(device, precision)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.model = encoder.model.to(device).eval()
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def embed_paths(self, paths: Sequence[Path], progress: bool = False) -> tuple[np.ndarray, list[tuple[int, str]]]:
        from .evaluate import embed_images

        emb, skipped = embed_images(
            self.model, paths, self.encoder.image_spec, device=self.device, autocast=self.autocast,
            batch_size=self.batch_size, num_workers=self.num_workers, progress=progress,
        )  # fmt: skip
        return emb.numpy(), [(s.index, s.reason) for s in skipped]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        from .evaluate import embed_texts

        return embed_texts(
            self.model, self.encoder.tokenizer, list(texts), context_length=self.encoder.context_length,
            device=self.device, autocast=self.autocast, batch_size=self.batch_size,
        ).numpy()  # fmt: skip

    def index_folder(self, images: Path, out: Path, *, progress: bool = False) -> tuple[GalleryIndex, UpdateStats]:
        """Create or update the index at ``out`` for the folder ``images`` and save it."""
        existing = GalleryIndex.load(out) if (out / "index.json").is_file() else None
        if existing is not None:
            existing.check_model(self.fingerprint, out)
            if existing.root != Path(os.path.abspath(images)):
                raise IndexMismatchError(f"index {out} is of the folder {existing.root}, not {images}; use another --out")
        index, stats = update_index(existing, images, self.fingerprint, lambda p: self.embed_paths(p, progress))
        if existing is None or stats.embedded or stats.removed or len(stats.failed):
            index.save(out)
        return index, stats

    def cached_gallery(self, images: Path, *, progress: bool = False) -> tuple[GalleryIndex, UpdateStats]:
        """The index of ``images`` kept in the user cache: made on first use, updated when files change."""
        path = gallery_cache_path(images)
        if (path / "index.json").is_file():
            try:
                GalleryIndex.load(path).check_model(self.fingerprint, path)
            except (IndexMismatchError, DataError):
                log.info("gallery cache %s was made by another model: rebuilding", path)
                import shutil

                shutil.rmtree(path)
        return self.index_folder(images, path, progress=progress)
