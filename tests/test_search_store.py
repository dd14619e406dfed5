"""The FAISS photo store with the real components (SQLite, FAISS, real processes killed with SIGKILL): filtered
search is the top-k of the subset (vs brute force), removals are honoured at once and survive a crash before
compaction, adding never rewrites the index, one writer at a time, the output rule, the old format refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import launcher_env

from finderpartner.errors import DataError, IndexMismatchError, OutputError
from finderpartner.search import ann
from finderpartner.search.faiss_store import FaissStore
from finderpartner.search.filters import FilterError, evaluate, parse
from finderpartner.search.store import PhotoRow, SearchKnobs, VectorStore

DIM = 24
CITIES = ["Paris", "Lyon", "Nice", None]


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _rows(start: int, n: int) -> list[PhotoRow]:
    return [
        PhotoRow(f"/g/{i:05d}.jpg", 100 + i, 7, {"city": CITIES[i % 4], "age": None if i % 11 == 0 else 18 + i % 50})
        for i in range(start, start + n)
    ]


def _store(path: Path, n_base: int = 600, n_new: int = 200, factory: str | None = "IVF8,Flat") -> FaissStore:
    """A store with a base index over ``n_base`` rows (IVF8,Flat: exact scores, so that any difference from brute
    force is the store's selection logic) and ``n_new`` rows appended after it."""
    store = FaissStore.create(path, dim=DIM, fingerprint="fp", options={"factory": factory} if factory else None)
    store.add(_rows(0, n_base), _vectors(n_base, 0))
    store.compact()
    if n_new:
        store.add(_rows(n_base, n_new), _vectors(n_new, 1))
    return store


def _brute(store: FaissStore, vectors: np.ndarray, q: np.ndarray, k: int, where: str | None) -> list[list[int]]:
    """Top-k ids over the live rows matching ``where``, from the vectors and the rows as added."""
    rows = _rows(0, len(vectors))
    live = set(store.meta.select_ids(None).tolist())
    expr = parse(where, store.columns()) if where else None
    keep = [
        i
        for i, r in enumerate(rows)
        if i in live
        and (expr is None or evaluate(expr, {"id": i, "path": r.path, "size": r.size, "mtime_ns": 7, **r.attributes}))
    ]
    scores = q @ vectors[keep].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[keep[j] for j in row] for row in order]


WHERES = [
    None,
    "city = 'Paris'",
    "city = 'Paris' and age between 25 and 35",
    "not city = 'Lyon' or age is null",
    "age in (18, 19, 20) and city is not null",
    "id >= 590 and id < 610",  # across the base and the appended segment
    "city = 'Atlantis'",  # matches nothing
]


@pytest.mark.parametrize("exact_below", [0, 10**9], ids=["index+selector", "exact-over-subset"])
@pytest.mark.parametrize("where", WHERES)
def test_filtered_search_is_the_top_k_of_the_subset(tmp_path: Path, where: str | None, exact_below: int) -> None:
    store = _store(tmp_path / "s")
    assert isinstance(store, VectorStore)
    store.remove(ids=[3, 4, 601], paths=["/g/00010.jpg"])  # tombstones in the base and in the new segment
    vectors = np.concatenate([_vectors(600, 0), _vectors(200, 1)])
    q = _vectors(6, 9)
    knobs = SearchKnobs(nprobe=8, exact_below=exact_below)  # nprobe = nlist: the IVF part is exhaustive
    expr = parse(where, store.columns()) if where else None
    got = store.search(q, 10, expr, knobs)
    expected = _brute(store, vectors, q, 10, where)
    assert [[h.id for h in row] for row in got] == expected
    for row in got:
        for h in row:
            assert h.path == f"/g/{h.id:05d}.jpg" and h.attributes["city"] == CITIES[h.id % 4]
            assert h.id not in (3, 4, 10, 601)
    store.close()


def test_a_filtered_ivf_search_with_the_default_nprobe_keeps_its_recall(tmp_path: Path) -> None:
    """With nprobe tuned for the whole store, a filter keeping 1/4 of the rows visits 4x the lists: its results
    are still (nearly) the subset's exact top-k."""
    store = _store(tmp_path / "s", n_base=2000, n_new=0, factory="IVF32,Flat")
    store.manifest["base"]["info"]["nprobe"] = 4
    ann.faiss_module().extract_index_ivf(store._base).nprobe = 4
    vectors = _vectors(2000, 0)
    q = _vectors(20, 5)
    got = store.search(q, 10, parse("city = 'Nice'", store.columns()), SearchKnobs(exact_below=0))
    expected = _brute(store, vectors, q, 10, "city = 'Nice'")
    hits = sum(len({h.id for h in g} & set(e)) for g, e in zip(got, expected))
    assert hits / 200 >= 0.9
    unfiltered = store.search(q, 10, None, SearchKnobs(nprobe=1))
    assert sum(len({h.id for h in g} & set(e)) for g, e in zip(unfiltered, _brute(store, vectors, q, 10, None))) < 200


