"""The Milvus store: the ``VectorStore`` interface (store.py) over a Milvus collection, through ``pymilvus``.

One code path for both of Milvus's forms: ``MilvusClient(uri)`` opens a milvus-lite file (``photos.db``: Milvus
embedded in this process, what tests and one machine use) or a Milvus server / cluster (``http://host:19530``,
with a token), whose sharding, replication and persistence are Milvus's own. Nothing here shards by itself.

A store location is written ``milvus:PATH.db`` or ``milvus:http://host:19530`` (``#name`` picks the collection,
default ``photos``); the token of a server comes from ``$FINDERPARTNER_MILVUS_TOKEN`` (never from the command line,
where ``ps`` shows it).

The collection: ``id`` (INT64 primary key), ``path``, ``size``, ``mtime_ns``, one typed nullable field per
attribute column (``a0``, ``a1``, ...: any column name maps to a valid field name; the mapping is kept with the
collection), ``vector`` (FLOAT_VECTOR, inner product: the vectors are L2-normalised, so it is the cosine).
The model's fingerprint, its name, the column mapping, the next id and a generation counter are collection
properties: a store made by another model is refused with the fingerprints of both.

Filters (filters.py's AST) compile to Milvus boolean expressions. Column names come only from the mapping and
values are formatted by type (text quoted and escaped, numbers as numbers): a value cannot change the expression's
structure. Milvus's own null handling differs between operators (``age not in [40]`` matches a null age,
``not (age > 35)`` does not), so the compiler writes SQL's three-valued logic out explicitly: a row matches
exactly when ``filters.evaluate`` says True (tests check this against the Python evaluator).

milvus-lite lets one process open a file at a time: while ``finderpartner serve`` holds ``photos.db``,
``finderpartner index`` on the same file is refused with a message saying so. With a Milvus server, any number
of processes share the collection and every search sees the adds and removals committed before it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, FinderPartnerError, IndexMismatchError, OutputError, UsageError
from .filters import INTEGER, REAL, TEXT, And, Between, Compare, Filter, In, IsNull, Not, Or
from .store import CompactStats, Hit, PhotoRow, SearchKnobs

log = logging.getLogger(__name__)

PREFIX = "milvus:"
DEFAULT_COLLECTION = "photos"
TOKEN_ENV = "FINDERPARTNER_MILVUS_TOKEN"
FORMAT = 1
BUILTIN_COLUMNS = {"id": INTEGER, "path": TEXT, "size": INTEGER, "mtime_ns": INTEGER}
MAX_TEXT = 65_535  # Milvus's VARCHAR limit (bytes)
MAX_TOP_K = 16_384  # Milvus's limit on k
INSERT_BATCH = 2_000  # rows per insert: 2000 x 512-d float32 = 4 MB, well under gRPC's 64 MB message limit
LIST_BATCH = 1_000  # values per `in [...]` expression when looking rows up by path or id
INT64 = (-(2**63), 2**63 - 1)
_PROP = "finderpartner."


def _pymilvus() -> Any:
    # gRPC's C++ core logs a line each time a process forks beside its threads (DataLoader workers): not news
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        import pymilvus
    except ImportError:
        raise FinderPartnerError(
            "the Milvus store needs pymilvus (and milvus-lite for a local .db file): pip install 'finderpartner[milvus]'"
        ) from None
    return pymilvus


# -------------------------------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class MilvusLocation:
    uri: str  # a milvus-lite file (absolute path ending .db) or a server URI
    collection: str
    token: str = ""

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))

    def __str__(self) -> str:  # never shows the token
        return f"{PREFIX}{self.uri}#{self.collection}"


def is_milvus_location(text: str | os.PathLike[str]) -> bool:
    """Whether a ``--index`` / ``--store`` value names a Milvus store (``milvus:...``) rather than a folder."""
    return str(text).startswith(PREFIX)


def parse_location(text: str | os.PathLike[str]) -> MilvusLocation:
    """``milvus:photos.db``, ``milvus:/data/photos.db#mine``, ``milvus:http://host:19530#photos``."""
    body = str(text)
    body = body[len(PREFIX) :] if body.startswith(PREFIX) else body
    body = re.sub(r"^(https?|tcp|grpc):/(?=[^/])", r"\1://", body)  # through pathlib.Path, '//' became '/'
    body, _, collection = body.partition("#")
    collection = collection or DEFAULT_COLLECTION
    if not collection.replace("_", "a").isalnum() or not (collection[0].isalpha() or collection[0] == "_"):
        raise UsageError(
            f"{text}: Milvus collection names are letters, digits and underscores, starting with a letter "
            f"(got {collection!r})"
        )
    if not body:
        raise UsageError(f"{text}: give a milvus-lite file (milvus:photos.db) or a server (milvus:http://host:19530)")
    loc = MilvusLocation(body, collection, os.environ.get(TOKEN_ENV, ""))
    if loc.is_local:
        if not body.endswith(".db"):
            raise UsageError(f"{text}: a milvus-lite file name ends with .db (e.g. milvus:{body}.db)")
        loc = MilvusLocation(os.path.abspath(body), collection, "")
    return loc


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log_ = logging.getLogger(logger)
    level, log_.level = log_.level, logging.CRITICAL
    try:
        yield
    finally:
        log_.setLevel(level)


