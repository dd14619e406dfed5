"""Gallery index: incremental updates embed only what changed, search is exact, other models' indexes are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MICRO_SPEC

from finderpartner.cli import main
from finderpartner.config import TinySpec
from finderpartner.data.files import FileStamp, scan_images
from finderpartner.embedding import Searcher, model_fingerprint
from finderpartner.errors import DataError, OutputError
from finderpartner.index import (
    GalleryIndex,
    IndexMismatchError,
    cached_gallery,
    index_folder,
    update_index,
)
from finderpartner.interop.onnx_runtime import OnnxSearcher
from finderpartner.model import build_tiny, load_model, save_model

pytest.importorskip("faiss")
CPU = torch.device("cpu")
PROMPTS = ["a large red circle on the left", "small blue star, center", "a small green square on the right side"]


@pytest.fixture(scope="module")
def searcher(trained_model: Path) -> Searcher:
    return Searcher(load_model(trained_model), device=CPU, precision="fp32", batch_size=8)


@pytest.fixture(scope="module")
def val_images(small_data: Path) -> list[Path]:
    return sorted((small_data / "images" / "val").glob("*.jpg"))


@pytest.fixture
def gallery(tmp_path: Path, val_images: list[Path]) -> Path:
    """Six real images, one of them in a subfolder."""
    root = tmp_path / "gallery"
    (root / "sub").mkdir(parents=True)
    for i, src in enumerate(val_images[:6]):
        shutil.copy(src, root / ("sub" if i == 5 else "") / src.name)
    return root


class CountingEmbed:
    """The real embedding function, recording every file it is asked to embed."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        self.paths: list[Path] = []

    def __call__(self, paths):  # type: ignore[no-untyped-def]
        self.paths += list(paths)
        return self.searcher.embed_paths(paths)