def test_removed_photos_are_never_returned_and_compaction_drops_them(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    n = store.remove(ids=[0, 1], paths=["/g/00700.jpg", "/g/99999.jpg"], where=parse("age = 30", store.columns()))
    expected_removed = {0, 1, 700} | {i for i in range(800) if i % 11 and 18 + i % 50 == 30}
    assert n == len(expected_removed)
    assert store.remove(ids=[0]) == 0  # already removed
    everything = {h.id for h in store.search(_vectors(1, 3), 800)[0]}
    assert everything == set(range(800)) - expected_removed and store.count() == 800 - n
    stats = store.compact()
    assert stats.removed == n and stats.live == 800 - n
    seg = store.manifest["segments"]
    assert len(seg) == 1
    kept = set(np.load(tmp_path / "s" / "segments" / f"seg-{seg[0]:06d}.ids.npy").tolist())
    assert kept == everything
    assert store.meta.db.execute("SELECT count(*) FROM photos").fetchone()[0] == 800 - n
    assert {h.id for h in store.search(_vectors(1, 3), 800)[0]} == everything
    assert (
        len(list((tmp_path / "s" / "segments").iterdir())) == 2 and len(list((tmp_path / "s" / "ann").iterdir())) == 1
    )
    # the removed path may come back as a new photo, under a new id (ids are never reused)
    (new_id,) = store.add([PhotoRow("/g/00700.jpg")], _vectors(1, 4))
    assert new_id == 800
    store.close()


def test_a_reader_honours_the_writers_tombstones_and_appends_at_once(tmp_path: Path) -> None:
    writer = _store(tmp_path / "s")
    reader = FaissStore.open(tmp_path / "s")
    q = _vectors(1, 0)[:1] * 0 + _vectors(600, 0)[5]  # photo 5 is its own best match
    assert reader.search(q, 1)[0][0].id == 5
    writer.remove(ids=[5])
    assert reader.search(q, 1)[0][0].id != 5
    writer.add([PhotoRow("/new.jpg")], q)
    assert reader.search(q, 1)[0][0].path == "/new.jpg"
    reader.close()
    writer.close()


def test_adding_appends_a_segment_and_rewrites_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", n_new=0)
    folder = tmp_path / "s"
    before = {p: p.stat().st_mtime_ns for p in [*folder.glob("segments/*"), *folder.glob("ann/*")]}
    for i in range(3):
        store.add(_rows(600 + 10 * i, 10), _vectors(10, 20 + i))
    after = {p: p.stat().st_mtime_ns for p in [*folder.glob("segments/*"), *folder.glob("ann/*")]}
    assert {p: after[p] for p in before} == before  # the base index and the old segment untouched
    assert len(after) == len(before) + 6  # three segments of two files each
    assert store.describe()["segments_after_base"] == 3 and store.count() == 630
    store.close()


def test_one_writer_at_a_time_and_the_output_rule(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", n_new=0)
    with pytest.raises(OutputError, match="in use by PID"):
        FaissStore.open(tmp_path / "s", writable=True)
    store.close()
    with pytest.raises(IndexMismatchError, match="--overwrite"):
        FaissStore.create(tmp_path / "s", dim=DIM + 1, fingerprint="other")
    (tmp_path / "s" / "notes.txt").write_text("mine")
    replaced = FaissStore.create(tmp_path / "s", dim=DIM + 1, fingerprint="other", overwrite=True)
    assert replaced.count() == 0 and (tmp_path / "s" / "notes.txt").read_text() == "mine"
    assert not list((tmp_path / "s" / "segments").iterdir())
    replaced.close()
    user = tmp_path / "user"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(OutputError, match="did not write"):
        FaissStore.create(user, dim=DIM, fingerprint="fp")
    assert os.listdir(user) == ["holiday.jpg"]


def test_an_index_of_the_earlier_format_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"format": 1, "root": "/photos", "files": []}))
    (old / "index.faiss").write_bytes(b"\0")
    for call in (lambda: FaissStore.open(old), lambda: FaissStore.create(old, dim=DIM, fingerprint="fp")):
        with pytest.raises(DataError, match="earlier version") as caught:
            call()
        assert "finderpartner index --model <model> --images /photos" in str(caught.value)
    assert sorted(os.listdir(old)) == ["index.faiss", "index.json"]


def test_a_malformed_filter_changes_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    before = (tmp_path / "s" / "meta.sqlite").read_bytes(), store.count()
    with pytest.raises(FilterError, match="unknown column 'town'"):
        store.remove(where=parse("town = 'Paris'", store.columns()))
    assert store.count() == before[1]
    store.close()


