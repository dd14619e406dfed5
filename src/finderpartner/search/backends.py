"""Which store a location names, and how a long-running reader (``finderpartner serve``) follows its updates.

A location is a folder (the FAISS store, faiss_store.py: the default) or ``milvus:FILE.db`` /
``milvus:http://host:19530[#collection]`` (milvus_store.py). ``open_store`` opens either for reading;
``store_version`` gives a long-running reader (``serve.LiveStore``) a cheap token that changes when another
process commits to the store (a new manifest: added segments, a compaction; or new tombstones in meta.sqlite).
A Milvus store has no token (None): a Milvus server shows every search the collection as it is, and a milvus-lite
file is held by this process alone.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from ..errors import IndexMismatchError
from .faiss_store import MANIFEST, META, FaissStore
from .milvus_store import MilvusStore, is_milvus_location, parse_location


def open_store(location: str | os.PathLike[str], *, fingerprint: str | None = None) -> Any:
    """The store at ``location``, for reading; ``fingerprint`` (the querying model's) must be the store's."""
    if is_milvus_location(location):
        return MilvusStore.open(parse_location(location), fingerprint=fingerprint)
    store = FaissStore.open(Path(location))
    if fingerprint is not None and store.fingerprint != fingerprint:
        theirs = store.fingerprint
        store.close()
        raise IndexMismatchError(
            f"store {location} was built by another model (fingerprint {theirs[:12]}, this model "
            f"{fingerprint[:12]}): serve it with the model that built it, or rebuild it with this one"
        )
    return store


class FolderVersion:
    """A token that changes whenever a writer commits to a FAISS store folder: the manifest's identity (it is
    replaced atomically) and SQLite's data_version of meta.sqlite as seen from this reader's own connection."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Hashable:
        try:
            st = (self.folder / MANIFEST).stat()
            manifest = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            manifest = None
        with self._lock:
            try:
                if self._db is None:
                    uri = f"{(self.folder / META).resolve().as_uri()}?mode=ro"
                    self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
                data = int(self._db.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error:
                self._db, data = None, -1
        return (manifest, data)


def store_version(location: str | os.PathLike[str]) -> Callable[[], Hashable | None]:
    """The change token of the store at ``location`` (module docstring)."""
    if is_milvus_location(location):
        return lambda: None  # live by itself (module docstring)
    return FolderVersion(Path(os.path.abspath(location)))
