"""Per-photo metadata of a FAISS store: ``meta.sqlite`` (WAL), one row per photo, typed attribute columns.

``photos(id INTEGER PRIMARY KEY, path, size, mtime_ns, segment, deleted, <attributes>)``: ``segment`` is the
segment file holding the photo's vector, ``deleted`` the tombstone (1 = removed; honoured by every search from
the moment the UPDATE commits, synchronous=FULL so a crash right after keeps it). A path is unique among live
rows only (a removed photo may be added again, under a new id). Ids are never reused: ``state.next_id`` only
grows, even when compaction deletes removed rows for good. Attribute kinds (``text`` / ``integer`` / ``real``)
live in ``columns`` so that a filter can be checked before it runs (filters.py).
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, StorageError
from ..outputs import free_space
from .filters import INTEGER, KINDS, REAL, TEXT, Filter, quote_identifier, to_sql

BUILTIN: dict[str, str] = {"id": INTEGER, "path": TEXT, "size": INTEGER, "mtime_ns": INTEGER}
RESERVED = {"segment", "deleted", "rowid", "oid", "_rowid_"}
_SQL_KIND = {TEXT: "TEXT", INTEGER: "INTEGER", REAL: "REAL"}
_CHUNK = 900  # ids per IN (...) list: under SQLite's oldest variable limit (999)


def check_column_name(name: str, where: str) -> None:
    """An attribute column name a store accepts (any printable text but the built-in and reserved names)."""
    if not name or not name.strip() or not name.isprintable() or len(name) > 64:
        raise DataError(f"{where}: column name {name!r} is empty, too long or holds control characters; rename it")
    if name.lower() in BUILTIN or name.lower() in RESERVED:
        raise DataError(
            f"{where}: column {name!r} is a built-in column of the store ({', '.join([*BUILTIN, *RESERVED])}); "
            "rename it in the attributes file"
        )
    if re.search(r"[\x00-\x1f]", name):
        raise DataError(f"{where}: column name {name!r} holds control characters; rename it")


def infer_kind(values: Iterable[str]) -> str:
    """The kind of a column of text values from a CSV/JSONL (empty = null): integer, else real, else text."""
    kind = INTEGER
    for v in values:
        v = v.strip()
        if not v:
            continue
        if kind == INTEGER:
            try:
                int(v)
                continue
            except ValueError:
                kind = REAL
        try:
            if not math.isfinite(float(v)):
                return TEXT
        except ValueError:
            return TEXT
    return kind


def coerce(value: Any, kind: str, what: str) -> Any:
    """A value for a column of ``kind`` (None / '' = null); a DataError naming ``what`` when it does not fit."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if kind == INTEGER:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError
            return int(str(value).strip())
        if kind == REAL:
            f = float(str(value).strip()) if isinstance(value, str) else float(value)
            if not math.isfinite(f):
                raise ValueError
            return f
    except ValueError:
        raise DataError(f"{what}: {value!r} is not {'an integer' if kind == INTEGER else 'a number'}") from None
    return str(value)


