"""Image loading and preprocessing.

Workers return uint8 tensors (4x less to copy between processes than float); normalisation happens on the
training device, batched (``normalize``). Augmentation draws from an explicit ``torch.Generator`` seeded per
sample, so a sample is augmented identically whatever the worker count, and again after a resume.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ..model import ImageSpec

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """Mirror a caption: 'left' <-> 'right', keeping the case of the first letter."""

    def swap(m: re.Match[str]) -> str:
        word = "right" if m.group(0).lower() == "left" else "left"
        return word.capitalize() if m.group(0)[0].isupper() else word

    return _LEFT_RIGHT.sub(swap, caption)


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image as RGB: EXIF rotation applied; alpha/palette/16-bit/grayscale/CMYK converted correctly.

    Raises ``ValueError`` for an image over ``max_pixels`` (a decompression bomb) and PIL's own errors for files
    that are not images or are truncated.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(path)
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ValueError(f"{img.width}x{img.height} pixels is over the limit of {max_pixels} (decompression bomb?)")
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the value range down to 8 bits instead of clipping everything to white.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become white, as a viewer would show them, not the arbitrary colour under alpha 0.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, spec: ImageSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float on the same device."""
    mean = torch.tensor(spec.mean, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return ((pixels.float() - mean) / std).to(dtype)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shortest edge, centre crop: the model's own inference preprocessing."""

    spec: ImageSpec

    def __call__(self, img: Image.Image) -> torch.Tensor:
        _draft(img, self.spec.resize)
        img = to_rgb(img) if img.mode != "RGB" else img
        scale = self.spec.resize / min(img.size)
        w, h = max(self.spec.crop, round(img.width * scale)), max(self.spec.crop, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
        left, top = (w - self.spec.crop) // 2, (h - self.spec.crop) // 2
        return to_uint8_tensor(img.crop((left, top, left + self.spec.crop, top + self.spec.crop)))


@dataclass(frozen=True)
class TrainTransform:
    """Random resized crop, optional mirror (with the caption mirrored too), brightness/contrast/saturation jitter."""

    spec: ImageSpec
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True
    color_jitter: float = 0.1

    def __call__(self, img: Image.Image, caption: str, rng: torch.Generator) -> tuple[torch.Tensor, str]:
        u = torch.rand(8, generator=rng).tolist()  # one draw per decision, fixed count: reproducible
        size = self.spec.crop
        _draft(img, math.ceil(size / math.sqrt(self.crop_scale[0])))
        img = to_rgb(img) if img.mode != "RGB" else img
        box = _crop_box(img.width, img.height, self.crop_scale, u[0], u[1], u[2], u[3])
        img = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
        if self.hflip and u[4] < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            caption = swap_left_right(caption)
        if self.color_jitter > 0:
            j = self.color_jitter
            for enhancer, r in ((ImageEnhance.Brightness, u[5]), (ImageEnhance.Contrast, u[6]), (ImageEnhance.Color, u[7])):
                img = enhancer(img).enhance(1 - j + 2 * j * r)
        return to_uint8_tensor(img), caption


def _crop_box(
    width: int, height: int, scale: tuple[float, float], u_area: float, u_ratio: float, u_x: float, u_y: float
) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box (area fraction in ``scale``, aspect ratio in [3/4, 4/3]) from uniform draws."""
    area = width * height * (scale[0] + (scale[1] - scale[0]) * u_area)
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u_ratio)
    w = min(width, math.sqrt(area * ratio))
    h = min(height, math.sqrt(area / ratio))
    x = (width - w) * u_x
    y = (height - h) * u_y
    return (x, y, x + w, y + h)


def _draft(img: Image.Image, min_side: int) -> None:
    """Let the JPEG decoder downscale by a power of two while keeping the short side >= min_side (much faster)."""
    if img.format == "JPEG" and min(img.size) >= 2 * min_side:
        scale = min(img.size) / min_side
        img.draft("RGB", (math.ceil(img.width / scale), math.ceil(img.height / scale)))