def test_choose_factory_follows_the_memory_budget() -> None:
    assert ann.choose_factory(10_000, 512) == "Flat"
    assert ann.choose_factory(1_000_000, 512) == "IVF4096,SQ4"  # SQ8 + id = 520 B > 512 B (1/4 of 2048)
    assert ann.choose_factory(1_000_000, 512, memory_fraction=0.5) == "IVF4096,SQ8"
    assert ann.choose_factory(1_000_000, 512, memory_fraction=0.1) == "IVF4096,PQ128"
    factory = ann.choose_factory(1_000_000, 512)
    nbytes = ann.code_bytes(factory.split(",")[1], 512) + ann.ID_BYTES
    assert nbytes <= 0.25 * 512 * 4


def test_compaction_stores_the_recall_it_measured(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", n_base=3000, n_new=0, factory="IVF16,SQ8")
    info = json.loads((tmp_path / "s" / "manifest.json").read_text())["base"]["info"]
    assert info["factory"] == "IVF16,SQ8" and info["recall_at_10"] >= 0.95 and info["nprobe"] >= 1
    assert info["bytes"] > 0 and str(info["nprobe"]) in info["recall_by_nprobe"]
    store.close()


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import numpy as np
    from finderpartner.search import faiss_store
    from finderpartner.search.store import PhotoRow
    path, action, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def crash(step):
        if step == point:
            os.kill(os.getpid(), signal.SIGKILL)

    faiss_store._crash_point = crash
    store = faiss_store.FaissStore.open(path, writable=True)
    store.remove(paths=["/g/00005.jpg"])
    if action == "remove":
        print("removed", flush=True)
        time.sleep(60)
    elif action == "compact":
        store.compact()
    elif action == "add":
        v = np.random.default_rng(7).standard_normal((3, int(sys.argv[4]))).astype(np.float32)
        store.add([PhotoRow(f"/late/{i}.jpg") for i in range(3)], v)
    print("done", flush=True)
    """
)


@pytest.mark.slow  # five real processes
@pytest.mark.parametrize(
    ("action", "point"),
    [
        ("remove", "-"),  # killed between the removal and any compaction
        ("compact", "compaction-written"),  # killed with the new files written, before the swap
        ("compact", "compaction-swapped"),  # killed after the swap, before the old files and rows are gone
        ("add", "segment-written"),  # an add killed before its commit: rolled back
        ("add", "rows-committed"),  # an add killed after its commit: finished
    ],
)
def test_a_removed_photo_never_comes_back_after_a_kill(tmp_path: Path, action: str, point: str) -> None:
    store = _store(tmp_path / "s", n_new=50)
    q = _vectors(600, 0)[5][None]  # photo 5 is its own best match
    assert store.search(q, 1)[0][0].id == 5
    store.close()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "s"), action, point, str(DIM)],
        env=launcher_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    if action == "remove":
        assert child.stdout is not None and child.stdout.readline().strip() == "removed"
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    for _ in range(2):  # reopened as a reader and as a writer (which finishes or rolls back the killed step)
        for writable in (False, True):
            store = FaissStore.open(tmp_path / "s", writable=writable)
            ids = {h.id for h in store.search(q, 700)[0]}
            assert 5 not in ids and len(ids) == 649 + (3 if point == "rows-committed" else 0)
            assert store.search(q, 1)[0][0].id != 5
            store.close()
    store = FaissStore.open(tmp_path / "s", writable=True)
    assert not store.manifest["pending"] and not store.manifest["obsolete"]
    on_disk = {f"segments/{p.name}" for p in (tmp_path / "s" / "segments").iterdir()} | {
        f"ann/{p.name}" for p in (tmp_path / "s" / "ann").iterdir()
    }
    listed = {f"segments/seg-{n:06d}.{e}.npy" for n in store.manifest["segments"] for e in ("vec", "ids")}
    assert on_disk == listed | {store.manifest["base"]["file"]}  # no file left behind, none missing
    store.compact()
    assert 5 not in {h.id for h in store.search(q, 700)[0]}
    store.close()


def test_a_reader_that_read_the_manifest_a_compaction_replaced_loads_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race `serve` lost under load: a reader reads the manifest, a writer's compaction commits and deletes the
    # segments it merged, the reader opens one of them. It must read the new manifest and answer from it.
    from finderpartner.search import faiss_store

    writer = _store(tmp_path / "s", n_base=300, n_new=100)
    reader = FaissStore.open(tmp_path / "s")
    stale = json.loads((tmp_path / "s" / "manifest.json").read_text())
    writer.compact()  # merges the segments into a new one and deletes the old files
    assert not all((tmp_path / "s" / faiss_store.segment_files(n)[0]).exists() for n in stale["segments"])
    real, calls = faiss_store._read_manifest, []

    def read_stale_first(path: Path) -> dict:
        calls.append(path)
        return stale if len(calls) == 1 else real(path)

    monkeypatch.setattr(faiss_store, "_read_manifest", read_stale_first)
    reader.refresh()
    assert len(calls) == 2 and reader.manifest["generation"] == writer.manifest["generation"]
    q = _vectors(3, 9)
    assert [[h.id for h in hits] for hits in reader.search(q, 5)] == [
        [h.id for h in hits] for hits in writer.search(q, 5)
    ]
    writer.close()
    reader.close()