def _release_lite(path: str) -> None:
    """Stop this process's milvus-lite server of ``path`` (it holds the file's lock until then)."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # another milvus-lite layout: its servers end with the process
        return
    release = getattr(server_manager_instance, "release_server", None)
    if release is not None:
        release(path)


# ---------------------------------------------------------------------------------------------------- filters


def _text_literal(value: str) -> str:
    """A Milvus string literal. Milvus reads \\\\ \\" \\n \\r \\t inside double quotes but no \\u escape, so any
    other control character is refused rather than guessed at."""
    bad = next((c for c in value if ord(c) < 0x20 and c not in "\n\r\t"), None)
    if bad is not None:
        raise UsageError(f"--where: the text value {value!r} holds a control character ({bad!r}) Milvus cannot match")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def _literal(value: Any, kind: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"--where: {value!r} is not a text or a number")
    if isinstance(value, str):
        if kind != TEXT:
            raise UsageError(f"--where: {value!r} is text but the column holds numbers")
        return _text_literal(value)
    if kind == TEXT:
        raise UsageError(f"--where: {value!r} is a number but the column holds text: quote it")
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            raise UsageError(f"--where: {value} is outside the 64-bit integer range")
        return str(value)
    if not math.isfinite(value):
        raise UsageError(f"--where: {value} is not a finite number")
    return repr(float(value))


class FilterCompiler:
    """filters.Filter -> a Milvus expression over the collection's fields (``fields``: column -> (field, kind))."""

    _NEGATE = {"=": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}

    def __init__(self, fields: Mapping[str, tuple[str, str]]) -> None:
        self.fields = fields

    def compile(self, expr: Filter) -> str:
        return self.true(expr)

    def _field(self, column: str) -> tuple[str, str]:
        try:
            return self.fields[column]
        except KeyError:
            raise UsageError(f"--where: unknown column {column!r}; known columns: {', '.join(self.fields)}") from None

    def _guard(self, field: str, test: str) -> str:
        return f"({field} is not null and {test})"

    # SQL's three-valued logic written out: true(e) holds exactly when e is TRUE, false(e) exactly when e is FALSE
    # (a comparison with a null value is neither, so it is in no result, negated or not).
    def true(self, e: Filter) -> str:
        if isinstance(e, Compare):
            field, kind = self._field(e.column)
            op = "==" if e.op == "=" else e.op
            return self._guard(field, f"{field} {op} {_literal(e.value, kind)}")
        if isinstance(e, Between):
            field, kind = self._field(e.column)
            low, high = _literal(e.low, kind), _literal(e.high, kind)
            return self._guard(field, f"{field} >= {low} and {field} <= {high}")
        if isinstance(e, In):
            field, kind = self._field(e.column)
            return self._guard(field, f"{field} in [{', '.join(_literal(v, kind) for v in e.values)}]")
        if isinstance(e, IsNull):
            field, _ = self._field(e.column)
            return f"({field} is {'not ' if e.negated else ''}null)"
        if isinstance(e, Not):
            return self.false(e.item)
        if isinstance(e, And):
            return "(" + " and ".join(self.true(i) for i in e.items) + ")"
        if isinstance(e, Or):
            return "(" + " or ".join(self.true(i) for i in e.items) + ")"
        raise TypeError(f"not a filter node: {e!r}")

    def false(self, e: Filter) -> str:
        if isinstance(e, Compare):
            field, kind = self._field(e.column)
            return self._guard(field, f"{field} {self._NEGATE[e.op]} {_literal(e.value, kind)}")
        if isinstance(e, Between):
            field, kind = self._field(e.column)
            low, high = _literal(e.low, kind), _literal(e.high, kind)
            return self._guard(field, f"({field} < {low} or {field} > {high})")
        if isinstance(e, In):
            field, kind = self._field(e.column)
            return self._guard(field, f"{field} not in [{', '.join(_literal(v, kind) for v in e.values)}]")
        if isinstance(e, IsNull):
            return self.true(IsNull(e.column, not e.negated))
        if isinstance(e, Not):
            return self.true(e.item)
        if isinstance(e, And):
            return "(" + " or ".join(self.false(i) for i in e.items) + ")"
        if isinstance(e, Or):
            return "(" + " and ".join(self.false(i) for i in e.items) + ")"
        raise TypeError(f"not a filter node: {e!r}")


