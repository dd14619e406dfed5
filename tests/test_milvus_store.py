"""The Milvus store (search/milvus_store.py) on a real milvus-lite file: the VectorStore contract, filters compiled
to Milvus expressions checked against filters.evaluate (SQL's three-valued logic) on the same rows, values that try
to break out of their quotes, deletions, incremental adds, the model check."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from finderpartner.errors import DataError, IndexMismatchError, UsageError  # noqa: E402
from finderpartner.search import PhotoRow, VectorStore  # noqa: E402
from finderpartner.search.filters import evaluate, parse  # noqa: E402
from finderpartner.search.milvus_store import MilvusStore, parse_location  # noqa: E402

DIM = 8
CITIES = ["Paris", "O'Hare", 'say "hi"', "back\\slash", "Zürich", "new\nline", None]
COLUMNS = {"city": "text", "age": "integer", "height": "real"}


def _rows(n: int, start: int = 0) -> tuple[list[PhotoRow], np.ndarray]:
    rng = np.random.default_rng(start)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [
        PhotoRow(
            path=f"img/{i:04d}.jpg",
            size=1000 + i,
            mtime_ns=i,
            attributes={
                "city": CITIES[i % len(CITIES)],
                "age": None if i % 5 == 0 else 20 + i % 30,
                "height": None if i % 4 == 0 else 1.5 + (i % 7) / 10,
            },
        )
        for i in range(start, start + n)
    ]
    return rows, vectors


@pytest.fixture()
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = MilvusStore.create(
        f"milvus:{tmp_path / 'photos.db'}", dim=DIM, fingerprint="f" * 64, model="m", columns=COLUMNS
    )
    rows, vectors = _rows(70)
    s.add(rows, vectors)
    yield s, rows, vectors
    s.close()


def test_it_is_a_vector_store_and_searches_exactly(store) -> None:  # type: ignore[no-untyped-def]
    s, rows, vectors = store
    assert isinstance(s, VectorStore)
    assert s.count() == 70 and s.dim == DIM
    assert s.columns() == {"id": "integer", "path": "text", "size": "integer", "mtime_ns": "integer", **COLUMNS}
    hits = s.search(vectors[:3], 5)
    expected = np.argsort(-(vectors[:3] @ vectors.T), axis=1)[:, :5]
    assert [[h.id for h in row] for row in hits] == expected.tolist()  # FLAT on milvus-lite: exact
    top = hits[0][0]
    assert top.path == rows[0].path and top.score == pytest.approx(1.0, abs=1e-5)
    assert top.attributes == {"city": "Paris", "age": None, "height": None}


FILTERS = [
    "city = 'Paris'",
    "city = 'O''Hare'",
    "city = 'say \"hi\"'",
    "city = 'back\\slash' or city = 'Zürich'",
    "city != 'Paris'",
    "not city = 'Paris'",
    "age > 30",
    "not (age > 30)",
    "age not in (25, 26, 40)",
    "not (age in (25, 26))",
    "age between 25 and 35 and height >= 1.8",
    "not (age between 25 and 35)",
    "age is null or city is null",
    "not (age is null) and not (height is not null)",
    "height < 1.65 or (city in ('Paris', 'O''Hare') and not age <= 40)",
    "id in (1, 2, 3) or path = 'img/0010.jpg'",
    "size >= 1060 and mtime_ns < 65",
    "city = 'x\" or id >= 0 or city = \"y'",  # a value that would break out of a badly escaped literal
]


@pytest.mark.parametrize("text", FILTERS)
def test_filters_match_sql_three_valued_logic(store, text: str) -> None:  # type: ignore[no-untyped-def]
    s, rows, vectors = store
    expr = parse(text, s.columns())
    expected = sorted(
        i
        for i, r in enumerate(rows)
        if evaluate(expr, {"id": i, "path": r.path, "size": r.size, "mtime_ns": r.mtime_ns, **r.attributes}) is True
    )
    found = s.search(vectors[:1], 70, expr)[0]
    assert sorted(h.id for h in found) == expected, s.compile(expr)


def test_newline_value_matches_and_control_characters_are_refused(store) -> None:  # type: ignore[no-untyped-def]
    s, _, vectors = store
    found = s.search(vectors[:1], 70, parse("city = 'new\nline'", s.columns()))[0]
    assert found and all(h.attributes["city"] == "new\nline" for h in found)
    with pytest.raises(UsageError, match="control character"):
        s.search(vectors[:1], 5, parse("city = 'a\x01b'", s.columns()))


def test_removals_by_ids_paths_and_filter_and_incremental_adds(store) -> None:  # type: ignore[no-untyped-def]
    s, rows, vectors = store
    assert s.remove(ids=[0, 1], paths=["img/0002.jpg", "img/0001.jpg"]) == 3
    assert s.remove(where=parse("city = 'Paris'", s.columns())) == 9  # rows 7, 14, ... (row 0 already gone)
    assert s.remove(ids=[0]) == 0  # already removed: nothing
    assert s.count() == 70 - 12
    gone = {0, 1, 2} | {i for i in range(70) if i % 7 == 0}
    hits = s.search(vectors, 70)
    assert all(h.id not in gone for row in hits for h in row)
    more, more_vectors = _rows(10, start=70)
    ids = s.add(more, more_vectors)
    assert ids == list(range(70, 80)) and s.count() == 68
    assert s.search(more_vectors[:1], 1)[0][0].id == 70
    with pytest.raises(DataError, match="already in"):
        s.add(more[:1], more_vectors[:1])
    s.add([PhotoRow(path="img/0001.jpg")], vectors[1:2])  # a removed path may come back (a changed file)
    assert s.search(vectors[1:2], 1)[0][0].path == "img/0001.jpg"
    stats = s.compact()
    assert stats.live == 69 and s.count() == 69


def test_reopened_store_keeps_everything_and_refuses_another_model(tmp_path: Path) -> None:
    loc = f"milvus:{tmp_path / 'photos.db'}#mine"
    with MilvusStore.create(loc, dim=DIM, fingerprint="a" * 64, columns={"city": "text"}) as s:
        rows, vectors = _rows(5)
        s.add([PhotoRow(r.path, attributes={"city": r.attributes["city"]}) for r in rows], vectors)
        generation = s.generation
    with MilvusStore.open(loc, fingerprint="a" * 64) as s:
        assert s.count() == 5 and s.generation == generation and s.columns()["city"] == "text"
        assert s.add(*_one(99)) == [5]  # ids continue after a reopen
    with pytest.raises(IndexMismatchError, match="another model"):
        MilvusStore.open(loc, fingerprint="b" * 64)
    with pytest.raises(IndexMismatchError, match="another model"):
        MilvusStore.create(loc, dim=DIM, fingerprint="b" * 64)
    with pytest.raises(DataError, match="holds no store"):
        MilvusStore.open(f"milvus:{tmp_path / 'photos.db'}#other")


def _one(seed: int) -> tuple[list[PhotoRow], np.ndarray]:
    rows, vectors = _rows(1, start=seed)
    return [PhotoRow(rows[0].path)], vectors


def test_bad_inputs_are_refused_with_what_to_do(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s, _, vectors = store
    with pytest.raises(IndexMismatchError, match="8-d"):
        s.search(np.ones((1, 4), np.float32), 3)
    with pytest.raises(UsageError, match="at most"):
        s.search(vectors[:1], 100_000)
    with pytest.raises(DataError, match="new to"):  # milvus-lite cannot add a field to a collection
        s.add([PhotoRow("img/new.jpg", attributes={"team": "red"})], vectors[:1])
    with pytest.raises(DataError, match="holds integer values but the store's column is text"):
        s.add([PhotoRow("img/new.jpg", attributes={"city": 3})], vectors[:1])
    with pytest.raises(DataError, match="NaN"):
        s.add([PhotoRow("img/new.jpg")], np.full((1, DIM), np.nan, np.float32))
    assert s.count() == 70  # nothing was added by any of these
    with pytest.raises(UsageError, match=r"\.db"):
        parse_location(f"milvus:{tmp_path / 'photos'}")
    with pytest.raises(UsageError, match="collection names"):
        parse_location("milvus:x.db#no-dashes")


@pytest.mark.slow  # starts a process
def test_a_second_process_gets_a_clear_message(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    s, _, _ = store
    code = (
        "from finderpartner.search.milvus_store import MilvusStore\n"
        "from finderpartner.errors import FinderPartnerError\n"
        f"try:\n    MilvusStore.open({str(s.location)!r})\n"
        "except FinderPartnerError as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "DataError" in out.stdout and "one process" in out.stdout, out.stdout + out.stderr


def test_compiled_expressions_never_contain_raw_values() -> None:
    from finderpartner.search.milvus_store import FilterCompiler

    compiler = FilterCompiler({"city": ("a0", "text"), "age": ("a1", "integer")})
    for quote, tail in itertools.product(["'", '"', "\\"], [" or id >= 0", "] or [1"]):
        value = f"x{quote}{tail}"
        expr = parse(f"city = '{value.replace(chr(39), chr(39) * 2)}'", {"city": "text", "age": "integer"})
        out = compiler.compile(expr)
        assert out.count('"') - out.count('\\"') == 2, out  # exactly one string literal, its quotes escaped


def test_live_stamps_and_locations_given_as_paths(store) -> None:  # type: ignore[no-untyped-def]
    s, rows, _ = store
    stamps = s.live_stamps()
    assert len(stamps) == 70 and stamps["img/0003.jpg"] == (3, rows[3].size, rows[3].mtime_ns)
    assert parse_location(Path("milvus:http://host:19530#gallery")).uri == "http://host:19530"  # '//' kept
    assert parse_location("milvus:https://x.example.com:443").collection == "photos"
