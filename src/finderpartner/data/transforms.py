"""Image loading and preprocessing.

Workers return uint8 tensors (4x less to copy between processes than float); normalisation happens on the
training device, batched (``normalize``). Augmentation draws from an explicit ``torch.Generator`` seeded per
sample, so a sample is augmented identically whatever the worker count, and again after a resume.
"""

from __future__ import annotations

import functools
import math
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError


@dataclass(frozen=True)
class ImageSpec:
    """A model's inference preprocessing (from its image processor): resize shortest edge, centre crop, normalise.

    It lives with the transforms that apply it, so that the model module can use them without an import circle.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


try:  # HEIC/HEIF (iPhone photos): Pillow reads them once the maintained plugin pillow-heif is installed
    import pillow_heif
except ImportError:
    HEIF_SUPPORT = False
else:
    pillow_heif.register_heif_opener()
    HEIF_SUPPORT = True

SUPPORTED_FORMATS = "JPEG, PNG, WebP, BMP, GIF, TIFF" + (", HEIC/HEIF" if HEIF_SUPPORT else "")
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """Mirror a caption: 'left' <-> 'right', keeping the case of the first letter."""

    def swap(m: re.Match[str]) -> str:
        word = "right" if m.group(0).lower() == "left" else "left"
        return word.capitalize() if m.group(0)[0].isupper() else word

    return _LEFT_RIGHT.sub(swap, caption)


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed: a decompression bomb, or a photo too large to decode safely."""


_OPEN_LOCK = threading.Lock()


# What decoding a damaged or hostile file raises: PIL's decoders are not consistent (truncated data: OSError or
# EOFError; broken chunks: SyntaxError or struct.error; bad headers: ValueError, IndexError, KeyError, TypeError,
# ZeroDivisionError). Readers that must survive one bad file catch exactly these, so a bug elsewhere still surfaces.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    SyntaxError,
    struct.error,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    Image.DecompressionBombError,
)


def load_image(path: str | Path | BinaryIO, max_pixels: int | None = None, min_side: int | None = None) -> Image.Image:
    """Decode an image as RGB: EXIF rotation applied; alpha/palette/16-bit/grayscale/CMYK converted correctly.

    ``max_pixels`` replaces PIL's own limit (``Image.MAX_IMAGE_PIXELS``, used when None); an image over the limit
    raises ``ImageTooLarge``. With ``min_side``, a large JPEG is decoded at a reduced size whose short side stays
    >= ``min_side``. Files that are not images or are truncated raise PIL's own errors.
    """
    img = _open_checked(path, max_pixels)
    try:
        if min_side is not None:
            _draft(img, min_side)
        img.load()
        rgb = to_rgb(img)
    except Image.DecompressionBombError as e:  # PIL's own check while decoding (TIFF tiles)
        img.close()
        raise ImageTooLarge(str(e)) from None
    except BaseException:
        img.close()
        raise
    if rgb is not img:
        img.close()  # a converted copy: release the file (multi-frame images keep it open after load)
    return rgb


