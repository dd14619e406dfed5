"""`finderpartner index` into a photo store and `search --index` on it, end to end with a real micro model:
attributes and --where, appending without rewriting, removal and compaction through the CLI, a malformed
filter, the earlier index format refused, a run stopped (SIGTERM) or killed (SIGKILL) and resumed ending with
the store of an uninterrupted run, and two gloo processes (torchrun) equal to one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import launcher_env, run_torchrun
from PIL import Image

from finderpartner.cli import main
from finderpartner.search.faiss_store import FaissStore

pytest.importorskip("faiss")
pytestmark = pytest.mark.slow  # trains a model and starts processes (the fast subset: pytest -m 'not slow')
FAST = ["--workers", "0", "--batch-size", "8"]


def _gallery(src: Path, out: Path, n: int) -> Path:
    """``n`` distinct real images: the sample images, resized and rotated."""
    images = sorted((src / "images" / "val").glob("*.jpg"))
    out.mkdir(parents=True)
    for i in range(n):
        im = Image.open(images[i % len(images)]).convert("RGB")
        im = im.rotate(90 * ((i // len(images)) % 4)).resize((40 + i % 17, 40 + i % 13))
        im.save(out / f"img{i:04d}.jpg", quality=90)
    return out


def _attributes(gallery: Path) -> Path:
    csv = gallery.parent / "people.csv"
    lines = ["filename,city,age"] + [
        f"{p.name},{['Paris', 'Lyon', 'Nice'][i % 3]},{20 + i % 30}" for i, p in enumerate(sorted(gallery.iterdir()))
    ]
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _contents(store: Path) -> dict[str, tuple[int, np.ndarray]]:
    """path -> (id, vector) of every live photo."""
    s = FaissStore.open(store)
    try:
        live = s.meta.live_stamps()
        ids = np.array(sorted(i for i, _, _ in live.values()), np.int64)
        vectors = s._vectors_of(ids)
        by_id = dict(zip(ids.tolist(), vectors))
        return {p: (i, by_id[i]) for p, (i, _, _) in live.items()}
    finally:
        s.close()


def test_index_search_where_append_remove_compact(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gallery = _gallery(small_data, tmp_path / "g", 30)
    people = _attributes(gallery)
    store = tmp_path / "store"
    base = ["--model", str(trained_model), *FAST]
    assert main(["index", *base, "--images", str(gallery), "--attributes", str(people), "--out", str(store)]) == 0
    assert "30 images (30 new, 0 changed, 0 removed, 0 unchanged) (base index built)" in capsys.readouterr().out
    search = ["search", *base, "--index", str(store), "--prompt", "a red circle", "--json"]
    assert main([*search, "-k", "50", "--where", "city = 'Paris' and age between 25 and 40"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    names = sorted(Path(r["path"]).name for r in results)
    expected = sorted(p.name for i, p in enumerate(sorted(gallery.iterdir())) if i % 3 == 0 and 25 <= 20 + i % 30 <= 40)
    assert names == expected and all(r["city"] == "Paris" for r in results)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)

    # appending: one new photo, one new segment, nothing rewritten
    files = {p: p.stat().st_mtime_ns for p in [*store.glob("segments/*"), *store.glob("ann/*")]}
    shutil.copy(gallery / "img0000.jpg", gallery / "new.jpg")
    assert main(["index", *base, "--images", str(gallery), "--out", str(store)]) == 0
    assert "31 images (1 new, 0 changed, 0 removed, 30 unchanged)" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in [*store.glob("segments/*"), *store.glob("ann/*")]}
    assert {p: after[p] for p in files} == files and len(after) == len(files) + 2

    # a malformed filter: exit 2, a message naming the position and the columns, nothing removed
    before = _contents(store)
    assert main(["index", "remove", "--out", str(store), "--where", "city = Paris"]) == 2
    err = capsys.readouterr().err
    assert "at position 8" in err and "known columns: id (integer), path (text)" in err and "city (text)" in err
    assert _contents(store).keys() == before.keys()
    assert main([*search, "--where", "town = 'Paris'"]) == 2
    assert "unknown column 'town'" in capsys.readouterr().err

    # removal: gone from every search at once; compaction drops it from disk
    assert (
        main(["index", "remove", "--out", str(store), "--where", "city = 'Paris'", "--path", str(gallery / "new.jpg")])
        == 0
    )
    assert "removed 11 photo(s)" in capsys.readouterr().out
    assert main([*search, "-k", "50"]) == 0
    left = json.loads(capsys.readouterr().out)["results"]
    assert len(left) == 20 and not any(r.get("city") == "Paris" or r["path"].endswith("new.jpg") for r in left)
    assert main(["index", "compact", "--out", str(store)]) == 0
    assert "20 photos, 11 removed photo(s) dropped, base index Flat" in capsys.readouterr().out
    assert main([*search, "-k", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == left
    # a selection that matches nothing says what it looked for (was a silent "removed 0")
    assert main(["index", "remove", "--out", str(store), "--path", str(gallery / "new.jpg"), "--id", "999"]) == 0
    err = capsys.readouterr().err
    assert f"no live photo matched path {gallery / 'new.jpg'}, id 999: nothing was removed" in err


def test_an_index_of_the_earlier_format_is_refused_by_search_and_index(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"format": 1, "root": str(tmp_path / "g"), "files": []}))
    (old / "index.faiss").write_bytes(b"\0")
    base = ["--model", str(trained_model), *FAST]
    assert main(["search", *base, "--index", str(old), "--prompt", "a red circle"]) == 4
    assert "earlier version" in capsys.readouterr().err
    gallery = _gallery(small_data, tmp_path / "g", 4)
    assert main(["index", *base, "--images", str(gallery), "--out", str(old)]) == 4
    assert f"finderpartner index --model <model> --images {tmp_path / 'g'}" in capsys.readouterr().err
    assert main(["index", *base, "--images", str(gallery), "--out", str(old), "--overwrite"]) == 0
    assert sorted(p.name for p in old.iterdir() if not p.name.startswith(".")) == [
        "ann",
        "manifest.json",
        "meta.sqlite",
        "segments",
    ]


def _index_cmd(model: Path, gallery: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "finderpartner.cli",
        "index",
        "--model",
        str(model),
        "--images",
        str(gallery),
        "--out",
        str(out),
        "--workers",
        "0",
        "--batch-size",
        "4",
    ]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_stopped_halfway_and_resumed_equals_an_uninterrupted_one(
    trained_model: Path, small_data: Path, tmp_path: Path, how: signal.Signals
) -> None:
    gallery = _gallery(small_data, tmp_path / "g", 240)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    env = launcher_env()
    assert subprocess.run(_index_cmd(trained_model, gallery, whole), env=env, capture_output=True).returncode == 0
    child = subprocess.Popen(
        _index_cmd(trained_model, gallery, resumed),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    parts = resumed / "parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.npz")) if parts.is_dir() else []) < 3:  # 3 of 8 chunks of 32 images
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(how)
    _, err = child.communicate(timeout=120)
    if how == signal.SIGTERM:
        assert child.returncode == 12, err  # Stopped: the chunk in progress saved, then exit 12
        assert "running the same command again embeds only the other" in err
    else:
        assert child.returncode == -signal.SIGKILL
    kept = len(list(parts.glob("part-*.npz")))
    assert 3 <= kept < 8
    done = subprocess.run(_index_cmd(trained_model, gallery, resumed), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{kept * 32} from an interrupted run's parts" in done.stdout  # nothing embedded twice
    assert not parts.exists()
    a, b = _contents(whole), _contents(resumed)
    assert a.keys() == b.keys() and len(a) == 240
    assert {p: i for p, (i, _) in a.items()} == {p: i for p, (i, _) in b.items()}  # the same ids
    for p in a:
        np.testing.assert_allclose(a[p][1], b[p][1], rtol=0, atol=1e-6)  # the same vectors


def test_two_gloo_processes_index_what_one_does(trained_model: Path, small_data: Path, tmp_path: Path) -> None:
    gallery = _gallery(small_data, tmp_path / "g", 64)
    one, two = tmp_path / "one", tmp_path / "two"
    env = launcher_env()
    r = subprocess.run(_index_cmd(trained_model, gallery, one), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = run_torchrun("-m", "finderpartner.cli", *_index_cmd(trained_model, gallery, two)[3:], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "64 images (64 new" in r.stdout and [ln.startswith("index ") for ln in r.stdout.splitlines()] == [True]
    a, b = _contents(one), _contents(two)
    assert {p: i for p, (i, _) in a.items()} == {p: i for p, (i, _) in b.items()}
    for p in a:
        np.testing.assert_allclose(a[p][1], b[p][1], rtol=0, atol=1e-6)
    assert os.listdir(two / "segments")