def _storage_errors(method: Any) -> Any:
    """SQLite's refused writes (a full disk, a read-only file) as a StorageError naming the file: not a bug."""

    def wrapper(self: Meta, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as e:
            text = str(e).lower()
            if "full" in text or "disk" in text or "readonly" in text or "unable to open" in text:
                raise StorageError(
                    f"could not write {self.path} ({e}): {free_space(self.path)}; free space there (or make it "
                    "writable) and run the command again: what the store held before is intact"
                ) from None
            raise

    wrapper.__doc__ = method.__doc__
    return wrapper


class Meta:
    """The SQLite side of a store. One writer (the store's folder lock), any number of readers (WAL)."""

    @_storage_errors
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        uri = f"file:{path}?mode={'ro' if readonly else 'rwc'}"
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")  # a committed tombstone survives a power cut
            self._create()
        self._columns: dict[str, str] | None = None

    def _create(self) -> None:
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS photos (
                id INTEGER PRIMARY KEY, path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
                segment INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
            CREATE UNIQUE INDEX IF NOT EXISTS live_path ON photos(path) WHERE deleted = 0;
            CREATE INDEX IF NOT EXISTS removed ON photos(id) WHERE deleted = 1;
            CREATE TABLE IF NOT EXISTS columns (name TEXT PRIMARY KEY, kind TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            INSERT OR IGNORE INTO state VALUES ('next_id', 0);
            """
        )

    def close(self) -> None:
        self.db.close()

    def data_version(self) -> int:
        """Changes when another connection commits (a reader's cue to reload tombstones)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    # ------------------------------------------------------------------------------------------------ columns

    def columns(self) -> dict[str, str]:
        if self._columns is None:
            attrs = dict(self.db.execute("SELECT name, kind FROM columns ORDER BY rowid").fetchall())
            self._columns = {**BUILTIN, **attrs}
        return dict(self._columns)

    def attribute_columns(self) -> dict[str, str]:
        return {k: v for k, v in self.columns().items() if k not in BUILTIN}

    @_storage_errors
    def ensure_columns(self, kinds: Mapping[str, str], where: str = "attributes") -> None:
        """Add attribute columns the store does not have yet; a known column keeps its kind (an integer column
        given real values later becomes... refused: DataError naming it)."""
        known = self.columns()
        lower = {k.lower(): k for k in known}
        for name, kind in kinds.items():
            if kind not in KINDS:
                raise ValueError(f"unknown column kind {kind!r}")
            check_column_name(name, where)
            same = lower.get(name.lower())
            if same is not None:
                if same != name:
                    raise DataError(f"{where}: column {name!r} differs only in case from the store's {same!r}")
                if known[same] != kind and not (known[same] == REAL and kind == INTEGER):
                    if known[same] == TEXT:
                        continue  # numbers fit a text column
                    raise DataError(
                        f"{where}: column {name!r} holds {kind} values but the store's column is {known[same]}"
                    )
                continue
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(f"ALTER TABLE photos ADD COLUMN {quote_identifier(name)} {_SQL_KIND[kind]}")
            self.db.execute("INSERT INTO columns VALUES (?, ?)", (name, kind))
            self.db.execute("COMMIT")
            self._columns = None
            known = self.columns()
            lower[name.lower()] = name

    # ------------------------------------------------------------------------------------------------ rows

    def reserve_ids(self, n: int) -> int:
        """The first of ``n`` new ids (committed with the rows: ``insert``)."""
        return int(self.db.execute("SELECT value FROM state WHERE key = 'next_id'").fetchone()[0])

    def live_ids_of_paths(self, paths: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for start in range(0, len(paths), _CHUNK):
            chunk = list(paths[start : start + _CHUNK])
            q = f"SELECT path, id FROM photos WHERE deleted = 0 AND path IN ({','.join('?' * len(chunk))})"
            found.update(dict(self.db.execute(q, chunk).fetchall()))
        return found

    @_storage_errors
    def insert(self, rows: Sequence[tuple[int, str, int, int, dict[str, Any]]], segment: int) -> None:
        """Rows (id, path, size, mtime_ns, attributes) in one transaction, with the id counter."""
        attrs = list(self.attribute_columns())
        names = ["id", "path", "size", "mtime_ns", "segment", *attrs]
        sql = (
            f"INSERT INTO photos ({', '.join(quote_identifier(n) for n in names)}) "
            f"VALUES ({', '.join('?' * len(names))})"
        )
        values = [(i, p, s, m, segment, *[a.get(c) for c in attrs]) for i, p, s, m, a in rows]
        top = max((r[0] for r in rows), default=-1) + 1
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(sql, values)
            self.db.execute("UPDATE state SET value = max(value, ?) WHERE key = 'next_id'", (top,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @_storage_errors
    def tombstone(self, ids: Sequence[int] = (), paths: Sequence[str] = (), where: Filter | None = None) -> int:
        """Mark live rows removed, in one transaction; returns how many were live."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            n = 0
            for start in range(0, len(ids), _CHUNK):
                chunk = [int(i) for i in ids[start : start + _CHUNK]]
                n += self.db.execute(
                    f"UPDATE photos SET deleted = 1 WHERE deleted = 0 AND id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).rowcount
            for start in range(0, len(paths), _CHUNK):
                chunk2 = list(paths[start : start + _CHUNK])
                n += self.db.execute(
                    f"UPDATE photos SET deleted = 1 WHERE deleted = 0 AND path IN ({','.join('?' * len(chunk2))})",
                    chunk2,
                ).rowcount
            if where is not None:
                sql, params = to_sql(where)
                n += self.db.execute(f"UPDATE photos SET deleted = 1 WHERE deleted = 0 AND {sql}", params).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return n

    def removed_ids(self) -> np.ndarray:
        ids = self.db.execute("SELECT id FROM photos WHERE deleted = 1 ORDER BY id").fetchall()
        return np.asarray([i for (i,) in ids], dtype=np.int64)

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM photos WHERE deleted = 0").fetchone()[0])

    def select_ids(self, where: Filter | None) -> np.ndarray:
        """Ids of the live rows matching ``where`` (all live rows for None), sorted."""
        sql, params = to_sql(where) if where is not None else ("1", [])
        cur = self.db.execute(f"SELECT id FROM photos WHERE deleted = 0 AND {sql} ORDER BY id", params)
        return np.fromiter((i for (i,) in cur), dtype=np.int64)

    def rows(self, ids: Sequence[int]) -> dict[int, tuple[str, dict[str, Any]]]:
        """id -> (path, attributes) for these ids (removed ones included: the caller filters)."""
        attrs = list(self.attribute_columns())
        cols = ", ".join(["id", "path", *(quote_identifier(a) for a in attrs)])
        out: dict[int, tuple[str, dict[str, Any]]] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            q = f"SELECT {cols} FROM photos WHERE id IN ({','.join('?' * len(chunk))})"
            for row in self.db.execute(q, chunk):
                out[row[0]] = (row[1], dict(zip(attrs, row[2:])))
        return out

    def live_stamps(self) -> dict[str, tuple[int, int, int]]:
        """path -> (id, size, mtime_ns) of every live row (the indexer's "what is done already")."""
        cur = self.db.execute("SELECT path, id, size, mtime_ns FROM photos WHERE deleted = 0")
        return {p: (i, s, m) for p, i, s, m in cur}

    @_storage_errors
    def purge_removed(self) -> int:
        """Delete tombstoned rows for good (compaction, after the new base no longer holds them)."""
        return self.db.execute("DELETE FROM photos WHERE deleted = 1").rowcount

    @_storage_errors
    def set_segment(self, segment: int) -> None:
        """Every live row now lives in the one segment a compaction wrote."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("UPDATE photos SET segment = ? WHERE deleted = 0", (segment,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
