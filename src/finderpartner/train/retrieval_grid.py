"""The retrieval grid: a few validation captions, each with its top images and its own image marked.

One RGB picture per validation (TensorBoard's Images tab, W&B), drawn from what validation already computed
(``evaluate.RetrievalExamples``): no second pass through the model, only the shown images are read. A row is a
caption, its top-k images best first (green border: the caption's own image; blue: another image with exactly
the same caption, which the caption-aware metrics count as correct) and, in the last column, its own image with
its rank.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..data.dataset import EncodedImage
from ..data.sources import EvalSet
from ..data.transforms import DECODE_ERRORS, load_image
from ..evaluate import RetrievalExamples

THUMB = 96  # thumbnail side in pixels
PAD = 8
TEXT_WIDTH = 250  # the caption column
LABEL = 18  # the line under a thumbnail
HEADER = 44
OWN = (0, 150, 0)  # the caption's own image
SAME_CAPTION = (30, 100, 230)  # another image with the identical caption
OTHER = (190, 190, 190)
INK = (20, 20, 20)
MUTED = (90, 90, 90)


def grid_size(rows: int, top_k: int) -> tuple[int, int]:
    """(width, height) of the grid of ``rows`` captions with ``top_k`` images each."""
    width = PAD + TEXT_WIDTH + (top_k + 1) * (THUMB + PAD) + 2 * PAD
    return width, HEADER + rows * (THUMB + LABEL + PAD) + PAD


def retrieval_grid(examples: RetrievalExamples, data: EvalSet) -> np.ndarray:
    """The grid as an ``H x W x 3`` uint8 array (its size: ``grid_size``)."""
    top_k = max((len(t) for t in examples.top), default=0)
    width, height = grid_size(len(examples.rows), top_k)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)
    x_own = PAD + TEXT_WIDTH + top_k * (THUMB + PAD) + 2 * PAD
    draw.text((PAD, 6), f"text -> image: top {top_k} of {len(data.images)} val images per caption", INK, font)
    legend = [("green", OWN, ": the caption's own image   "), ("blue", SAME_CAPTION, ": same caption, other image")]
    x = PAD
    for word, colour, rest in legend:
        draw.text((x, 24), word, colour, small)
        x += draw.textlength(word, small)
        draw.text((x, 24), rest, MUTED, small)
        x += draw.textlength(rest, small)
    draw.text((x_own, 24), "own image", MUTED, small)
    for i, row in enumerate(examples.rows):
        y = HEADER + i * (THUMB + LABEL + PAD)
        caption, own = data.captions[row], data.text_to_image[row]
        same = {data.text_to_image[j] for j, c in enumerate(data.captions) if c == caption}
        lines = _wrap(draw, f'"{caption}"', font, TEXT_WIDTH - PAD, max_lines=(THUMB + LABEL) // 18 - 1)
        draw.multiline_text((PAD, y + 2), "\n".join(lines), INK, font, spacing=4)
        draw.text((PAD, y + THUMB + LABEL - 14), f"val caption {row}", MUTED, small)
        for k, (image, score) in enumerate(zip(examples.top[i], examples.scores[i])):
            colour = OWN if image == own else SAME_CAPTION if image in same else OTHER
            x = PAD + TEXT_WIDTH + k * (THUMB + PAD)
            _tile(canvas, draw, data.images[image], x, y, colour, f"#{k + 1}  cos {score:.2f}", small)
        _tile(canvas, draw, data.images[own], x_own, y, OWN, f"rank {examples.rank[i]}", small)
    return np.asarray(canvas, dtype=np.uint8)


def _tile(canvas: Image.Image, draw: ImageDraw.ImageDraw, item: Any, x: int, y: int, colour, label: str, font) -> None:
    thumb = _thumbnail(item)
    if thumb is None:
        draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=(235, 235, 235))
        draw.text((x + 6, y + THUMB // 2 - 6), "unreadable", MUTED, font)
    else:
        canvas.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
    line = 4 if colour != OTHER else 1
    draw.rectangle((x - 1, y - 1, x + THUMB, y + THUMB), outline=colour, width=line)
    draw.text((x, y + THUMB + 3), label, INK if colour != OTHER else MUTED, font)


def _thumbnail(item: Any) -> Image.Image | None:
    """The image fitted into THUMB x THUMB (small ones enlarged without blurring); None when it cannot be read."""
    try:
        if isinstance(item, Image.Image):
            img = item.convert("RGB")
        elif isinstance(item, (EncodedImage, bytes, bytearray, memoryview)):
            img = load_image(io.BytesIO(item.data if isinstance(item, EncodedImage) else item), min_side=THUMB)
        else:
            img = load_image(item, min_side=THUMB)
    except DECODE_ERRORS:
        return None
    enlarge = max(img.size) < THUMB
    return ImageOps.contain(img, (THUMB, THUMB), Image.NEAREST if enlarge else Image.BICUBIC)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".,") + " ..."
    return lines


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # older Pillow: the small bitmap font
        return ImageFont.load_default()
