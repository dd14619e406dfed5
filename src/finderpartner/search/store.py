"""The one interface every vector store implements (FAISS folder: faiss_store.py; Milvus: milvus_store.py).

A store holds one vector per photo (L2-normalised, inner product = cosine), a row of metadata per photo (id,
path, file stamp, attribute columns) and answers top-k searches restricted by a ``filters.Filter``. Ids are
int64, assigned by the store in the order rows are added (``PhotoRow.id`` None) or given by the caller. A
removal is a tombstone that every later search honours at once; ``compact`` drops removed rows for good.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .filters import Filter


@dataclass(frozen=True)
class Hit:
    """One search result: the photo's id and path, the cosine score and its attribute columns."""

    id: int
    path: str
    score: float
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PhotoRow:
    """One photo to add: its path (as the store keeps it), file stamp and attribute values (column -> value;
    None or missing = null). ``id`` None: the store assigns the next id."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    attributes: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class SearchKnobs:
    """Search-time settings. None = the value the store chose when it was built (stored in its manifest).

    ``nprobe``: IVF lists visited per query (more = better recall, slower); ``ef_search``: HNSW candidate list;
    ``exact``: ignore the approximate index and scan every live vector; ``exact_below``: a filter matching fewer
    rows than this is answered by an exact scan of those rows (cheaper and exact; None = the store's default);
    ``refine``: the approximate index proposes ``refine * k`` candidates, re-scored exactly from the stored
    vectors (1 = no re-scoring; None = the store's value).
    """

    nprobe: int | None = None
    ef_search: int | None = None
    exact: bool = False
    exact_below: int | None = None
    refine: int | None = None


@dataclass(frozen=True)
class CompactStats:
    removed: int  # tombstoned rows dropped from disk
    live: int  # rows in the new base
    generation: int


@runtime_checkable
class VectorStore(Protocol):
    """What `finderpartner search`, the demo and the HTTP service need from a store."""

    @property
    def dim(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model whose vectors the store holds (queries must come from the same model)."""
        ...

    def columns(self) -> dict[str, str]:
        """Filterable columns: name -> ``text`` / ``integer`` / ``real`` (built-ins id, path, size, mtime_ns
        first, then the attribute columns)."""
        ...

    def count(self) -> int:
        """Live (not removed) photos."""
        ...

    def add(self, rows: Sequence[PhotoRow], vectors: np.ndarray) -> list[int]:
        """Add photos (one row per vector, vectors (N, dim) float32 L2-normalised); returns their ids.
        A path already in the store (live) is refused: remove it first."""
        ...

    def remove(
        self, *, ids: Sequence[int] | None = None, paths: Sequence[str] | None = None, where: Filter | None = None
    ) -> int:
        """Tombstone the photos selected by any of ``ids``, ``paths`` or ``where`` (their union); returns how many
        live photos were removed. Durable before it returns: no later search returns them, even after a crash."""
        ...

    def search(
        self, queries: np.ndarray, k: int, where: Filter | None = None, knobs: SearchKnobs | None = None
    ) -> list[list[Hit]]:
        """Top-``k`` live photos for each query row (best first) among those matching ``where``."""
        ...

    def compact(self) -> CompactStats:
        """Drop removed photos from disk and fold appended segments into the approximate index."""
        ...

    def close(self) -> None: ...


def nothing_removed(paths: Sequence[str], ids: Sequence[int], where: str | None) -> str:
    """What `index remove` says when its selection matched no live photo: what it looked for, and how paths match."""
    asked = [f"path {p}" for p in paths[:3]] + [f"id {i}" for i in ids[:3]] + ([f"--where {where}"] if where else [])
    more = len(paths) + len(ids) + bool(where) - len(asked)
    listed = ", ".join(asked) + (f" and {more} more" if more > 0 else "")
    hint = (
        " (a path matches as the store holds it: absolute, made from the folder the command runs in)" if paths else ""
    )
    return f"no live photo matched {listed}: nothing was removed{hint}"
