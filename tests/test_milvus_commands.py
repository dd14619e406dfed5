"""The Milvus store (milvus-lite) behind the same commands as the FAISS store: `finderpartner index` (incremental
adds, photos gone from the folder removed, `index remove --where`), `search --where`, and `serve`, each a real
process; a store of another model and a malformed filter are refused."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import launcher_env

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow  # trains a model and starts processes (the fast subset: pytest -m 'not slow')


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finderpartner.cli", *args],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _colors(small_data: Path) -> dict[str, str]:
    colors: dict[str, str] = {}
    with open(small_data / "captions_val.csv", newline="") as f:
        for row in csv.DictReader(f):
            colors.setdefault(row["filename"], row["caption"].split()[2])
    return colors


def _search(model: Path, store: str, *extra: str) -> list[dict]:
    out = _cli("search", "--model", str(model), "--index", store, "--prompt", "a red circle", "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["results"]


def test_index_search_and_serve_on_milvus_lite(trained_model: Path, small_data: Path, tmp_path: Path) -> None:
    from test_serve import Server

    val = sorted((small_data / "images" / "val").iterdir())
    gallery = tmp_path / "photos"
    gallery.mkdir()
    for p in val[:12]:
        shutil.copy2(p, gallery / p.name)
    colors = _colors(small_data)
    attributes = tmp_path / "people.csv"
    with open(attributes, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "color", "number"])
        for p in val:
            w.writerow([p.name, colors[p.name], int(p.stem)])
    store = f"milvus:{tmp_path / 'photos.db'}"
    index = ["index", "--model", str(trained_model), "--images", str(gallery), "--attributes", str(attributes)]

    out = _cli(*index, "--out", store)
    assert out.returncode == 0, out.stderr
    assert "12 images (12 new, 0 changed, 0 removed, 0 unchanged)" in out.stdout
    out = _cli(*index, "--out", store)  # nothing changed: nothing embedded
    assert out.returncode == 0 and "(0 new, 0 changed, 0 removed, 12 unchanged)" in out.stdout, out.stdout
    for p in val[12:16]:  # incremental adds, and two photos gone from the folder
        shutil.copy2(p, gallery / p.name)
    (gallery / val[0].name).unlink()
    (gallery / val[1].name).unlink()
    out = _cli(*index, "--out", store)
    assert out.returncode == 0 and "14 images (4 new, 0 changed, 2 removed, 10 unchanged)" in out.stdout, out.stdout

    everything = _search(trained_model, store, "--top-k", "50")
    assert sorted(Path(r["path"]).name for r in everything) == sorted(p.name for p in val[2:16])
    red = _search(trained_model, store, "--top-k", "50", "--where", "color = 'red' and number >= 3")
    expected = sorted(p.name for p in val[2:16] if colors[p.name] == "red" and int(p.stem) >= 3)
    assert expected and sorted(Path(r["path"]).name for r in red) == expected
    assert all(r["color"] == "red" for r in red)

    out = _cli("index", "remove", "--out", store, "--where", "number < 6")
    assert out.returncode == 0 and "removed 4 photo(s)" in out.stdout, out.stdout + out.stderr
    left = _search(trained_model, store, "--top-k", "50")
    assert sorted(Path(r["path"]).name for r in left) == sorted(p.name for p in val[6:16])

    bad = _cli("search", "--model", str(trained_model), "--index", store, "--prompt", "x", "--where", "color = ")
    assert bad.returncode == 2 and "position" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr

    server = Server(trained_model, store)
    try:
        r = server.client.post("/search", json={"text": "a red circle", "k": 50, "where": "color = 'red'"})
        assert r.status_code == 200, r.text
        assert sorted(Path(h["path"]).name for h in r.json()["hits"]) == sorted(
            p.name for p in val[6:16] if colors[p.name] == "red"
        )
        assert server.client.get("/healthz").json()["count"] == 10
        busy = _cli(*index, "--out", store)  # milvus-lite: one process per file, said so
        assert busy.returncode == 10 and "one process" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        code, err = server.stop()
    assert code == 130 and "Traceback" not in err, err


def test_a_store_of_another_model_is_refused(trained_model: Path, small_data: Path, tmp_path: Path) -> None:
    from finderpartner.search.milvus_store import MilvusStore

    store = f"milvus:{tmp_path / 'other.db'}"
    MilvusStore.create(store, dim=32, fingerprint="0" * 64, model="another").close()
    images = small_data / "images" / "val"
    out = _cli("index", "--model", str(trained_model), "--images", str(images), "--out", store)
    assert out.returncode == 8 and "another model" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = _cli("search", "--model", str(trained_model), "--index", store, "--prompt", "x")
    assert out.returncode == 8 and "another model" in out.stderr, out.stderr