def _touch_later(path: Path, seconds: int = 5) -> None:
    """Make the modification visible even on file systems with coarse timestamps."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_incremental_update_embeds_only_new_and_changed_files(
    searcher, gallery: Path, val_images, tmp_path: Path
) -> None:
    embed = CountingEmbed(searcher)
    index, stats = update_index(None, gallery, searcher.fingerprint, embed)
    assert len(embed.paths) == 6 and (stats.added, len(index)) == (6, 6)
    index.save(tmp_path / "idx")
    index = GalleryIndex.load(tmp_path / "idx")  # the update starts from what was stored
    before = dict(zip(index.files, index.vectors))

    shutil.copy(val_images[6], gallery / "new_a.jpg")  # 2 added
    shutil.copy(val_images[7], gallery / "sub" / "new_b.jpg")
    changed = gallery / val_images[2].name  # 1 modified: another picture under the same name
    shutil.copy(val_images[10], changed)
    _touch_later(changed)
    (gallery / val_images[3].name).unlink()  # 1 removed
    embed.paths.clear()
    updated, stats = update_index(index, gallery, searcher.fingerprint, embed)

    assert sorted(p.relative_to(gallery).as_posix() for p in embed.paths) == sorted(
        ["new_a.jpg", "sub/new_b.jpg", changed.name]
    )
    assert (stats.added, stats.changed, stats.removed, stats.unchanged) == (2, 1, 1, 4)
    assert sorted(updated.files) == sorted(scan_images(gallery)) and len(updated) == 7
    vectors = dict(zip(updated.files, updated.vectors))
    for name in set(before) - {changed.name, val_images[3].name}:
        assert np.array_equal(vectors[name], before[name]), name  # kept, not recomputed
    fresh = searcher.embed_paths([changed])[0][0]
    assert np.allclose(vectors[changed.name], fresh, atol=1e-6) and not np.allclose(
        before[changed.name], fresh, atol=1e-3
    )

    embed.paths.clear()
    again, stats = update_index(updated, gallery, searcher.fingerprint, embed)
    assert embed.paths == [] and stats.unchanged == 7 and stats.embedded == stats.removed == 0
    assert np.array_equal(again.vectors, updated.vectors)


def test_unreadable_files_are_recorded_and_retried_only_when_changed(searcher, gallery: Path, val_images) -> None:
    embed = CountingEmbed(searcher)
    (gallery / "broken.jpg").write_bytes(b"not a jpeg at all")
    index, stats = update_index(None, gallery, searcher.fingerprint, embed)
    assert len(index) == 6 and [name for name, _ in stats.failed] == ["broken.jpg"] and "broken.jpg" in index.failed
    embed.paths.clear()
    index, stats = update_index(index, gallery, searcher.fingerprint, embed)
    assert embed.paths == [] and "broken.jpg" in index.failed  # the same broken file is not retried
    (gallery / "also_broken.png").write_bytes(b"\x89PNG truncated")  # an update whose only new file fails
    index, stats = update_index(index, gallery, searcher.fingerprint, embed)
    assert [p.name for p in embed.paths] == ["also_broken.png"] and len(index) == 6 and len(index.failed) == 2
    shutil.copy(val_images[8], gallery / "broken.jpg")  # repaired: embedded now
    _touch_later(gallery / "broken.jpg")
    embed.paths.clear()
    index, stats = update_index(index, gallery, searcher.fingerprint, embed)
    assert [p.name for p in embed.paths] == ["broken.jpg"] and stats.changed == 1 and "broken.jpg" in index.files
    assert set(index.failed) == {"also_broken.png"}


def _random_index(n: int, dim: int, seed: int = 0) -> GalleryIndex:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return GalleryIndex(Path("/gallery"), "fp", [f"{i:05d}.jpg" for i in range(n)], [FileStamp(1, 1)] * n, vectors)


def _assert_brute_force(index: GalleryIndex, queries: np.ndarray, k: int) -> None:
    scores = queries @ index.vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    for q, hits in enumerate(index.search(queries, k)):
        assert [h.path for h in hits] == [index.root / index.files[i] for i in order[q]]
        assert np.allclose([h.score for h in hits], scores[q, order[q]], atol=1e-5)
        assert [h.rank for h in hits] == list(range(1, len(order[q]) + 1))


def test_search_equals_brute_force_on_random_vectors() -> None:
    index = _random_index(2000, 64)
    queries = _random_index(9, 64, seed=1).vectors
    _assert_brute_force(index, queries, 10)
    _assert_brute_force(index, queries[:1], 1)
    assert [h.rank for h in index.search(queries[0], k=5000)[0]] == list(range(1, 2001))  # k above the size: all


def test_search_equals_brute_force_on_real_embeddings(searcher, small_data: Path, tmp_path: Path) -> None:
    index, _ = index_folder(searcher, small_data / "images" / "val", tmp_path / "idx")
    _assert_brute_force(index, searcher.embed_texts(PROMPTS), 7)
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.files == index.files and np.array_equal(loaded.vectors, index.vectors)


def test_an_index_built_by_another_model_is_refused(
    searcher, trained_model: Path, gallery: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "idx"
    index_folder(searcher, gallery, out)
    other = build_tiny(TinySpec(**MICRO_SPEC), PROMPTS * 3, seed=11)
    with pytest.raises(IndexMismatchError, match=r"built by another model .*rebuild it: finderpartner index"):
        index_folder(Searcher(other, device=CPU), gallery, out)
    other_dir = save_model(other, tmp_path / "other_model")
    store = tmp_path / "store"  # `search --index` reads the photo store that `finderpartner index` writes
    assert main(["-q", "index", "--model", str(trained_model), "--images", str(gallery), "--out", str(store)]) == 0
    code = main(["search", "--model", str(other_dir), "--index", str(store), "--prompt", "a red circle"])
    assert code == IndexMismatchError.exit_code == 8
    assert "was built by another model" in capsys.readouterr().err
    with pytest.raises(OutputError, match="is inside the input images"):
        index_folder(searcher, tmp_path, out)  # --out inside the gallery
    second = shutil.copytree(gallery, tmp_path / "second_gallery")
    with pytest.raises(OutputError, match=r"gallery index made from images: .*pass --overwrite"):
        index_folder(searcher, second, out)  # the same index folder for another gallery
    index_folder(searcher, second, out, overwrite=True)
    assert GalleryIndex.load(out).root == Path(second).resolve()
    with pytest.raises(IndexMismatchError, match="embedded by another model"):
        GalleryIndex.load(out).search(np.ones(16, np.float32))  # a 16-d query against 32-d vectors


def test_damaged_or_missing_index_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a gallery index"):
        GalleryIndex.load(tmp_path)
    _random_index(5, 8).save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**meta, "files": meta["files"][:3]}))
    with pytest.raises(DataError, match="inconsistent; rebuild"):
        GalleryIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text("{")
    with pytest.raises(DataError, match="damaged"):
        GalleryIndex.load(tmp_path / "idx")
    with pytest.raises(DataError, match="no images under"):
        update_index(None, tmp_path / "idx", "fp", lambda p: (np.zeros((0, 8)), []))


@pytest.fixture(scope="module")
def onnx_export(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    from finderpartner.interop.export import export_onnx

    encoder = load_model(trained_model)
    out = tmp_path_factory.mktemp("onnx") / "export"
    # the TorchScript exporter takes a second; the default exporter's parity is what test_export.py checks
    export_onnx(
        encoder, out, fingerprint=model_fingerprint(encoder.model), exporter="torchscript", source=str(trained_model)
    )
    return out


def test_onnx_backend_returns_the_same_top_k_as_torch(
    searcher,
    trained_model: Path,
    onnx_export: Path,
    small_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    onnx = OnnxSearcher(onnx_export, batch_size=8)
    assert onnx.fingerprint == searcher.fingerprint  # an index from either backend serves both
    images = small_data / "images" / "val"
    index, _ = index_folder(searcher, images, tmp_path / "idx")
    onnx_index, _ = index_folder(onnx, images, tmp_path / "onnx_idx")
    assert onnx_index.files == index.files and np.abs(onnx_index.vectors - index.vectors).max() < 1e-5
    queries = {"torch": searcher.embed_texts(PROMPTS), "onnx": onnx.embed_texts(PROMPTS)}
    image_query = sorted(images.glob("*.jpg"))[4]
    queries["torch"] = np.concatenate([queries["torch"], searcher.embed_paths([image_query])[0]])
    queries["onnx"] = np.concatenate([queries["onnx"], onnx.embed_paths([image_query])[0]])
    for hits_t, hits_o in zip(index.search(queries["torch"], 8), index.search(queries["onnx"], 8)):
        assert [h.path for h in hits_t] == [h.path for h in hits_o]
        assert np.allclose([h.score for h in hits_t], [h.score for h in hits_o], atol=1e-5)
    store = tmp_path / "store"  # the photo store `finderpartner index` writes, searched through the ONNX export
    # fp32 as the fixture's searcher: on a CPU with AVX512-BF16 `auto` embeds in bf16, and near-ties swap places
    index_args = ["--images", str(images), "--out", str(store), "--precision", "fp32"]
    assert main(["-q", "index", "--model", str(trained_model), *index_args]) == 0
    capsys.readouterr()
    code = main(
        [
            "search",
            "--backend",
            "onnx",
            "--model",
            str(onnx_export),
            "--index",
            str(store),
            "--prompt",
            PROMPTS[0],
            "--top-k",
            "8",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["path"] for r in result["results"]] == [
        str(h.path) for h in index.search(queries["torch"][:1], 8)[0]
    ]


def test_cached_gallery_through_a_symlink_and_the_real_path(
    searcher, gallery: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FINDERPARTNER_CACHE", str(tmp_path / "cache"))
    link = tmp_path / "link"
    link.symlink_to(gallery, target_is_directory=True)
    for folder in (link, gallery, link):  # each spelling has its own cached index; none is refused
        index, stats = cached_gallery(searcher, folder)
        assert len(index) == 6 and index.root == Path(os.path.abspath(folder))
    assert stats.embedded == 0  # the second visit through the link reuses its index
