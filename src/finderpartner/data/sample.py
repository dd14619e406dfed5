"""Deterministic synthetic image-caption data set: the project's embedded default data.

Each image shows one coloured shape (8 colours x 4 shapes x 3 horizontal positions x 2 sizes =
192 combinations) on a lightly tinted, mildly noisy gray background, and every caption states
exactly those four attributes, so a tiny CLIP model can learn text->image retrieval on a CPU.
Position words are literally ``left`` / ``center`` / ``right`` because the training augmentation
mirrors images and swaps ``left`` and ``right`` in the caption.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError, DataError, OutputError
from ..outputs import contents, marked_files, read_marker, storage_errors, write_marker, write_output

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
# Saturated, well-separated RGB values; white/black sit far from the 110-155 gray background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 220, 35),
    "purple": (140, 50, 190),
    "orange": (245, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("left", "center", "right")
SIZES = ("small", "large")
COMBOS = tuple(itertools.product(COLOURS, SHAPES, POSITIONS, SIZES))  # 192 attribute combinations
# One template per caption row; the position word stays the bare left/center/right token.
TEMPLATES = (
    lambda c, s, p, z: f"a {z} {c} {s} " + ("in the center" if p == "center" else f"on the {p}"),
    lambda c, s, p, z: f"{z} {c} {s}, " + ("center" if p == "center" else f"{p} side"),
)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SampleDataSummary:
    root: Path
    counts: dict[str, dict[str, int]]  # split -> {"images": n, "pairs": n, "distinct_captions": n}


def _draw(rng: np.random.Generator, size: int, colour: str, shape: str, pos: str, big: bool) -> Image.Image:
    """Draw one image; geometry in units of the image side, rendered at 2x and downscaled (antialias)."""
    bg = np.clip(rng.uniform(118, 142) + rng.uniform(-7, 7, 3), 0, 255).round().astype(int)
    fill = np.clip(np.array(COLOURS[colour]) + rng.integers(-10, 11, 3), 0, 255)
    # Diameter ~22-26% vs ~40-46%: area ratio ~3.3. Every shape lies inside its d x d bounding box.
    d = rng.uniform(0.40, 0.46) if big else rng.uniform(0.22, 0.26)
    lo = d / 2 + 0.02  # keep a small margin to the border
    # Centres: left hugs the border (large ~0.25, small ~0.15-0.20), center 0.46-0.54, right mirrored. Centre-to-
    # centre gaps stay >= 0.2 of the width, so a random resized crop (which shifts content by up to ~0.2 of the
    # width) cannot turn one position into another.
    x = {
        "left": rng.uniform(lo, lo + 0.05),
        "center": rng.uniform(0.46, 0.54),
        "right": 1 - rng.uniform(lo, lo + 0.05),
    }[pos]
    y = rng.uniform(lo, 1 - lo)
    s2, h = 2 * size, d / 2
    img = Image.new("RGB", (s2, s2), tuple(bg.tolist()))
    draw, col = ImageDraw.Draw(img), tuple(fill.tolist())
    if shape == "circle":
        pts = [(x - h, y - h), (x + h, y + h)]
        draw.ellipse([(px * s2, py * s2) for px, py in pts], fill=col)
    else:
        if shape == "square":  # side 0.9 d: area close to the circle's
            pts = [
                (x - 0.45 * d, y - 0.45 * d),
                (x + 0.45 * d, y - 0.45 * d),
                (x + 0.45 * d, y + 0.45 * d),
                (x - 0.45 * d, y + 0.45 * d),
            ]
        elif shape == "triangle":  # upright, base d, height d
            pts = [(x, y - h), (x + h, y + h), (x - h, y + h)]
        else:  # five-pointed star, fat inner radius so the points survive at small sizes
            ang = -np.pi / 2 + np.arange(10) * np.pi / 5
            rad = np.where(np.arange(10) % 2 == 0, h, 0.5 * h)
            pts = list(zip(x + rad * np.cos(ang), y + 0.08 * h + rad * np.sin(ang)))
        draw.polygon([(float(px) * s2, float(py) * s2) for px, py in pts], fill=col)
    arr = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    arr += rng.normal(0.0, 4.0, arr.shape)  # mild sensor-like noise
    return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))


def _outputs(root: Path, meta_name: str = "sample_meta.json") -> list[Path]:
    """Everything a generator writes (and the only things overwrite may remove)."""
    return [root / "images" / s for s in SPLITS] + [root / f"captions_{s}.csv" for s in SPLITS] + [root / meta_name]


def _summarise(
    root: Path, meta: dict, combos: int = len(COMBOS), meta_name: str = "sample_meta.json"
) -> SampleDataSummary:
    """Count what is on disk and check it is the complete data set that ``meta`` describes."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        n, cpi = meta[f"{split}_images"], meta["captions_per_image"]
        try:
            with open(root / f"captions_{split}.csv", encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            expected = {Path(name).name for name in _file_names(meta, meta_name) if name.startswith(f"images/{split}/")}
            files = {p.name for p in (root / "images" / split).iterdir() if p.is_file()} & expected  # a user's own stay
        except OSError as e:
            raise DataError(f"sample data in {root} is incomplete ({e}); pass overwrite to regenerate it") from e
        body = rows[1:]
        got = {"images": len(files), "pairs": len(body), "distinct_captions": len({r[1] for r in body})}
        want = {"images": n, "pairs": n * cpi, "distinct_captions": min(n, combos) * cpi}
        if rows[:1] != [["filename", "caption"]] or got != want or not {r[0] for r in body} <= files:
            raise DataError(
                f"sample data in {root} ({split}) does not match {meta_name}: found {got}, "
                f"expected {want}; pass overwrite to regenerate it"
            )
        counts[split] = got
    return SampleDataSummary(root=root, counts=counts)


def make_sample_data(
    out: str | Path,
    *,
    train_images: int = 4000,
    val_images: int = 300,
    image_size: int = 96,
    captions_per_image: int = 2,
    image_format: str = "jpg",
    seed: int = 0,
    overwrite: bool = False,
) -> SampleDataSummary:
    """Write ``images/{train,val}/*.<fmt>`` and ``captions_{train,val}.csv`` under ``out``; reuse a finished set."""
    _check_args(train_images, val_images, image_size, captions_per_image, image_format, len(TEMPLATES))
    meta = {
        "format_version": FORMAT_VERSION,
        "train_images": train_images,
        "val_images": val_images,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "image_format": image_format,
        "seed": seed,
    }
    return _write_set(Path(out), meta, _SAMPLE, overwrite=overwrite)


@dataclass(frozen=True)
class _SetKind:
    """One generator's identity: its marker kind, its meta file (written last: a finished set), what it makes and
    who makes it (for messages), its number of attribute combinations and the function that writes the splits."""

    kind: str
    meta_name: str
    what: str
    writer: str
    combos: int
    generate: Callable[[Path, dict], None]


def _check_args(
    train_images: int, val_images: int, image_size: int, captions_per_image: int, image_format: str, templates: int
) -> None:
    if (
        train_images < 0
        or val_images < 0
        or image_size < 32
        or image_format not in ("jpg", "png")
        or not 1 <= captions_per_image <= templates
    ):
        raise ConfigError(
            "sample data needs train_images, val_images >= 0, image_size >= 32, image_format 'jpg' or 'png' "
            f"and 1 <= captions_per_image <= {templates}"
        )


def _write_set(root: Path, meta: dict, spec: _SetKind, *, overwrite: bool) -> SampleDataSummary:
    """The data-safety rules shared by the generators: reuse a finished set made with the same arguments, never
    touch what this generator did not write, replace its own other set only with ``overwrite``."""
    meta_path = root / spec.meta_name
    try:
        same = json.loads(meta_path.read_text(encoding="utf-8")) == meta
    except (OSError, ValueError):
        same = False
    if same:
        try:
            summary = _summarise(root, meta, spec.combos)
            log.info("reusing %s in %s", spec.what, root)
            return summary
        except DataError:
            if not overwrite:
                raise
    existing = [p for p in _outputs(root, spec.meta_name) if p.exists()]
    ours = meta_path.exists() or (read_marker(root) or {}).get("kind") == spec.kind
    held = contents(root) if root.is_dir() else []
    if held and not ours:  # a folder of the user's (photos, a real data set): nothing is written into it
        listing = ", ".join(sorted(held)[:5]) + (", ..." if len(held) > 5 else "")
        raise OutputError(
            f"{root} already holds {listing}, which {spec.writer} did not write; it never replaces them "
            "nor writes among them: choose a new or empty --out"
        )
    if existing and not ours:  # a real data set (or anything else) with the same names: never ours to replace
        raise OutputError(
            f"{root} already holds {', '.join(p.relative_to(root).as_posix() for p in existing)}, which "
            f"{spec.writer} did not write; it never replaces them: choose another --out"
        )
    if existing and not overwrite:
        raise OutputError(
            f"{root} already contains {spec.what} made with other arguments (or an unfinished run): "
            f"{', '.join(p.relative_to(root).as_posix() for p in existing)}; pass --overwrite to replace it"
        )
    if existing and marked_files(read_marker(root)) is None:
        _adopt(root, spec)  # written by a version whose marker listed no files: list them now, from its meta

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        spec.generate(tmp, meta)
        (tmp / spec.meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # Only the files the previous set's marker lists are replaced; anything else in OUT is left alone.
    write_output(write, root, spec.kind, meta, what=f"{spec.what} in {root}")
    return _summarise(root, meta, spec.combos, spec.meta_name)


def _file_names(meta: dict, meta_name: str) -> list[str]:
    """Every file a generator writes for ``meta`` (relative paths): its images, its CSVs, its meta file."""
    return [
        *(f"images/{s}/{i:06d}.{meta['image_format']}" for s in SPLITS for i in range(meta[f"{s}_images"])),
        *(f"captions_{s}.csv" for s in SPLITS),
        meta_name,
    ]


def _adopt(root: Path, spec: _SetKind) -> None:
    """Give a set written before markers listed their files the list its meta file implies (unreadable meta: none)."""
    try:
        old = json.loads((root / spec.meta_name).read_text(encoding="utf-8"))
        names = _file_names(old, spec.meta_name)
    except (OSError, ValueError, KeyError, TypeError):
        old, names = {}, []
    with storage_errors(root, f"{spec.what} in {root}"):
        write_marker(root, spec.kind, old, files=names)


def _generate(root: Path, meta: dict) -> None:
    seed, image_size, image_format = meta["seed"], meta["image_size"], meta["image_format"]
    train_images, val_images, captions_per_image = meta["train_images"], meta["val_images"], meta["captions_per_image"]
    start = time.perf_counter()
    for k, (split, n) in enumerate(zip(SPLITS, (train_images, val_images))):
        # Own stream per split: val stays identical whatever train_images is.
        rng = np.random.default_rng([seed, k])
        # Balanced: whole seeded permutations of the 192 combinations, so a split of >= 192 images has all.
        order = np.concatenate([rng.permutation(len(COMBOS)) for _ in range(-(-n // len(COMBOS)))] or [[]])
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True)
        rows = []
        for i in range(n):
            colour, shape, pos, size = COMBOS[int(order[i])]
            name = f"{i:06d}.{image_format}"
            img = _draw(rng, image_size, colour, shape, pos, size == "large")
            if image_format == "jpg":
                img.save(img_dir / name, format="JPEG", quality=95)
            else:
                img.save(img_dir / name, format="PNG")
            rows += [(name, TEMPLATES[t](colour, shape, pos, size)) for t in range(captions_per_image)]
        with open(root / f"captions_{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["filename", "caption"])
            writer.writerows(rows)
    log.info("wrote %d+%d sample images to %s in %.1fs", train_images, val_images, root, time.perf_counter() - start)


_SAMPLE = _SetKind("sample-data", "sample_meta.json", "sample data", "sample-data", len(COMBOS), _generate)


# --------------------------------------------------------------------------------------------------------------
# A held-out split in words the training captions never use

# Synonyms and paraphrases: none of these words (nor the phrasings below) is in a training caption, so a model
# that only learnt the captions' vocabulary cannot read them, and one with a pretrained text tower can.
PARAPHRASE_WORDS: dict[str, dict[str, str]] = {
    "colour": {
        "red": "crimson",
        "green": "emerald",
        "blue": "azure",
        "yellow": "golden",
        "purple": "violet",
        "orange": "tangerine",
        "white": "snowy",
        "black": "ebony",
    },
    "shape": {"circle": "round disk", "square": "box", "triangle": "pyramid", "star": "pentagram"},
    "size": {"small": "tiny", "large": "huge"},
    "position": {"left": "at the western edge", "center": "in the middle", "right": "at the eastern edge"},
}
PARAPHRASE_TEMPLATES = (
    lambda c, s, p, z: f"there is a {z} {c} {s} {p}",
    lambda c, s, p, z: f"{p} you can see a {c} {s}, which is {z}",
)


def make_paraphrase_split(
    out: str | Path, *, images: int = 300, image_size: int = 96, split: str = "paraphrase", seed: int = 7
) -> SampleDataSummary:
    """Write a held-out split ``images/<split>/`` + ``captions_<split>.csv`` whose captions say the sample data's
    attributes in other words and word orders (``PARAPHRASE_WORDS``), plus ``attributes_<split>.csv`` (filename,
    colour, shape, size, position in the canonical words) for zero-shot classification.

    The images are new draws of the same generator. Writes only these three new paths and refuses if any exists.
    """
    root = Path(out)
    image_dir, captions, attributes = (
        root / "images" / split,
        root / f"captions_{split}.csv",
        root / f"attributes_{split}.csv",
    )
    taken = [p for p in (image_dir, captions, attributes) if p.exists()]
    if taken:
        raise OutputError(f"{', '.join(map(str, taken))} already exist(s); choose another split name or folder")
    rng = np.random.default_rng([seed, 99])
    order = np.concatenate([rng.permutation(len(COMBOS)) for _ in range(-(-images // len(COMBOS)))] or [[]])
    with storage_errors(root, f"the {split} split in {root}"):
        image_dir.mkdir(parents=True)
        rows, labels = [], []
        for i in range(images):
            colour, shape, pos, size = COMBOS[int(order[i])]
            name = f"{i:06d}.jpg"
            _draw(rng, image_size, colour, shape, pos, size == "large").save(image_dir / name, "JPEG", quality=95)
            words = [
                PARAPHRASE_WORDS[k][v]
                for k, v in zip(("colour", "shape", "position", "size"), (colour, shape, pos, size))
            ]
            rows.append((name, PARAPHRASE_TEMPLATES[i % len(PARAPHRASE_TEMPLATES)](*words)))
            labels.append((name, colour, shape, size, pos))
        for path, header, body in (
            (captions, ["filename", "caption"], rows),
            (attributes, ["filename", "colour", "shape", "size", "position"], labels),
        ):
            with open(path, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(header)
                writer.writerows(body)
    distinct = len({c for _, c in rows})
    return SampleDataSummary(root, {split: {"images": images, "pairs": images, "distinct_captions": distinct}})


# --------------------------------------------------------------------------------------------------------------
# A second domain: other objects, colours, words and backgrounds (for fine-tuning a model trained on the first)

SECOND_FORMAT_VERSION = 1
# None of these words is an attribute word of the sample data (COLOURS, SHAPES, POSITIONS, SIZES): a model that
# learnt the sample data has to learn these (or read them with a pretrained text tower).
SECOND_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (250, 110, 185),
    "cyan": (40, 215, 235),
    "brown": (125, 70, 25),
    "lime": (165, 240, 40),
    "navy": (20, 30, 115),
    "gold": (225, 175, 15),
}
SECOND_SHAPES = ("heart", "cross", "ring", "diamond")
# Vertical positions: the horizontal flip of training (which swaps left/right words) leaves them true.
SECOND_POSITIONS = ("top", "middle", "bottom")
SECOND_SIZES = ("little", "big")
SECOND_COMBOS = tuple(itertools.product(SECOND_COLOURS, SECOND_SHAPES, SECOND_POSITIONS, SECOND_SIZES))  # 144
SECOND_TEMPLATES = (
    lambda c, s, p, z: f"a {z} {c} {s} " + ("in the middle" if p == "middle" else f"at the {p}"),
    lambda c, s, p, z: f"{c} {s}, {z}, {p}",
)


def _second_background(rng: np.random.Generator, s2: int) -> np.ndarray:
    """Diagonal stripes or a linear gradient between two muted random tones (never the sample data's flat gray)."""
    a = rng.uniform(95, 175, 3)
    b = np.clip(a + rng.uniform(-45, 45, 3), 70, 200)
    yy, xx = np.mgrid[0:s2, 0:s2].astype(np.float32) / s2
    if rng.random() < 0.5:  # stripes: period 8-16% of the side, at +-45 degrees
        period = rng.uniform(0.08, 0.16)
        t = ((xx + (1 if rng.random() < 0.5 else -1) * yy) / period) % 1.0 < 0.5
        t = t.astype(np.float32)
    else:  # gradient in a random direction
        ang = rng.uniform(0, 2 * np.pi)
        t = np.cos(ang) * xx + np.sin(ang) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]


def _draw_second(rng: np.random.Generator, size: int, colour: str, shape: str, pos: str, big: bool) -> Image.Image:
    """One second-domain image: an object at the top, middle or bottom third on a striped or gradient background."""
    s2 = 2 * size
    bg = _second_background(rng, s2)
    fill = tuple(np.clip(np.array(SECOND_COLOURS[colour]) + rng.integers(-10, 11, 3), 0, 255).tolist())
    d = rng.uniform(0.40, 0.46) if big else rng.uniform(0.22, 0.26)
    lo = d / 2 + 0.02
    y = {
        "top": rng.uniform(lo, lo + 0.05),
        "middle": rng.uniform(0.46, 0.54),
        "bottom": 1 - rng.uniform(lo, lo + 0.05),
    }[pos]
    x = rng.uniform(lo, 1 - lo)
    h = d / 2
    img = Image.fromarray(bg.round().astype(np.uint8))
    draw = ImageDraw.Draw(img)

    def px(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(float(u) * s2, float(v) * s2) for u, v in points]

    if shape == "ring":  # hollow: an outline 22% of the radius thick
        draw.ellipse(px([(x - h, y - h), (x + h, y + h)]), outline=fill, width=max(2, round(0.22 * h * s2)))
    elif shape == "cross":  # a plus sign, arms 34% of the diameter wide
        w = 0.17 * d
        draw.rectangle(px([(x - h, y - w), (x + h, y + w)]), fill=fill)
        draw.rectangle(px([(x - w, y - h), (x + w, y + h)]), fill=fill)
    elif shape == "diamond":  # a rhombus, taller than wide
        draw.polygon(px([(x, y - h), (x + 0.7 * h, y), (x, y + h), (x - 0.7 * h, y)]), fill=fill)
    else:  # heart: the classic parametric curve, scaled into the d x d box
        t = np.linspace(0, 2 * np.pi, 60)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        hy = hy - (hy.max() + hy.min()) / 2
        scale = h / 16.5
        draw.polygon(px(list(zip(x + scale * hx, y + scale * hy))), fill=fill)
    arr = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    arr += rng.normal(0.0, 4.0, arr.shape)
    return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))


def _generate_second(root: Path, meta: dict) -> None:
    seed, image_size, image_format = meta["seed"], meta["image_size"], meta["image_format"]
    start = time.perf_counter()
    for k, split in enumerate(SPLITS):
        n = meta[f"{split}_images"]
        rng = np.random.default_rng([seed, 1000 + k])  # own stream per split, apart from the sample data's
        order = np.concatenate(
            [rng.permutation(len(SECOND_COMBOS)) for _ in range(-(-n // len(SECOND_COMBOS)))] or [[]]
        )
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True)
        rows = []
        for i in range(n):
            colour, shape, pos, size = SECOND_COMBOS[int(order[i])]
            name = f"{i:06d}.{image_format}"
            img = _draw_second(rng, image_size, colour, shape, pos, size == "big")
            if image_format == "jpg":
                img.save(img_dir / name, format="JPEG", quality=95)
            else:
                img.save(img_dir / name, format="PNG")
            rows += [(name, SECOND_TEMPLATES[t](colour, shape, pos, size)) for t in range(meta["captions_per_image"])]
        with open(root / f"captions_{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["filename", "caption"])
            writer.writerows(rows)
    log.info(
        "wrote %d+%d second-domain images to %s in %.1fs",
        meta["train_images"],
        meta["val_images"],
        root,
        time.perf_counter() - start,
    )


_SECOND = _SetKind(
    "second-domain-data",
    "second_domain_meta.json",
    "second-domain data",
    "make_second_domain",
    len(SECOND_COMBOS),
    _generate_second,
)


def make_second_domain(
    out: str | Path,
    *,
    train_images: int = 4000,
    val_images: int = 300,
    image_size: int = 96,
    captions_per_image: int = 2,
    image_format: str = "jpg",
    seed: int = 0,
    overwrite: bool = False,
) -> SampleDataSummary:
    """A second domain in the sample data's layout (``images/{train,val}/`` + ``captions_{train,val}.csv``): hearts,
    crosses, rings and diamonds (``SECOND_SHAPES``) in six other colours, at the top, middle or bottom, little or
    big, on striped or gradient backgrounds; no caption attribute word is one of the sample data's. The same
    data-safety rules as ``make_sample_data``: a finished set made with the same arguments is reused, nothing it
    did not write is touched, its own set made with other arguments is replaced only with ``overwrite``."""
    _check_args(train_images, val_images, image_size, captions_per_image, image_format, len(SECOND_TEMPLATES))
    meta = {
        "format_version": SECOND_FORMAT_VERSION,
        "train_images": train_images,
        "val_images": val_images,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "image_format": image_format,
        "seed": seed,
    }
    return _write_set(Path(out), meta, _SECOND, overwrite=overwrite)
