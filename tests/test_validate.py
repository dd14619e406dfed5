"""Bad input gets a clear answer naming file and row; unusual but valid images are converted, not rejected."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
from helpers import MICRO_SPEC
from PIL import Image

from finderpartner.config import TinySpec
from finderpartner.data.transforms import load_image
from finderpartner.data.validate import require_usable, validate_split
from finderpartner.errors import DataError
from finderpartner.model import build_tiny

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


def _jpeg(path: Path, size=(40, 30), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _dataset(
    root: Path, rows: list[str], header: str = "filename,caption", encoding_bytes: bytes | None = None
) -> Path:
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *rows]) + "\n"
    (root / "captions_train.csv").write_bytes(encoding_bytes if encoding_bytes is not None else text.encode("utf-8"))
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "images" / "train"
    d.mkdir(parents=True)
    _jpeg(d / "good.jpg")
    _jpeg(d / "good2.jpg", colour=(20, 200, 20))
    return tmp_path / "data"


def _only_problem(root: Path, **kwargs):
    report = validate_split(root, "train", **kwargs)
    assert len(report.problems) == 1, [str(p) for p in report.problems]
    return report, report.problems[0]


CASES = {
    "missing_file": (["nope.jpg,a red square"], "missing_file", 2, "image 'nope.jpg' not found"),
    "empty_caption": (["good.jpg,   "], "empty_caption", 2, "empty caption for 'good.jpg'"),
    "absolute_path": (["/etc/passwd,a caption"], "path_escape", 2, "no absolute paths"),
    "dot_dot": (["../../secret.jpg,a caption"], "path_escape", 2, "no '..'"),
    "extra_field": (["good.jpg,a caption,extra"], "column_count", 2, "expected 2 fields (filename,caption), got 3"),
    "duplicate": (["good.jpg,a red square", "good.jpg,a red square"], "duplicate_row", 3, "duplicate of line 2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_row_problems_are_named_by_file_and_line(images: Path, case: str) -> None:
    rows, kind, line, text = CASES[case]
    _dataset(images, rows)
    report, problem = _only_problem(images)
    assert (problem.kind, problem.line) == (kind, line) and text in problem.message
    assert problem.file.endswith("captions_train.csv") and problem.fatal


@pytest.mark.parametrize(
    "kind, make, text",
    [
        ("empty_file", lambda p: p.write_bytes(b""), "zero-byte file"),
        ("truncated_image", lambda p: p.write_bytes(_jpeg(p, size=(200, 200))[:700]), "cannot be decoded"),
        ("not_an_image", lambda p: p.write_text("hello, I am text"), "cannot be decoded as an image"),
    ],
)
def test_broken_image_files(images: Path, kind: str, make, text: str) -> None:
    make(images / "images" / "train" / "bad.jpg")
    _dataset(images, ["bad.jpg,a caption"])
    report, problem = _only_problem(images)
    assert (problem.kind, problem.line) == (kind, 2) and text in problem.message and "'bad.jpg'" in problem.message


def test_decompression_bomb_is_rejected_over_the_pixel_limit(images: Path) -> None:
    _jpeg(images / "images" / "train" / "huge.jpg", size=(300, 200))
    _dataset(images, ["huge.jpg,a caption"])
    report, problem = _only_problem(images, max_pixels=50_000)
    assert problem.kind == "decompression_bomb" and "300x200 pixels is over the limit of 50000" in problem.message


@pytest.mark.parametrize("size", [(10000, 10000), (20000, 10000)])  # over PIL's own limit; over twice it (PIL's error)
def test_images_over_pils_own_limit_are_decompression_bombs(images: Path, size: tuple[int, int]) -> None:
    Image.new("1", size).save(images / "images" / "train" / "bomb.png")  # 1-bit and empty: ~25 KB on disk
    _dataset(images, ["bomb.png,a caption"])
    _, problem = _only_problem(images)
    assert problem.kind == "decompression_bomb"
    assert f"{size[0]}x{size[1]} pixels is over the limit of {Image.MAX_IMAGE_PIXELS}" in problem.message


def test_max_pixels_above_pils_own_limit_lets_images_through(images: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # a small PIL limit: real images over the default are huge
    _jpeg(images / "images" / "train" / "big.jpg", size=(300, 200))
    _dataset(images, ["big.jpg,a caption"])
    assert _only_problem(images)[1].kind == "decompression_bomb"  # PIL's limit applies by default
    report = validate_split(images, "train", max_pixels=100_000)
    assert report.problems == () and len(report.table) == 1
    assert Image.MAX_IMAGE_PIXELS == 10_000  # PIL's own setting is left as it was


def test_symlink_leaving_the_image_folder_is_rejected(images: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    _jpeg(outside)
    os.symlink(outside, images / "images" / "train" / "link.jpg")
    _dataset(images, ["link.jpg,a caption"])
    report, problem = _only_problem(images)
    assert problem.kind == "path_escape" and "is a link that leaves" in problem.message


def test_csv_encoding_bom_and_header_problems(images: Path) -> None:
    _dataset(images, [], encoding_bytes=b"filename,caption\ngood.jpg,caf\xe9 au lait\ngood2.jpg,fine\n")
    report, problem = _only_problem(images)
    assert (problem.kind, problem.line) == ("not_utf8", 2) and "byte 0xe9" in problem.message
    assert report.table.filenames == ("good2.jpg",)  # the other rows are still read

    _dataset(images, [], encoding_bytes="\ufefffilename,caption\ngood.jpg,a caption\n".encode("utf-8"))
    report, problem = _only_problem(images)
    assert problem.kind == "bom" and not problem.fatal and len(report.table) == 1

    _dataset(images, ["good.jpg"], header="filename")
    report, problem = _only_problem(images)
    assert problem.kind == "bad_header" and "missing column(s) caption" in problem.message

    _dataset(images, ["good.jpg,a,b"], header="filename,caption,label")
    report, problem = _only_problem(images)
    assert problem.kind == "bad_header" and "unexpected column(s) 'label'" in problem.message


def test_long_captions_are_counted_as_truncated(images: Path) -> None:
    long = " ".join(["a very long caption about a red square"] * 6)
    _dataset(images, [f"good.jpg,{long}", "good2.jpg,short", f"good2.jpg,{long} again"])
    tok = build_tiny(TinySpec(**MICRO_SPEC), ["a red square"]).tokenizer
    report, problem = _only_problem(images, tokenizer=tok, context_length=16)
    assert problem.kind == "caption_truncated" and not problem.fatal and problem.line == 2
    assert problem.message.startswith(
        "2 of 3 captions (2 distinct) are longer than the model's 16-token context and are cut"
    )


def test_every_problem_is_reported_at_once_and_raise_lists_them(images: Path) -> None:
    (images / "images" / "train" / "empty.jpg").write_bytes(b"")
    _dataset(images, ["good.jpg,ok", "nope.jpg,x", "good2.jpg,", "empty.jpg,y", "../x.jpg,z", "good2.jpg,fine"])
    report = validate_split(images, "train")
    assert sorted(p.kind for p in report.fatal) == ["empty_caption", "empty_file", "missing_file", "path_escape"]
    assert [p.line for p in report.problems] == [3, 4, 5, 6]
    assert report.table.filenames == ("good.jpg", "good2.jpg") and report.rows_total == 6
    with pytest.raises(DataError) as err:
        require_usable(report, "raise")
    assert all(f":{line}:" in str(err.value) for line in (3, 4, 5, 6)) and "on_error: skip" in str(err.value)
    assert len(require_usable(report, "skip")) == 2


def test_unusual_images_are_converted_not_rejected(images: Path) -> None:
    d = images / "images" / "train"
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(d / "alpha.png")
    Image.new("P", (20, 20), 3).save(d / "palette.png")
    Image.new("I;16", (20, 20), 40000).save(d / "deep.png")
    Image.new("L", (20, 20), 90).save(d / "gray.jpg")
    Image.new("CMYK", (20, 20), (0, 0, 255, 0)).save(d / "cmyk.jpg")
    rotated = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(d / "rotated.jpg", exif=exif)
    names = ["alpha.png", "palette.png", "deep.png", "gray.jpg", "cmyk.jpg", "rotated.jpg"]
    _dataset(images, [f"{n},caption {i}" for i, n in enumerate(names)])
    report = validate_split(images, "train")
    assert report.problems == () and len(report.table) == 6
    assert load_image(d / "rotated.jpg").size == (10, 30)  # EXIF rotation applied
    assert load_image(d / "alpha.png").getpixel((0, 0)) == (255, 127, 127)  # half-transparent red over white
    assert load_image(d / "deep.png").getpixel((0, 0))[0] == round(40000 * 255 / 65535)
    assert load_image(d / "cmyk.jpg").getpixel((0, 0))[2] < 80  # yellow: little blue


def _mixed(tmp_path: Path, small_data: Path) -> tuple[Path, list[str]]:
    """The small sample data plus bad rows of several kinds."""
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(small_data, root)
    (root / "images" / "train" / "zero.jpg").write_bytes(b"")
    (root / "images" / "train" / "text.jpg").write_text("not an image")
    csv_path = root / "captions_train.csv"
    good = csv_path.read_text().splitlines()[1:]
    bad = [
        "missing.jpg,a red circle",
        "zero.jpg,a blue star",
        "text.jpg,a green square",
        f"{good[0].split(',')[0]},  ",
        "../escape.jpg,x",
    ]
    csv_path.write_text("\n".join(["filename,caption", *good[:40], *bad, *good[40:]]) + "\n")
    return root, good


def test_skip_trains_on_exactly_the_good_rows(small_data: Path, tmp_path: Path) -> None:
    from helpers import micro_config

    from finderpartner.config import config_from_dict
    from finderpartner.train import train

    root, good = _mixed(tmp_path, small_data)
    report = validate_split(root, "train")
    assert len(report.fatal) == 5 and len(report.table) == len(good)
    assert [
        f"{f},{c}" if "," not in c else f'{f},"{c}"' for f, c in zip(report.table.filenames, report.table.captions)
    ] == good
    with pytest.raises(DataError, match="5 problem"):
        train(config_from_dict(micro_config(tmp_path / "raise", root)))
    result = train(
        config_from_dict(
            {**micro_config(tmp_path / "skip", root), "data": {"root": str(root), "num_workers": 0, "on_error": "skip"}}
        )
    )
    assert result.train_pairs == len(good) == 128 and result.state.global_step == 16


def test_a_file_that_breaks_during_training_is_skipped_counted_and_named(
    small_data: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    import shutil

    from helpers import micro_config

    import finderpartner.data.sources as sources
    import finderpartner.train.recipe as train_module
    from finderpartner.config import config_from_dict

    root = tmp_path / "data"
    shutil.copytree(small_data, root)
    victim = root / "images" / "train" / sorted(p.name for p in (root / "images" / "train").iterdir())[0]
    real = sources.require_usable

    def validate_then_break(report, on_error):  # the file changes on disk after the check, before training reads it
        table = real(report, on_error)
        if report.split == "train":
            victim.write_bytes(b"garbage")
        return table

    monkeypatch.setattr(sources, "require_usable", validate_then_break)
    with caplog.at_level(logging.WARNING, logger="finderpartner"):
        result = train_module.train(config_from_dict(micro_config(tmp_path, root)))
    # 2 rows name the image, each seen once per epoch; every step still trains on a valid (smaller) batch
    assert result.state.skipped_samples == 4 and result.state.global_step == 16
    assert victim.name in caplog.text and "skipped" in caplog.text
