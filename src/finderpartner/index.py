"""Gallery index: a folder of images embedded into a FAISS index, kept up to date incrementally, searched.

An index folder holds ``index.faiss`` (inner product over L2-normalised vectors = cosine similarity) and
``index.json`` (the gallery root, one entry per vector with the file's size and mtime, files that failed
to load, and the fingerprint of the model that made the vectors). Updating re-embeds only new and changed
files (a file counts as changed when its size or modification time changed) and drops removed ones. An
index made by another model is refused: its vectors mean nothing here.

Two searchers embed galleries and queries: ``Searcher`` with the PyTorch model, ``OnnxSearcher`` with an
export folder through onnxruntime alone. Both carry the source model's fingerprint, so either can search
an index the other built.
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .errors import DataError, FinderPartnerError, IndexMismatchError
from .model import ImageSpec
from .outputs import claim_output, replace_dir, write_marker

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
}  # HEIC: pillow-heif
FORMAT_VERSION = 1
# paths -> (normalised float32 embeddings with NaN rows for failures, [(row, reason)] failures)
EmbedFn = Callable[[Sequence[Path]], tuple[np.ndarray, list[tuple[int, str]]]]


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
        """Write ``index.faiss`` and ``index.json`` atomically (a crash leaves the previous index intact)."""

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
            write_marker(tmp, "index", {"images": self.root})

        replace_dir(write, path, what=f"gallery index {path}")

    @classmethod
    def load(cls, path: Path) -> GalleryIndex:
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


def scan_images(root: Path) -> dict[str, FileStamp]:
    """Image files under ``root`` (recursively, by extension; hidden files and folders skipped) with their stamps."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    found: dict[str, FileStamp] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                full = Path(dirpath) / name
                try:
                    st = full.stat()
                except OSError:  # a dangling symlink, or deleted while we walk: not part of the gallery
                    continue
                found[full.relative_to(root).as_posix()] = FileStamp(st.st_size, st.st_mtime_ns)
    return found


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


