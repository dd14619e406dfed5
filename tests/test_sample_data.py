"""Tests for the synthetic sample data generator (offline, small counts)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finderpartner.data.sample import (
    COLOURS,
    POSITIONS,
    SECOND_COLOURS,
    SECOND_POSITIONS,
    SECOND_SHAPES,
    SECOND_SIZES,
    SHAPES,
    SIZES,
    make_sample_data,
    make_second_domain,
)
from finderpartner.errors import DataError, OutputError

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

SMALL = {"train_images": 200, "val_images": 100}


def _rows(root: Path, split: str) -> list[list[str]]:
    with open(root / f"captions_{split}.csv", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    make_sample_data(root, **SMALL)
    return root


def test_deterministic(small: Path, tmp_path: Path) -> None:
    make_sample_data(tmp_path / "again", **SMALL)
    assert _tree(small) == _tree(tmp_path / "again")


def test_csv_layout(small: Path) -> None:
    raw = (small / "captions_train.csv").read_bytes()
    assert raw.startswith(b"filename,caption\n")  # no BOM, exact header
    for split, n in (("train", 200), ("val", 100)):
        rows = _rows(small, split)
        assert rows[0] == ["filename", "caption"]
        body = rows[1:]
        assert len(body) == 2 * n
        names = [r[0] for r in body]
        assert all(names.count(x) == 2 for x in set(names))
        assert all((small / "images" / split / x).is_file() for x in names)
        assert len(list((small / "images" / split).iterdir())) == n


def test_default_val_split(tmp_path: Path) -> None:
    summary = make_sample_data(tmp_path, train_images=0)
    val = summary.counts["val"]
    assert val["images"] == 300 and val["pairs"] >= 500 and val["distinct_captions"] >= 100
    assert summary.counts["train"]["pairs"] == 0


def _words(caption: str) -> list[str]:
    return caption.replace(",", " ").split()


def test_captions_name_each_attribute_once(small: Path) -> None:
    for _, caption in _rows(small, "train")[1:]:
        words = _words(caption)
        for vocab in (COLOURS, SHAPES, POSITIONS, SIZES):
            assert sum(w in vocab for w in words) == 1, caption


def test_caption_matches_pixels(small: Path) -> None:
    for name, caption in _rows(small, "val")[1::2]:
        img = np.asarray(Image.open(small / "images" / "val" / name), dtype=np.float32)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        bg = np.median(border, axis=0)
        mask = np.linalg.norm(img - bg, axis=2) > 60  # clearly not background
        colour = np.median(img[mask], axis=0)
        nearest = min(COLOURS, key=lambda c: np.linalg.norm(np.array(COLOURS[c]) - colour))
        words = _words(caption)
        assert nearest in words, caption
        # Centroid of the shape lies in the third named by the caption.
        x = np.nonzero(mask)[1].mean() / img.shape[1]
        third = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "center"
        assert third in words, (caption, x)
        # Large shapes span >= ~43% of the width, small ones <= 30%.
        cols = np.nonzero(mask.any(axis=0))[0]
        assert ("large" if (cols[-1] - cols[0] + 1) / img.shape[1] > 0.36 else "small") in words, caption


def test_reuse_without_regeneration(small: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()}
    summary = make_sample_data(small, **SMALL)
    assert summary.counts["val"] == {"images": 100, "pairs": 200, "distinct_captions": 200}
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()} == before


def test_mismatch_and_overwrite(tmp_path: Path) -> None:
    make_sample_data(tmp_path, train_images=20, val_images=10)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "images" / "extra").mkdir()
    (tmp_path / "images" / "extra" / "x.jpg").write_bytes(b"keep")
    with pytest.raises(OutputError, match="overwrite"):
        make_sample_data(tmp_path, train_images=30, val_images=10)
    summary = make_sample_data(tmp_path, train_images=30, val_images=10, image_format="png", overwrite=True)
    assert summary.counts["train"]["images"] == 30
    assert not list((tmp_path / "images" / "train").glob("*.jpg"))
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "images" / "extra" / "x.jpg").read_bytes() == b"keep"


def test_unfinished_set_is_not_reused(tmp_path: Path) -> None:
    make_sample_data(tmp_path, train_images=20, val_images=10)
    (tmp_path / "images" / "val" / "000003.jpg").unlink()
    with pytest.raises(DataError, match="overwrite"):
        make_sample_data(tmp_path, train_images=20, val_images=10)
    assert make_sample_data(tmp_path, train_images=20, val_images=10, overwrite=True).counts["val"]["images"] == 10


# ---------------------------------------------------------------------------------------------------------------
# The second domain (scripts/two_stage.py fine-tunes on it)

SECOND_SMALL = {"train_images": 150, "val_images": 40}


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("second")
    make_second_domain(root, **SECOND_SMALL)
    return root


def test_second_domain_is_deterministic_and_reused(second: Path, tmp_path: Path) -> None:
    make_second_domain(tmp_path / "again", **SECOND_SMALL)
    assert _tree(second) == _tree(tmp_path / "again")
    before = {p: p.stat().st_mtime_ns for p in second.rglob("*") if p.is_file()}
    summary = make_second_domain(second, **SECOND_SMALL)
    assert summary.counts["val"] == {"images": 40, "pairs": 80, "distinct_captions": 80}
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*") if p.is_file()} == before


def test_second_domain_layout_and_captions(second: Path) -> None:
    assert (second / "captions_train.csv").read_bytes().startswith(b"filename,caption\n")
    for split, n in (("train", 150), ("val", 40)):
        body = _rows(second, split)[1:]
        assert len(body) == 2 * n and len(list((second / "images" / split).iterdir())) == n
        assert all((second / "images" / split / name).is_file() for name, _ in body)
        for _, caption in body:
            words = _words(caption)
            for vocab in (SECOND_COLOURS, SECOND_SHAPES, SECOND_POSITIONS, SECOND_SIZES):
                assert sum(w in vocab for w in words) == 1, caption
    with Image.open(next((second / "images" / "val").iterdir())) as img:
        assert img.size == (96, 96) and img.mode == "RGB"


def test_second_domain_shares_no_attribute_word_with_the_sample_data(second: Path, small: Path) -> None:
    first = {w for vocab in (COLOURS, SHAPES, POSITIONS, SIZES) for w in vocab}
    other = {w for vocab in (SECOND_COLOURS, SECOND_SHAPES, SECOND_POSITIONS, SECOND_SIZES) for w in vocab}
    assert not first & other
    # and in the captions actually written: no caption of one names an attribute word of the other
    for root, foreign in ((second, first), (small, other)):
        for split in ("train", "val"):
            for _, caption in _rows(root, split)[1:]:
                assert not set(_words(caption)) & foreign, caption


def test_second_domain_never_touches_what_it_did_not_write(small: Path, tmp_path: Path) -> None:
    before = _tree(small)
    with pytest.raises(OutputError, match="make_second_domain did not write"):  # the sample data is not its own
        make_second_domain(small, **SECOND_SMALL, overwrite=True)
    assert _tree(small) == before
    user = tmp_path / "mine"  # a user's data set in the same layout
    (user / "images" / "train").mkdir(parents=True)
    (user / "captions_train.csv").write_text("filename,caption\n")
    with pytest.raises(OutputError, match="never replaces them"):
        make_second_domain(user, **SECOND_SMALL, overwrite=True)
    assert (user / "captions_train.csv").read_text() == "filename,caption\n"
    # and the sample data generator does not replace a second domain either
    make_second_domain(tmp_path / "second", train_images=10, val_images=4)
    with pytest.raises(OutputError, match="sample-data did not write"):
        make_sample_data(tmp_path / "second", train_images=10, val_images=4, overwrite=True)


def test_second_domain_other_arguments_need_overwrite(tmp_path: Path) -> None:
    make_second_domain(tmp_path, train_images=10, val_images=4)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="overwrite"):
        make_second_domain(tmp_path, train_images=12, val_images=4)
    assert make_second_domain(tmp_path, train_images=12, val_images=4, overwrite=True).counts["train"]["images"] == 12
    assert (tmp_path / "notes.txt").read_text() == "keep me"