# ------------------------------------------------------------------------------------------------------ store


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _kind_of(values: Sequence[Any], column: str) -> str:
    """The column kind a batch of attribute values needs (None = null): integer, real or text."""
    present = [v for v in values if v is not None]
    if any(isinstance(v, str) for v in present):
        if not all(isinstance(v, str) for v in present):
            raise DataError(f"attribute {column!r} mixes text and numbers: make it one kind")
        return TEXT
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in present):
        raise DataError(f"attribute {column!r} holds values that are neither text nor numbers")
    return INTEGER if all(isinstance(v, int) for v in present) else REAL


class MilvusStore:
    """A ``VectorStore`` on one Milvus collection (module docstring). Open with ``open`` or ``create``."""

    def __init__(self, client: Any, location: MilvusLocation, properties: Mapping[str, str]) -> None:
        self._client = client
        self.location = location
        self._props = dict(properties)
        self._fields: dict[str, tuple[str, str]] = {}
        self._compiler = FilterCompiler(self._fields)
        self._load_fields()

    def _load_fields(self) -> None:
        """column -> (Milvus field, kind): the built-ins, then the attribute columns kept in the properties."""
        self._fields.clear()
        self._fields.update({k: (k, v) for k, v in BUILTIN_COLUMNS.items()})
        for name, (field, kind) in json.loads(self._props.get(_PROP + "columns", "{}")).items():
            self._fields[name] = (field, kind)

    # ------------------------------------------------------------------------------------------ open / create

    # milvus-lite runs in this process, one server per file, kept until the process exits: the last store of a
    # file to close releases it, so that another process (serve after index) can open the file
    _local_users: dict[str, int] = {}
    _local_lock = threading.Lock()

    @classmethod
    def _connect(cls, location: MilvusLocation, *, writing: bool) -> Any:
        pymilvus = _pymilvus()
        if location.is_local:
            Path(location.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            # milvus-lite logs a traceback of its own when the file is locked: the message below says it all
            with _quiet("milvus_lite"):
                client = pymilvus.MilvusClient(uri=location.uri, token=location.token)
        except pymilvus.exceptions.MilvusException as e:
            if location.is_local:
                error = OutputError if writing else DataError
                raise error(
                    f"cannot open the milvus-lite file {location.uri} ({e.message}): milvus-lite lets one process use "
                    "a file at a time; is another finderpartner (serve, index) using it? Stop it, or run a Milvus "
                    "server and give its URI (milvus:http://host:19530) to share a collection between processes"
                ) from None
            raise DataError(f"cannot connect to Milvus at {location.uri}: {e.message}") from None
        if location.is_local:
            with cls._local_lock:
                cls._local_users[location.uri] = cls._local_users.get(location.uri, 0) + 1
        return client

    @classmethod
    def open(
        cls, location: str | MilvusLocation, *, fingerprint: str | None = None, writing: bool = False
    ) -> MilvusStore:
        """An existing store; ``fingerprint`` (of the model that will query or add) must be the store's."""
        loc = location if isinstance(location, MilvusLocation) else parse_location(location)
        client = cls._connect(loc, writing=writing)
        if not client.has_collection(loc.collection):
            cls(client, loc, {}).close()
            raise DataError(
                f"{loc} holds no store: make it with finderpartner index --model <model> --images <folder> --out {loc}"
            )
        store = cls(client, loc, cls._read_properties(client, loc))
        if store._props.get(_PROP + "format") is None:
            store.close()
            raise DataError(f"{loc} is a Milvus collection finderpartner did not make: choose another #collection")
        if fingerprint is not None:
            try:
                store.check_model(fingerprint)
            except IndexMismatchError:
                store.close()
                raise
        client.load_collection(loc.collection)  # searchable (a reopened milvus-lite file starts released)
        return store

    @classmethod
    def create(
        cls,
        location: str | MilvusLocation,
        *,
        dim: int,
        fingerprint: str,
        model: str = "",
        columns: Mapping[str, str] | None = None,
        index_type: str | None = None,
        index_params: Mapping[str, Any] | None = None,
    ) -> MilvusStore:
        """A new store (an existing one of the same model is opened instead; of another model, refused).

        ``columns``: attribute column -> ``text`` / ``integer`` / ``real``. ``index_type``: Milvus's vector index
        (default: FLAT for milvus-lite, exact; AUTOINDEX for a server, which picks its own).
        """
        loc = location if isinstance(location, MilvusLocation) else parse_location(location)
        client = cls._connect(loc, writing=True)
        if client.has_collection(loc.collection):
            store = cls(client, loc, cls._read_properties(client, loc))
            if store._props.get(_PROP + "format") is None:
                store.close()
                raise OutputError(
                    f"{loc} is a Milvus collection finderpartner did not make: choose another #collection"
                )
            try:
                store.check_model(fingerprint)
            except IndexMismatchError:
                store.close()
                raise
            client.load_collection(loc.collection)  # searchable (a reopened milvus-lite file starts released)
            return store
        mapping = {name: (f"a{i}", kind) for i, (name, kind) in enumerate((columns or {}).items())}
        pymilvus = _pymilvus()
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("path", pymilvus.DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("size", pymilvus.DataType.INT64)
        schema.add_field("mtime_ns", pymilvus.DataType.INT64)
        for field, kind in mapping.values():
            cls._add_field(schema.add_field, pymilvus, field, kind)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=int(dim))
        params = client.prepare_index_params()
        params.add_index(
            field_name="vector",
            index_type=index_type or ("FLAT" if loc.is_local else "AUTOINDEX"),
            metric_type="IP",
            params=dict(index_params or {}),
        )
        client.create_collection(loc.collection, schema=schema, consistency_level="Strong")
        # sync=False: waiting for the (empty) index asks milvus-lite for a timestamp it does not implement
        client.create_index(loc.collection, params, sync=False)
        client.load_collection(loc.collection)
        props = {
            _PROP + "format": str(FORMAT),
            _PROP + "fingerprint": fingerprint,
            _PROP + "dim": str(int(dim)),
            _PROP + "model": model,
            _PROP + "columns": json.dumps(mapping),
            _PROP + "next_id": "0",
            _PROP + "generation": "0",
        }
        client.alter_collection_properties(loc.collection, properties=props)
        log.info("made Milvus collection %s (%d-d, %s)", loc, dim, index_type or "default index")
        return cls(client, loc, props)

    @staticmethod
    def _add_field(add: Any, pymilvus: Any, field: str, kind: str) -> None:
        types = {TEXT: pymilvus.DataType.VARCHAR, INTEGER: pymilvus.DataType.INT64, REAL: pymilvus.DataType.DOUBLE}
        extra = {"max_length": MAX_TEXT} if kind == TEXT else {}
        add(field_name=field, datatype=types[kind], nullable=True, **extra)

    @staticmethod
    def _read_properties(client: Any, loc: MilvusLocation) -> dict[str, str]:
        return {str(k): str(v) for k, v in client.describe_collection(loc.collection).get("properties", {}).items()}

    def _set_properties(self, **values: str) -> None:
        props = {_PROP + k: v for k, v in values.items()}
        self._client.alter_collection_properties(self.location.collection, properties=props)
        self._props.update(props)

    # ------------------------------------------------------------------------------------------ facts

    @property
    def dim(self) -> int:
        return int(self._props[_PROP + "dim"])

    @property
    def fingerprint(self) -> str:
        return self._props[_PROP + "fingerprint"]

    @property
    def model(self) -> str:
        return self._props.get(_PROP + "model", "")

    @property
    def generation(self) -> int:
        """Bumped by every add, removal and compaction (what /healthz shows; a reader sees changes live)."""
        return int(self._props.get(_PROP + "generation", "0"))

    def refresh(self) -> None:
        """Re-read the collection's properties (another process may have added columns or bumped the generation)."""
        self._props = self._read_properties(self._client, self.location)
        self._load_fields()

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise IndexMismatchError(
                f"store {self.location} was built by another model (fingerprint {self.fingerprint[:12]}"
                f"{', ' + self.model if self.model else ''}), this model is {fingerprint[:12]}: use the model that "
                "built it, or index into another collection (milvus:...#name)"
            )

    def columns(self) -> dict[str, str]:
        return {name: kind for name, (_, kind) in self._fields.items()}

    def count(self) -> int:
        return self._count("")

    def _count(self, expr: str) -> int:
        rows = self._client.query(self.location.collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def live_stamps(self) -> dict[str, tuple[int, int, int]]:
        """path -> (id, size, mtime_ns) of every live photo (what `index` compares the files with)."""
        out: dict[str, tuple[int, int, int]] = {}
        fields = ["id", "path", "size", "mtime_ns"]
        with _quiet("pymilvus"):  # milvus-lite has no MVCC timestamp to give: pymilvus warns, then uses its own
            iterator = self._client.query_iterator(
                self.location.collection, batch_size=10_000, filter="", output_fields=fields
            )
        try:
            while batch := iterator.next():
                for r in batch:
                    out[r["path"]] = (int(r["id"]), int(r["size"]), int(r["mtime_ns"]))
        finally:
            iterator.close()
        return out

    def compile(self, where: Filter) -> str:
        """The Milvus expression of a filter (public for tests and for reading what a search sends)."""
        return self._compiler.compile(where)

    # ------------------------------------------------------------------------------------------ writes

    def add(self, rows: Sequence[PhotoRow], vectors: np.ndarray, *, check_paths: bool = True) -> list[int]:
        """Insert the rows; a path already live is refused. ``check_paths=False`` skips that lookup, for a caller
        that has just compared its paths with ``live_stamps()`` (the `index` command): on milvus-lite each lookup
        scans the whole collection (~60 us a row), which made a 100k build quadratic."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(rows):
            raise IndexMismatchError(
                f"{len(rows)} rows with vectors of shape {tuple(vectors.shape)}: the store {self.location} holds "
                f"{self.dim}-d vectors, one per row"
            )
        if not rows:
            return []
        if not np.isfinite(vectors).all():
            raise DataError("vectors to add hold NaN or infinite values (images that failed to embed?)")
        self._ensure_columns(rows)
        paths = [r.path for r in rows]
        if len(set(paths)) != len(paths):
            raise DataError("the same path is added twice in one batch")
        taken = self._live_paths(paths) if check_paths else set()
        if taken:
            raise DataError(
                f"{len(taken)} paths are already in {self.location} (e.g. {sorted(taken)[0]}): remove them first"
            )
        next_id = int(self._props.get(_PROP + "next_id", "0"))
        ids = []
        for row in rows:
            ids.append(row.id if row.id is not None else next_id)
            next_id = max(next_id, ids[-1] + 1)
        data = [self._entity(i, row, vec) for i, row, vec in zip(ids, rows, vectors)]
        for batch in _batches(data, INSERT_BATCH):
            self._client.insert(self.location.collection, list(batch))
        self._set_properties(next_id=str(next_id), generation=str(self.generation + 1))
        return ids

    def _entity(self, pid: int, row: PhotoRow, vector: np.ndarray) -> dict[str, Any]:
        entity: dict[str, Any] = {
            "id": int(pid),
            "path": row.path,
            "size": int(row.size),
            "mtime_ns": int(row.mtime_ns),
        }
        for name, (field, kind) in self._fields.items():
            if name in BUILTIN_COLUMNS:
                continue
            value = row.attributes.get(name)
            entity[field] = float(value) if kind == REAL and value is not None else value
        entity["vector"] = vector
        return entity

    def _ensure_columns(self, rows: Sequence[PhotoRow]) -> None:
        """Check the rows' attributes against the collection's columns; a new column is added when the Milvus
        server supports it (milvus-lite does not: then the message says what to do)."""
        names = list(dict.fromkeys(name for r in rows for name in r.attributes))
        new = {}
        for name in names:
            values = [r.attributes.get(name) for r in rows]
            kind = _kind_of(values, name)
            if name in BUILTIN_COLUMNS:
                raise DataError(f"attribute {name!r} has the name of a built-in column: rename it")
            if name in self._fields:
                have = self._fields[name][1]
                if have != kind and not (have == REAL and kind == INTEGER):
                    raise DataError(f"attribute {name!r} holds {kind} values but the store's column is {have}")
            elif any(v is not None for v in values):
                new[name] = kind
        if not new:
            return
        mapping = {n: list(v) for n, v in json.loads(self._props.get(_PROP + "columns", "{}")).items()}
        pymilvus = _pymilvus()
        for name, kind in new.items():
            field = f"a{len(mapping)}"
            try:

                def add(**kw: Any) -> None:
                    self._client.add_collection_field(self.location.collection, **kw)

                self._add_field(add, pymilvus, field, kind)
            except Exception as e:  # noqa: BLE001 - milvus-lite raises grpc's UNIMPLEMENTED, servers a MilvusException
                raise DataError(
                    f"the attribute column {name!r} is new to {self.location}, and this Milvus cannot add a field to "
                    f"a collection ({type(e).__name__}); index into a new collection (milvus:...#name) with all "
                    "attribute columns from the start"
                ) from None
            mapping[name] = [field, kind]
        self._set_properties(columns=json.dumps(mapping))
        self.refresh()

    def _live_paths(self, paths: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for batch in _batches(list(paths), LIST_BATCH):
            expr = f"path in [{', '.join(_text_literal(p) for p in batch)}]"
            found |= {
                r["path"] for r in self._client.query(self.location.collection, filter=expr, output_fields=["path"])
            }
        return found

    def remove(
        self, *, ids: Sequence[int] | None = None, paths: Sequence[str] | None = None, where: Filter | None = None
    ) -> int:
        parts = []
        for batch in _batches([int(i) for i in ids or []], LIST_BATCH):
            parts.append(f"id in [{', '.join(str(i) for i in batch)}]")
        for batch in _batches(list(paths or []), LIST_BATCH):
            parts.append(f"path in [{', '.join(_text_literal(p) for p in batch)}]")
        if where is not None:
            parts.append(self.compile(where))
        if not parts:
            return 0
        expr = " or ".join(f"({p})" for p in parts)
        n = self._count(expr)
        if n:
            self._client.delete(self.location.collection, filter=expr)
            self._client.flush(self.location.collection)  # durable before returning (the protocol's promise)
            self._set_properties(generation=str(self.generation + 1))
        return n

    def compact(self) -> CompactStats:
        """Milvus compacts by itself; this asks for it now (it drops deleted rows from the segments)."""
        before = self._count("")
        self._client.flush(self.location.collection)
        try:
            self._client.compact(self.location.collection)
        except Exception as e:  # noqa: BLE001 - some Milvus forms have no manual compaction: theirs runs anyway
            log.info("Milvus compaction request not taken (%s); Milvus compacts on its own schedule", e)
        self._set_properties(generation=str(self.generation + 1))
        return CompactStats(removed=0, live=before, generation=self.generation)

    # ------------------------------------------------------------------------------------------ search

    def search(
        self, queries: np.ndarray, k: int, where: Filter | None = None, knobs: SearchKnobs | None = None
    ) -> list[list[Hit]]:
        if k < 1:
            raise UsageError(f"top-k must be at least 1 (got {k})")
        if k > MAX_TOP_K:
            raise UsageError(f"top-k is at most {MAX_TOP_K} with the Milvus store (got {k})")
        q = np.asarray(queries, dtype=np.float32)
        q = np.ascontiguousarray(q[None] if q.ndim == 1 else q)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatchError(
                f"query vectors have shape {tuple(q.shape)} but the store holds {self.dim}-d vectors: the query was "
                "embedded by another model"
            )
        if len(q) == 0:
            return []
        knobs = knobs or SearchKnobs()
        params: dict[str, Any] = {}
        if knobs.nprobe is not None:
            params["nprobe"] = int(knobs.nprobe)
        if knobs.ef_search is not None:
            params["ef"] = max(int(knobs.ef_search), k)
        attrs = [(name, field) for name, (field, _) in self._fields.items() if name not in BUILTIN_COLUMNS]
        results = self._client.search(
            self.location.collection,
            data=list(q),
            limit=int(k),
            filter=self.compile(where) if where is not None else "",
            output_fields=["path"] + [field for _, field in attrs],
            search_params={"metric_type": "IP", "params": params},
        )
        return [
            [
                Hit(
                    id=int(r["id"]),
                    path=r["entity"]["path"],
                    score=float(r["distance"]),
                    attributes={name: r["entity"].get(field) for name, field in attrs},
                )
                for r in row
            ]
            for row in results
        ]

    def close(self) -> None:
        if self._client is None:
            return
        self._client.close()
        self._client = None
        if self.location.is_local:
            with self._local_lock:
                left = self._local_users.get(self.location.uri, 1) - 1
                self._local_users[self.location.uri] = left
            if left <= 0:
                self._local_users.pop(self.location.uri, None)
                _release_lite(self.location.uri)

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
