from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import MICRO_SPEC
from PIL import Image

from finderpartner.config import TinySpec
from finderpartner.data.collate import Collator
from finderpartner.data.dataset import ContrastiveBatchSampler, DecodedImages, PairDataset, read_split
from finderpartner.data.transforms import EvalTransform, TrainTransform, load_image, normalize, swap_left_right
from finderpartner.model import CLIP_MEAN, CLIP_STD, ImageSpec, build_tiny

SPEC = ImageSpec(32, 32, CLIP_MEAN, CLIP_STD)


def test_read_split_pairs_rows_with_images(small_data: Path) -> None:
    table, problems = read_split(small_data, "train")
    assert problems == [] and len(table) == 128
    files, row_to_image = table.images()
    assert len(files) == 64 and len(row_to_image) == 128
    assert all(table.filenames[i] == files[row_to_image[i]] for i in range(len(table)))
    assert table.lines[0] == 2  # line 1 is the header


def test_swap_left_right() -> None:
    assert swap_left_right("a red circle on the left") == "a red circle on the right"
    assert swap_left_right("Left: blue, right: red; leftover") == "Right: blue, left: red; leftover"


def test_augmentation_is_a_function_of_the_seed(small_data: Path) -> None:
    table, _ = read_split(small_data, "train")
    ds = PairDataset(table, TrainTransform(SPEC))
    a, b = ds[(3, 123)], ds[(3, 123)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    seen = {ds[(3, seed)]["pixel_values"].float().sum().item() for seed in range(8)}
    assert len(seen) > 1
    assert a["pixel_values"].dtype == torch.uint8 and a["pixel_values"].shape == (3, 32, 32)


def test_flip_mirrors_image_and_caption_together(small_data: Path) -> None:
    table, _ = read_split(small_data, "train")
    row = next(i for i, c in enumerate(table.captions) if "left" in c)
    flip = TrainTransform(SPEC, crop_scale=(1.0, 1.0), hflip=True, color_jitter=0.0)
    plain = TrainTransform(SPEC, crop_scale=(1.0, 1.0), hflip=False, color_jitter=0.0)
    img = load_image(table.path(row))
    for seed in range(20):
        out, caption = flip(img, table.captions[row], torch.Generator().manual_seed(seed))
        if caption != table.captions[row]:
            ref, _ = plain(img, table.captions[row], torch.Generator().manual_seed(seed))  # the same draws, unflipped
            assert "right" in caption and torch.equal(out, ref.flip(-1))
            return
    pytest.fail("no flip in 20 draws")


@pytest.mark.parametrize("size", [(64, 64), (80, 64), (300, 100), (100, 300)])
def test_crop_scale_one_keeps_the_whole_image(size: tuple[int, int]) -> None:
    from finderpartner.data.transforms import _crop_box

    for u in (0.0, 0.3, 0.99):
        assert _crop_box(*size, (1.0, 1.0), u, u, u, u) == pytest.approx((0, 0, *size), abs=1e-6)
    w, h = size
    for u in (0.0, 0.5, 0.99):  # other scales: the area drawn, inside the image
        x0, y0, x1, y1 = _crop_box(w, h, (0.5, 0.5), 0.5, u, u, u)
        assert (x1 - x0) * (y1 - y0) == pytest.approx(0.5 * w * h) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_sampler_covers_each_row_once_per_epoch_and_resumes_mid_epoch() -> None:
    full = ContrastiveBatchSampler(50, 8, seed=1)
    batches = list(full)
    assert len(batches) == full.steps_per_epoch == 6
    rows = [r for b in batches for r, _ in b]
    assert len(set(rows)) == 48  # the incomplete last batch is dropped
    full.set_position(0, 4)
    assert list(full) == batches[4:]
    full.set_position(1)
    assert list(full) != batches  # a new order each epoch


def test_sampler_slices_are_the_global_batch_in_rank_order() -> None:
    one = list(ContrastiveBatchSampler(40, 8, seed=5))
    parts = [list(ContrastiveBatchSampler(40, 8, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == one


def test_collate_tokenizes_and_drops_unreadable(small_data: Path, tmp_path: Path) -> None:
    table, _ = read_split(small_data, "val")
    encoder = build_tiny(TinySpec(**MICRO_SPEC), table.captions)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    table = table.select(range(4))
    ds = PairDataset(table, TrainTransform(SPEC))
    samples = [ds[(i, i)] for i in range(4)]
    ds_bad = PairDataset(table.__class__(tmp_path, table.csv_path, ("broken.jpg",), ("x",), (9,)), TrainTransform(SPEC))
    samples.append(ds_bad[(0, 0)])
    batch = Collator(encoder.text_tokenizer())(samples)
    assert len(batch) == 4 and batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] <= 16
    assert len(batch.skipped) == 1 and "broken.jpg" in batch.skipped[0].path
    assert [len(b) for b in batch.split(3)] == [3, 1]


def test_unusual_images_are_converted(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.save(tmp_path / "alpha.png")
    assert load_image(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("L", (10, 10), 128).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    Image.new("I;16", (10, 10), 65535).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60


def test_eval_transform_and_normalize() -> None:
    img = Image.new("RGB", (64, 40), (255, 255, 255))
    pixels = EvalTransform(SPEC)(img)
    assert pixels.shape == (3, 32, 32)
    x = normalize(pixels[None], SPEC)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-5)


def test_decoded_image_cache_keeps_the_crop_resolution_and_reports_broken_files(
    small_data: Path, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(small_data, root)
    table, _ = read_split(root, "train")
    big = Image.new("RGB", (300, 200), (200, 30, 30))
    big.save(table.path(0))
    table.path(2).write_bytes(b"not an image")  # rows 2 and 3 name the same file
    transform = TrainTransform(SPEC, (0.8, 1.0), hflip=True, color_jitter=0.1)
    side = transform.source_side
    assert side == 36  # a crop of 80% of the area still has >= 32 px per side
    estimate = DecodedImages.estimate_bytes(table, side)
    cache = DecodedImages(table, side)
    assert cache.get(0).shape == (36, 54, 3)  # short side down to 36, aspect kept
    assert cache.get(2) is None and cache.nbytes > 0 and 0.5 < estimate / cache.nbytes < 2
    cached, plain = PairDataset(table, transform, decoded=cache), PairDataset(table, transform)
    for row in (0, 4):  # a large image (shrunk in the cache) and a sample image (kept as it is)
        a, b = cached[(row, 7)], plain[(row, 7)]
        assert a["caption"] == b["caption"] and a["pixel_values"].shape == b["pixel_values"].shape == (3, 32, 32)
        assert (a["pixel_values"].float() - b["pixel_values"].float()).abs().mean() < 2  # the same crop
    assert cached[(2, 7)].path.endswith(table.filenames[2])  # still reported as the broken file it is