def update_index(
    index: GalleryIndex | None, root: Path, fingerprint: str, embed: EmbedFn
) -> tuple[GalleryIndex, UpdateStats]:
    """Bring ``index`` up to date with the files under ``root`` (a new index when None); embeds only what changed."""
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
    if to_embed:
        vectors, failures = embed([root / f for f in to_embed])
        bad_rows = {row for row, _ in failures}
        for row, reason in failures:
            failed[to_embed[row]] = (current[to_embed[row]], reason)
            stats.failed.append((to_embed[row], reason))
        good = [i for i in range(len(to_embed)) if i not in bad_rows]
        new_vectors = np.asarray(vectors, np.float32)[good]
        embedded_ok = [to_embed[i] for i in good]
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


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's config and weights: equal exactly when the embeddings would be.

    Bookkeeping (where the model was loaded from, which transformers wrote it) is left out: the same weights
    reached through another path embed the same, and an index built from them stays valid.
    """
    h = hashlib.sha256(json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
}  # the weights' bytes tell the dtype


def _stable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without bookkeeping keys ('_name_or_path', versions, dtype), at every level."""
    return {
        k: _stable_config(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }


def default_cache_dir() -> Path:
    base = os.environ.get("FINDERPARTNER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finderpartner"
    )
    return Path(base)


def gallery_cache_path(images: Path) -> Path:
    """Where ``search --images DIR`` keeps the index of DIR (one per folder; rebuilt if the model changes)."""
    key = hashlib.sha256(os.path.abspath(images).encode()).hexdigest()[:16]  # the index's own notion of its root
    return default_cache_dir() / "galleries" / key


# --------------------------------------------------------------------------------------------------------------
# Embedding image files with any backend


def _collate(samples: list[Any]) -> tuple[list[int], torch.Tensor | None, list[Any]]:
    from .data.dataset import Skipped

    good = [s for s in samples if not isinstance(s, Skipped)]
    bad = [s for s in samples if isinstance(s, Skipped)]
    pixels = torch.stack([s["pixel_values"] for s in good]) if good else None
    return [s["index"] for s in good], pixels, bad


def embed_image_files(
    paths: Sequence[Any],
    spec: ImageSpec,
    encode: Callable[[torch.Tensor], np.ndarray],
    dim: int,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    max_pixels: int | None = None,
    pin_memory: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Embed image files (or PIL images) with ``encode`` (uint8 pixels (B, 3, H, W) -> (B, dim)).

    Unreadable files are NaN rows and listed as (row, reason). Decoding and the model's preprocessing
    (EvalTransform) run in ``num_workers`` DataLoader processes. Evaluation, indexing and search all embed here.
    """
    from .data.dataset import ImageFileDataset
    from .data.transforms import EvalTransform

    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    failures: list[tuple[int, str]] = []
    loader = DataLoader(
        ImageFileDataset(list(paths), EvalTransform(spec), max_pixels),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )  # leave the global RNG stream alone (exact resumes)
    for rows, pixels, bad in tqdm(loader, desc="embedding images", unit="batch", disable=not progress, leave=False):
        failures += [(s.index, s.reason) for s in bad]
        if pixels is not None:
            out[rows] = encode(pixels)
    return out, failures


class Embedder(Protocol):
    """What indexing and search need from a model: ``Searcher`` (PyTorch) and ``OnnxSearcher`` provide it."""

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
    index, stats = update_index(existing, images, embedder.fingerprint, lambda p: embedder.embed_paths(p, progress))
    if existing is None or stats.embedded or stats.removed or stats.failed:
        index.save(out)
    return index, stats


# --------------------------------------------------------------------------------------------------------------
# Searchers


class Searcher:
    """A PyTorch model ready to embed galleries and queries: what ``search``, ``index``, ``src/main.py`` and the demo use."""

    def __init__(
        self, encoder: Any, *, device: torch.device, precision: str = "fp32", batch_size: int = 64, num_workers: int = 0
    ):
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

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the factor CLIP multiplies cosines by before a softmax."""
        return float(self.model.logit_scale.detach().float().exp())

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        from .data.transforms import normalize
        from .model import encode_image

        with self.autocast():
            return encode_image(self.model, normalize(pixels.to(self.device), self.encoder.image_spec)).cpu().numpy()

    def embed_paths(self, paths: Sequence[Path], progress: bool = False) -> tuple[np.ndarray, list[tuple[int, str]]]:
        return embed_image_files(
            paths,
            self.encoder.image_spec,
            self._encode_pixels,
            int(self.model.config.projection_dim),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=progress,
        )

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        from .evaluate import embed_texts

        return embed_texts(
            self.model,
            self.encoder.tokenizer,
            list(texts),
            context_length=self.encoder.context_length,
            device=self.device,
            autocast=self.autocast,
            batch_size=self.batch_size,
        ).numpy()

    def index_folder(
        self, images: Path, out: Path, *, overwrite: bool = False, model: str | None = None, progress: bool = False
    ) -> tuple[GalleryIndex, UpdateStats]:
        return index_folder(self, images, out, overwrite=overwrite, model=model, progress=progress)

    def cached_gallery(self, images: Path, *, progress: bool = False) -> tuple[GalleryIndex, UpdateStats]:
        return cached_gallery(self, images, progress=progress)


class OnnxSearcher:
    """The same as ``Searcher`` with an export folder (``finderpartner export``): onnxruntime, no PyTorch model.

    The tokenizer and preprocessing come from the export folder; the fingerprint is the source model's, so
    indexes are shared with ``Searcher``. ``variant`` picks fp32 or an fp16/int8 export (same fingerprint:
    their embeddings differ from fp32 by the accuracy cost that ``export`` reported).
    """

    def __init__(
        self,
        export_dir: str | Path,
        *,
        variant: str = "fp32",
        device: str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        from .export import load_onnx_encoders

        self.onnx = load_onnx_encoders(export_dir, variant=variant, device=device)
        self.batch_size = batch_size
        self.num_workers = num_workers

    @property
    def fingerprint(self) -> str:
        return str(self.onnx.info["fingerprint"])

    @property
    def source(self) -> str | None:
        """The model folder the export was made from (to find the run's validation images)."""
        return self.onnx.info.get("source")

    @property
    def logit_scale(self) -> float:
        return float(self.onnx.info["logit_scale"])

    def _encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        from .data.transforms import normalize

        return self.onnx.encode_pixels(normalize(pixels, self.onnx.image_spec).numpy())

    def embed_paths(self, paths: Sequence[Path], progress: bool = False) -> tuple[np.ndarray, list[tuple[int, str]]]:
        return embed_image_files(
            paths,
            self.onnx.image_spec,
            self._encode_pixels,
            int(self.onnx.info["embed_dim"]),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=progress,
        )

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.onnx.encode_texts(list(texts), batch_size=self.batch_size)

    def index_folder(
        self, images: Path, out: Path, *, overwrite: bool = False, model: str | None = None, progress: bool = False
    ) -> tuple[GalleryIndex, UpdateStats]:
        return index_folder(self, images, out, overwrite=overwrite, model=model, progress=progress)

    def cached_gallery(self, images: Path, *, progress: bool = False) -> tuple[GalleryIndex, UpdateStats]:
        return cached_gallery(self, images, progress=progress)
