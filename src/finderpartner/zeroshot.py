"""Zero-shot classification: classify images by their closest class prompt, in CLIP_benchmark's definitions.

A set is a list of images with a class index each (``ZeroShotSet``), read from an ImageFolder layout
(``root/<class>/*.jpg``) or a CSV (``filename,label``). Each class is embedded as CLIP does it: every prompt
template filled with the class name, the L2-normalised text embeddings averaged and normalised again
(``class_embeddings``). Each image is assigned the class with the highest cosine; ``evaluate_zeroshot`` reports
top-1, top-5 (with at least 5 classes) and the mean per-class recall (``metrics.zero_shot_accuracy``) and the
confusion matrix; ``write_zeroshot_report`` stores them in an evaluation folder (the output rule of ``eval``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.files import IMAGE_EXTENSIONS
from .embedding import Autocast, embed_texts
from .errors import DataError
from .evaluate import embed_image_shares, share, write_eval_report
from .metrics import zero_shot_accuracy
from .model import DualEncoder
from .outputs import atomic_path
from .processes import world

log = logging.getLogger(__name__)

# Six of the 80 ImageNet prompt templates of OpenAI's CLIP (github.com/openai/CLIP,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), the ones that do not presume a kind of picture (no
# "origami", "tattoo", "video game"): a short ensemble for sets that bring no templates of their own.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a low resolution photo of a {}.",
)
METRICS = ("top1", "top5", "mean_per_class_recall")


@dataclass
class ZeroShotSet:
    """Images, their class indices and the class names (as they go into the prompts)."""

    name: str
    images: list[Path]
    labels: list[int]
    classes: list[str]
    source: Path | None = None  # the folder or CSV it was read from (for messages and reports)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if any(not 0 <= label < len(self.classes) for label in self.labels):
            raise ValueError("a label is not an index into classes")


@dataclass
class ZeroShotResult:
    name: str
    metrics: dict[str, float]  # top1, top5 (with >= 5 classes), mean_per_class_recall
    classes: list[str]
    templates: list[str]
    confusion: np.ndarray = field(repr=False)  # (classes, classes) counts: rows the true class, columns the predicted

    @property
    def num_images(self) -> int:
        return int(self.confusion.sum())

    def summary(self) -> dict[str, Any]:
        return {
            "zeroshot": self.metrics,
            "num_images": self.num_images,
            "num_classes": len(self.classes),
            "classes": self.classes,
            "templates": self.templates,
            "per_class_recall": dict(zip(self.classes, _per_class_recall(self.confusion))),
            "confusion": self.confusion.tolist(),
        }


def _per_class_recall(confusion: np.ndarray) -> list[float | None]:
    totals = confusion.sum(1)
    return [float(confusion[i, i] / totals[i]) if totals[i] else None for i in range(len(totals))]


# --------------------------------------------------------------------------------------------------------------
# Reading sets and templates


def load_zeroshot_set(path: str | Path, class_names: str | Path | None = None, name: str | None = None) -> ZeroShotSet:
    """An ImageFolder layout (``path`` is a folder) or a CSV ``filename,label`` (``path`` is a file).

    ImageFolder: every sub-folder holding images is a class, its name with underscores as spaces; ``class_names``
    (one folder name per line) picks the folders and their order instead of all of them, sorted. CSV: filenames
    are relative to the CSV's folder; the classes are ``class_names`` (one per line; every label must be one of
    them), else the distinct labels, sorted.
    """
    path = Path(path)
    names = [n for _, n in read_lines(Path(class_names), "class names")] if class_names is not None else None
    if names is not None and len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"class names file {class_names} lists {', '.join(map(repr, twice))} more than once")
    if path.is_dir():
        zset = _from_folder(path, names, class_names)
    elif path.is_file():
        zset = _from_csv(path, names, class_names)
    else:
        raise DataError(f"zero-shot set {path} not found: give a folder of class folders or a CSV filename,label")
    if not zset.images:
        raise DataError(f"zero-shot set {path} holds no images")
    if len(zset.classes) < 2:
        raise DataError(f"zero-shot set {path} has {len(zset.classes)} class(es); classification needs at least 2")
    zset.name = name or (path.name if path.is_dir() else path.stem)
    return zset


def _from_folder(root: Path, names: list[str] | None, names_file: Path | str | None) -> ZeroShotSet:
    folders = names if names is not None else sorted(p.name for p in root.iterdir() if _is_class_folder(p))
    if names is None:  # a folder without images is no class: said, since it changes what the accuracy means
        empty = sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in folders
        )
        if empty:
            log.warning(
                "zero-shot set %s: %d folder(s) hold no images (%s) and are left out: classifying among the %d "
                "other classes (--class-names lists the classes explicitly)",
                root,
                len(empty),
                ", ".join(empty),
                len(folders),
            )
    images: list[Path] = []
    labels: list[int] = []
    for index, folder in enumerate(folders):
        where = root / folder
        if not where.is_dir():
            raise DataError(f"class folder {where} not found (class {folder!r} of {names_file or root})")
        files = sorted(p for p in where.rglob("*") if _is_image(p) and not _hidden(p.relative_to(where)))
        if not files:
            raise DataError(f"class folder {where} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        images += files
        labels += [index] * len(files)
    return ZeroShotSet(root.name, images, labels, [f.replace("_", " ") for f in folders], root)


def _is_class_folder(p: Path) -> bool:
    return p.is_dir() and not p.name.startswith(".") and any(_is_image(f) for f in p.rglob("*"))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _from_csv(path: Path, names: list[str] | None, names_file: Path | str | None) -> ZeroShotSet:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(f"{path}: the first line must be the header 'filename,label', got {got!r}")
    entries: list[tuple[int, Path, str]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}, line {line}: expected 'filename,label', got {','.join(row)!r}")
        filename, label = row[0].strip(), row[1].strip()
        relative = PurePosixPath(filename.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts:
            raise DataError(f"{path}, line {line}: {filename!r} leaves the CSV's folder; give it relative to it")
        image = path.parent / relative
        if not image.is_file():
            raise DataError(f"{path}, line {line}: image {image} not found")
        entries.append((line, image, label))
    classes = names if names is not None else sorted({label for _, _, label in entries})
    index = {c: i for i, c in enumerate(classes)}
    for line, _, label in entries:
        if label not in index:
            raise DataError(
                f"{path}, line {line}: label {label!r} is not in the class names file {names_file} "
                f"({len(classes)} names)"
            )
    return ZeroShotSet(path.stem, [e[1] for e in entries], [index[e[2]] for e in entries], classes, path)


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 text file, stripped; an empty file is an error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{what} file {path} not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{what} file {path} is not UTF-8 text (byte {e.object[e.start]:#04x})") from None
    except OSError as e:
        raise DataError(f"cannot read {what} file {path}: {e.strerror or e}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise DataError(f"{what} file {path} is empty: give one per line")
    return lines


def read_templates(path: str | Path | None) -> list[str]:
    """Prompt templates from a file (one per line, ``{}`` where the class name goes), or the built-in ones."""
    if path is None:
        return list(TEMPLATES)
    lines = read_lines(Path(path), "templates")
    for n, template in lines:
        if template.count("{}") != 1:
            raise DataError(
                f"templates file {path}, line {n}: {template!r} must contain '{{}}' exactly once, where the class "
                "name goes (e.g. 'a photo of a {}.')"
            )
    return [template for _, template in lines]


# --------------------------------------------------------------------------------------------------------------
# Evaluating


def class_embeddings(
    encoder: DualEncoder,
    classes: Sequence[str],
    templates: Sequence[str],
    *,
    autocast: Autocast = contextlib.nullcontext,
    batch_size: int = 256,
) -> torch.Tensor:
    """(classes, dim): per class, the mean of its L2-normalised prompt embeddings, normalised again (CLIP's recipe)."""
    prompts = [template.replace("{}", name) for name in classes for template in templates]
    text = embed_texts(encoder, prompts, autocast=autocast, batch_size=batch_size)
    return F.normalize(text.view(len(classes), len(templates), -1).mean(1), dim=-1)


def predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Each image's class: the highest cosine (the first of equal ones)."""
    return (image_emb.float() @ class_emb.float().t()).argmax(1)


def evaluate_zeroshot(
    encoder: DualEncoder,
    data: ZeroShotSet,
    *,
    templates: Sequence[str] | None = None,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    distributed: bool = False,
) -> ZeroShotResult:
    """Zero-shot top-1/top-5/mean per-class recall and the confusion matrix of one set (the model moves to ``device``).

    ``distributed``: every process calls this together; each embeds a contiguous share of the images, and all
    get the same result (as ``evaluate.evaluate_split``).
    """
    templates = list(templates or TEMPLATES)
    rank, size = world() if distributed else (0, 1)
    encoder.model.to(device)
    rows = share(len(data.images), rank, size)
    image_emb = embed_image_shares(
        encoder,
        data.images,
        rows,
        size,
        device=device,
        autocast=autocast,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        what=f"zero-shot set {data.name}",
    )
    class_emb = class_embeddings(encoder, data.classes, templates, autocast=autocast, batch_size=batch_size)
    return score_zeroshot(data.name, image_emb, class_emb, data.labels, data.classes, templates)


def score_zeroshot(
    name: str,
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    labels: Sequence[int],
    classes: Sequence[str],
    templates: Sequence[str],
) -> ZeroShotResult:
    """The result from embeddings: metrics (``metrics.zero_shot_accuracy``) and the confusion matrix."""
    label_tensor = torch.as_tensor(labels, dtype=torch.long)
    metrics = zero_shot_accuracy(image_emb, class_emb, label_tensor, ks=(1, 5))
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (label_tensor.numpy(), predict(image_emb, class_emb).numpy()), 1)
    return ZeroShotResult(name, metrics, list(classes), list(templates), confusion)