def _open_checked(path: str | Path | BinaryIO, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (header only) with our pixel limit instead of PIL's (``Image.MAX_IMAGE_PIXELS`` when None)."""
    with _OPEN_LOCK:  # PIL's check reads a module global: lift it for this open only, ours applies below
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path)
        except UnidentifiedImageError:
            raise UnidentifiedImageError(unidentified_message(path)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    limit = pil_limit if max_pixels is None else max_pixels
    if limit is not None and img.width * img.height > limit:
        img.close()
        raise ImageTooLarge(f"{img.width}x{img.height} pixels is over the limit of {limit} (decompression bomb?)")
    return img


def unidentified_message(path: str | Path | BinaryIO, name: str | None = None) -> str:
    """What to say for a file PIL cannot identify: HEIC/HEIF named with its fix, else the readable formats.

    Only the file's own name is shown (``name`` or the path's last part), never the folder it is in.
    """
    if name is None:
        name = Path(path).name if isinstance(path, (str, Path)) else Path(getattr(path, "name", "") or "upload").name
    try:
        if isinstance(path, (str, Path)):
            with open(path, "rb") as f:
                head = f.read(12)
        else:
            path.seek(0)
            head = path.read(12)
    except (OSError, ValueError):
        head = b""
    readable = f"readable formats: {SUPPORTED_FORMATS}"
    if not head:  # as validate-data says it
        return f"{name} is a zero-byte file (empty: an interrupted copy or download?)"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS or Path(name).suffix.lower() in (".heic", ".heif"):
        if HEIF_SUPPORT:
            return f"{name} is a HEIC/HEIF file that pillow-heif cannot decode (damaged?); convert it to JPEG"
        return (
            f"{name} is a HEIC/HEIF photo, which Pillow cannot read by itself: install the plugin pillow-heif "
            f"(pip install pillow-heif) and it is read as is, or convert the photo to JPEG ({readable})"
        )
    return f"{name} is not an image in a supported format ({readable}); convert it to JPEG or PNG"


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
    mean, std = _mean_std(tuple(spec.mean), tuple(spec.std), pixels.device)
    return ((pixels.float() - mean) / std).to(dtype)


@functools.lru_cache(maxsize=16)
def _mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, 3, 1, 1) mean and std in 0-255 units, made once per device: building them from Python floats on a
    GPU is a blocking host-to-device copy, which every micro-batch would otherwise wait for."""
    shape = (1, 3, 1, 1)
    return (
        torch.tensor(mean, dtype=torch.float32).view(shape).mul(255).to(device),
        torch.tensor(std, dtype=torch.float32).view(shape).mul(255).to(device),
    )


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shortest edge, centre crop: the model's own inference preprocessing."""

    spec: ImageSpec

    @property
    def source_side(self) -> int:
        """Short side an input needs for full quality (large JPEGs are decoded down to it)."""
        return max(self.spec.resize, self.spec.crop)

    def __call__(self, img: Image.Image) -> torch.Tensor:
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

    @property
    def source_side(self) -> int:
        """Short side an input needs so that even the smallest random crop keeps full resolution."""
        return math.ceil(self.spec.crop / math.sqrt(self.crop_scale[0]))

    def __call__(self, img: Image.Image, caption: str, rng: torch.Generator) -> tuple[torch.Tensor, str]:
        u = torch.rand(8, generator=rng).tolist()  # one draw per decision, fixed count: reproducible
        size = self.spec.crop
        img = to_rgb(img) if img.mode != "RGB" else img
        box = _crop_box(img.width, img.height, self.crop_scale, u[0], u[1], u[2], u[3])
        img = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
        if self.hflip and u[4] < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            caption = swap_left_right(caption)
        if self.color_jitter > 0:
            j = self.color_jitter
            for enhancer, r in (
                (ImageEnhance.Brightness, u[5]),
                (ImageEnhance.Contrast, u[6]),
                (ImageEnhance.Color, u[7]),
            ):
                img = enhancer(img).enhance(1 - j + 2 * j * r)
        return to_uint8_tensor(img), caption


def _crop_box(
    width: int, height: int, scale: tuple[float, float], u_area: float, u_ratio: float, u_x: float, u_y: float
) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box (area fraction in ``scale``, aspect ratio in [3/4, 4/3]) from uniform draws.

    The ratio is drawn among those for which a box of that area fits in the image, so the area is exact and
    ``scale == (1, 1)`` gives the whole image.
    """
    area = width * height * (scale[0] + (scale[1] - scale[0]) * u_area)
    fits = (area / height**2, width**2 / area)  # the box fits for ratios in this range
    lo, hi = max(3 / 4, fits[0]), min(4 / 3, fits[1])
    if lo > hi:  # an elongated image that no ratio in [3/4, 4/3] fits: the closest ratio that does
        lo = hi = fits[0] if fits[0] > 4 / 3 else fits[1]
    ratio = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u_ratio)
    w = min(width, math.sqrt(area * ratio))  # min(): float rounding only
    h = min(height, math.sqrt(area / ratio))
    x = (width - w) * u_x
    y = (height - h) * u_y
    return (x, y, x + w, y + h)


def _draft(img: Image.Image, min_side: int) -> None:
    """Let the JPEG decoder downscale by a power of two while keeping the short side >= min_side (much faster)."""
    if img.format == "JPEG" and min(img.size) >= 2 * min_side:
        scale = min(img.size) / min_side
        img.draft("RGB", (math.ceil(img.width / scale), math.ceil(img.height / scale)))
