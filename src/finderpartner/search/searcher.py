"""One model + one store: the object `finderpartner search`, the Gradio demo and the HTTP service all use.

``PhotoSearcher(embedder, store)`` checks that the store holds vectors of this model, parses ``--where`` texts
against the store's columns, embeds a prompt or an image, and returns ``Hit`` rows. ``StoreGallery`` shows a
store to the demo as the gallery interface it knew (``search(vectors, k)`` -> ranked hits with paths).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import DataError, IndexMismatchError, UsageError
from .filters import Filter, parse
from .store import Hit, SearchKnobs, VectorStore


class QueryEmbedder(Protocol):
    @property
    def fingerprint(self) -> str: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_paths(
        self, paths: Sequence[Path], progress: bool = False
    ) -> tuple[np.ndarray, list[tuple[int, str]]]: ...


class PhotoSearcher:
    def __init__(self, embedder: QueryEmbedder, store: VectorStore, *, where: str = "the store") -> None:
        if embedder.fingerprint != store.fingerprint:
            raise IndexMismatchError(
                f"{where} was built by another model (fingerprint {store.fingerprint[:12]}, this model "
                f"{embedder.fingerprint[:12]}); search it with that model, or rebuild it: finderpartner index "
                f"--model <model> --images <folder> --out <store> --overwrite"
            )
        self.embedder = embedder
        self.store = store

    def __len__(self) -> int:
        return self.store.count()

    def where(self, text: str | Filter | None) -> Filter | None:
        """A ``--where`` text parsed against this store's columns (a parsed filter passes through)."""
        if text is None or not isinstance(text, str):
            return text
        return parse(text, self.store.columns())

    def embed_query(self, *, prompt: str | None = None, image: Path | None = None) -> np.ndarray:
        if (prompt is None) == (image is None):
            raise UsageError("give a text prompt or a query image")
        if prompt is not None:
            if not prompt.strip():
                raise UsageError("the prompt is empty: describe what you are looking for")
            return self.embedder.embed_texts([prompt.strip()])
        vectors, failed = self.embedder.embed_paths([Path(image)])  # type: ignore[arg-type]
        if failed:
            raise DataError(f"cannot read query image {image}: {failed[0][1]}")
        return vectors

    def search(
        self,
        *,
        prompt: str | None = None,
        image: Path | None = None,
        vector: np.ndarray | None = None,
        k: int = 10,
        where: str | Filter | None = None,
        knobs: SearchKnobs | None = None,
    ) -> list[Hit]:
        """The top-k photos for one query (a prompt, an image or a ready vector) among those matching ``where``."""
        expr = self.where(where)  # parsed before anything is embedded: a typo costs nothing
        q = vector if vector is not None else self.embed_query(prompt=prompt, image=image)
        return self.store.search(np.asarray(q, np.float32).reshape(1, -1), k, expr, knobs)[0]


@dataclass
class RankedHit:
    """The demo's view of a hit (index.SearchHit's fields)."""

    rank: int
    path: Path
    score: float


class StoreGallery:
    """A store as the demo's gallery: ``len()``, ``root`` and ``search(vectors, k)``."""

    def __init__(self, store: Any, knobs: SearchKnobs | None = None) -> None:
        self.store = store
        self.knobs = knobs
        roots = store.manifest.get("roots") or [] if hasattr(store, "manifest") else []
        self.root = Path(os.path.commonpath(roots)) if roots else Path("/")

    def __len__(self) -> int:
        return int(self.store.count())

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[RankedHit]]:
        return [
            [RankedHit(r + 1, Path(h.path), h.score) for r, h in enumerate(row)]
            for row in self.store.search(np.asarray(queries, np.float32), k, None, self.knobs)
        ]