# --------------------------------------------------------------------------------------------------------------
# Reports


def write_zeroshot_report(
    result: ZeroShotResult,
    out_dir: Path,
    name: str,
    extra: dict[str, Any] | None = None,
    *,
    protect: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """``<out>/<name>.json``, ``<out>/plots/<name>_confusion.png`` and a line in ``<out>/history.jsonl``.

    The same folder rule as the retrieval report (``evaluate.write_report``): a new or empty folder or an
    evaluation folder, never one holding other files, nor one inside ``protect``.
    """
    record = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {}), **result.summary()}
    plot = (f"plots/{name}_confusion.png", lambda path: plot_confusion(result, path))
    history = {k: v for k, v in record.items() if k != "confusion"}
    return write_eval_report(out_dir, name, record, plot, history=history, protect=protect, what="the zero-shot report")


def plot_confusion(result: ZeroShotResult, path: Path) -> Path:
    """The confusion matrix as row fractions (each true class's images by predicted class); class names up to 40."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(result.classes)
    totals = result.confusion.sum(1, keepdims=True)
    fractions = np.divide(result.confusion, totals, out=np.zeros(result.confusion.shape), where=totals > 0)
    side = min(12.0, 3.0 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    shown = ax.imshow(fractions, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), result.classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), result.classes, fontsize=8)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if result.confusion[i, j]:
                    colour = "white" if fractions[i, j] > 0.5 else "black"
                    ax.text(j, i, str(result.confusion[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{result.name}: zero-shot top-1 {result.metrics['top1']:.3f} ({result.num_images} images)")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a whole plot or the previous one, never half of one
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def format_zeroshot(result: ZeroShotResult) -> str:
    """One line: the metrics, the number of images, classes and templates."""
    figures = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    return (
        f"{result.name}: {figures} ({result.num_images} images, {len(result.classes)} classes, "
        f"{len(result.templates)} template(s))"
    )
