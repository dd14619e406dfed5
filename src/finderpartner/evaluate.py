"""Evaluation: embed a split, compute metrics (``metrics.py``), write reports and plots.

Computing and writing are separate: ``evaluate_split`` returns a result, ``write_report`` stores it. In a
multi-process run (``distributed=True``) every process embeds its own share of the split and gets the same result.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .data.dataset import image_name
from .data.sources import EvalSet
from .embedding import Autocast, embed_images, embed_texts
from .errors import DataError
from .loss import Objective, gather_features, saved_objective
from .metrics import mean_recall, retrieval_metrics, similarity_stats, top_candidates
from .model import DualEncoder
from .outputs import atomic_path, claim_files, claim_output, storage_errors, write_text_atomic
from .processes import world

log = logging.getLogger(__name__)

EXAMPLE_QUERIES = 4  # captions of a split shown with their top images (the retrieval grid, tracking.py)
EXAMPLE_TOP_K = 5


@dataclass
class RetrievalExamples:
    """A few captions of the split with their best-scoring images: what ``retrieval_grid`` draws.

    The captions are the same at every validation of a split (evenly spread over its rows), so that the grids of
    successive validations show the same queries.
    """

    rows: list[int]  # caption rows of the split
    top: list[list[int]]  # each caption's top images (indices into the split's images), best first
    scores: list[list[float]]  # their cosine similarities
    rank: list[int]  # the rank of each caption's own image (1-based; it may be below the top k)


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # retrieval, by direction
    loss: float
    similarity: dict[str, float]
    num_images: int
    num_captions: int
    positive: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    negative: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    loss_batch_size: int = 0  # the loss is the objective's mean over consecutive blocks of this many pairs
    examples: RetrievalExamples | None = field(repr=False, default=None)

    @property
    def mean_recall(self) -> float:
        return mean_recall(self.metrics)

    def summary(self) -> dict[str, Any]:
        return {
            "retrieval": self.metrics,
            "mean_recall": self.mean_recall,
            "loss": self.loss,
            "loss_batch_size": self.loss_batch_size,
            "similarity": self.similarity,
            "num_images": self.num_images,
            "num_captions": self.num_captions,
        }

    def select(self, name: str) -> float:
        """A metric by name: 'mean_recall', 'loss' or '<direction>/<metric>' such as 'text_to_image/R@1'."""
        if name == "mean_recall":
            return self.mean_recall
        if name == "loss":
            return -self.loss  # higher is better everywhere
        direction, _, metric = name.partition("/")
        try:
            value = self.metrics[direction][metric]
        except KeyError:
            known = [f"{d}/{m}" for d, ms in self.metrics.items() for m in ms]
            raise KeyError(f"unknown metric {name!r}; known: mean_recall, loss, {', '.join(known)}") from None
        return -value if metric.endswith("_rank") else value  # a lower rank is better


def evaluate_split(
    encoder: DualEncoder,
    data: EvalSet,
    *,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    batch_size: int = 256,
    objective: Objective | None = None,
    loss_batch_size: int = 256,
    chunk_size: int = 1024,
    num_workers: int = 0,
    progress: bool = False,
    distributed: bool = False,
) -> EvalResult:
    """Retrieval metrics, contrastive loss and similarity statistics of one split (the model moves to ``device``).

    The loss is ``objective``'s (training passes its own; default: CLIP's with the model's temperature) over
    consecutive blocks of ``loss_batch_size`` pairs.

    ``distributed``: every process of the default process group calls this together. Each embeds a contiguous
    share of the images and of the captions (``share``), the shares are gathered into the whole split in its
    order, and every process computes the same metrics from them (a no-op with one process).
    """
    rank, size = world() if distributed else (0, 1)
    encoder.model.to(device)
    images, captions = share(len(data.images), rank, size), share(len(data.captions), rank, size)
    image_emb = embed_image_shares(
        encoder,
        data.images,
        images,
        size,
        device=device,
        autocast=autocast,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        what=str(data.name),
        fix="; run validate-data",
    )
    text_emb = embed_texts(encoder, data.captions[captions], autocast=autocast, batch_size=batch_size)
    if size > 1:  # on the device: the backend's (NCCL gathers CUDA tensors only)
        text_emb = torch.cat(gather_features(text_emb.to(device))).cpu()
    t2i = torch.tensor(data.text_to_image)
    # a saved model's own objective (SigLIP with its saved temperature and bias, else CLIP), unless given
    objective = objective if objective is not None else saved_objective(encoder.model, encoder.objective_record)
    return evaluate_embeddings(image_emb, text_emb, t2i, data.captions, objective, loss_batch_size, chunk_size)


def share(rows: int, rank: int, size: int) -> slice:
    """Process ``rank``'s contiguous share of ``rows`` rows: the shares of all processes partition them, in order."""
    return slice(rank * rows // size, (rank + 1) * rows // size)


def embed_image_shares(
    encoder: DualEncoder,
    images: list[Any],
    rows: slice,
    size: int,
    *,
    device: torch.device,
    autocast: Autocast,
    batch_size: int,
    num_workers: int,
    progress: bool,
    what: str,
    fix: str = "",
) -> torch.Tensor:
    """Embeddings of all ``images`` when each of ``size`` processes embeds its ``rows`` (``share``) and all gather
    the rest in order. An unreadable image in any process raises a ``DataError`` (naming up to 5) in every one."""
    image_emb, skipped = embed_images(
        encoder, images[rows], autocast=autocast, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    skipped = [(rows.start + row, reason) for row, reason in skipped]
    if size > 1:  # every process raises, or none does
        everyone: list[Any] = [None] * size
        dist.all_gather_object(everyone, skipped)
        skipped = [failure for failures in everyone for failure in failures]
    if skipped:
        listing = "; ".join(f"{image_name(images[row])}: {reason}" for row, reason in skipped[:5])
        raise DataError(f"{len(skipped)} image(s) of {what} could not be read ({listing}){fix}")
    if size > 1:  # on the device: the backend's (NCCL gathers CUDA tensors only)
        image_emb = torch.cat(gather_features(image_emb.to(device))).cpu()
    return image_emb


def evaluate_embeddings(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    captions: list[str],
    objective: Objective,
    loss_batch_size: int = 256,
    chunk_size: int = 1024,
) -> EvalResult:
    metrics = retrieval_metrics(image_emb, text_emb, text_to_image, captions, chunk_size=chunk_size)
    # Contrastive loss over consecutive blocks of rows (the training objective at the training batch size), on a
    # CPU copy of the objective's parameters where the embeddings are; ``loss`` gathers nothing across processes.
    losses, sizes = [], []
    on_cpu = copy.deepcopy(objective).cpu()
    for start in range(0, len(captions), loss_batch_size):
        rows = torch.arange(start, min(start + loss_batch_size, len(captions)))
        if len(rows) > 1:
            with torch.no_grad():
                losses.append(float(on_cpu.loss(image_emb[text_to_image[rows]], text_emb[rows])))
            sizes.append(len(rows))
    loss = float(np.average(losses, weights=sizes)) if losses else float("nan")
    stats, positive, negative = similarity_stats(image_emb, text_emb, text_to_image)
    examples = retrieval_examples(image_emb, text_emb, text_to_image)
    return EvalResult(
        metrics, loss, stats, image_emb.shape[0], text_emb.shape[0], positive, negative, loss_batch_size, examples
    )


def retrieval_examples(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, queries: int = EXAMPLE_QUERIES
) -> RetrievalExamples:
    """The top images of ``queries`` captions evenly spread over the split, from the embeddings already made."""
    rows = sorted({int(r) for r in np.linspace(0, len(text_emb) - 1, num=min(queries, len(text_emb))).round()})
    own = torch.as_tensor(text_to_image, dtype=torch.long)[rows]
    top, scores, rank = top_candidates(text_emb[rows], image_emb, own, k=EXAMPLE_TOP_K)
    return RetrievalExamples(rows, top.tolist(), scores.tolist(), rank.tolist())


def claim_report_folder(out_dir: Path, protect: Mapping[str, Any] | None = None) -> None:
    """Refuse ``out_dir`` unless an evaluation report may go there (the output rule, ``outputs.claim_output``): a
    new or empty folder or an evaluation folder, never one holding other files, nor one inside ``protect`` (the
    models and the data). Checked before the work, and again on writing."""
    claim_output(out_dir, "eval", {}, protect=protect, legacy=lambda p: {} if (p / "history.jsonl").is_file() else None)


def write_eval_report(
    out_dir: Path,
    name: str,
    record: Mapping[str, Any],
    plot: tuple[str, Callable[[Path], Path]],
    *,
    history: Mapping[str, Any] | None = None,
    protect: Mapping[str, Any] | None = None,
    what: str = "the evaluation report",
) -> dict[str, Path]:
    """The one writer of evaluation reports (retrieval, zero-shot, the WiSE-FT sweep): ``<out>/<name>.json`` holding
    ``record``, the plot ``plot = (relative path, draw(path))`` drawn first (a stop leaves no report without its
    plot), and ``history`` (when given) appended to ``<out>/history.jsonl``. The folder is claimed as
    ``claim_report_folder`` says, and only these files are written."""
    claim_report_folder(out_dir, protect)
    report = out_dir / f"{name}.json"
    plot_name, draw = plot
    names = [report.name, plot_name] + (["history.jsonl"] if history is not None else [])
    with storage_errors(out_dir, f"{what} in {out_dir}"):
        claim_files(out_dir, "eval", {}, names)
        plot_path = draw(out_dir / plot_name)
        write_text_atomic(report, json.dumps(record, indent=2))
        written = {"report": report, "plot": plot_path}
        if history is not None:
            with open(out_dir / "history.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(history) + "\n")
            written["history"] = out_dir / "history.jsonl"
    return written


def write_report(
    result: EvalResult,
    out_dir: Path,
    name: str,
    extra: dict[str, Any] | None = None,
    *,
    protect: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """``<out>/<name>.json``, ``<out>/plots/<name>_similarity.png``, and a line appended to ``<out>/history.jsonl``."""
    record = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {}), **result.summary()}
    plot = (f"plots/{name}_similarity.png", lambda path: plot_similarity(result, path))
    return write_eval_report(out_dir, name, record, plot, history=record, protect=protect)


def plot_similarity(result: EvalResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(-1, 1, 81)
    ax.hist(result.negative, bins=bins, alpha=0.6, density=True, label=f"non-matching (n={result.negative.size})")
    ax.hist(result.positive, bins=bins, alpha=0.6, density=True, label=f"matching (n={result.positive.size})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(f"image-caption similarity (gap {result.similarity['gap']:.3f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a whole plot or the previous one, never half of one
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def figures(result: EvalResult, zeroshot: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, float]:
    """Every figure of a validation by its eval.best_metric name: '<direction>/<metric>', 'mean_recall', 'loss',
    'zeroshot/<set>/<metric>' (plain floats: they go into a checkpoint's JSON state)."""
    out = {f"{d}/{m}": float(v) for d, values in result.metrics.items() for m, v in values.items()}
    out.update(mean_recall=float(result.mean_recall), loss=float(result.loss))
    for name, values in (zeroshot or {}).items():
        out.update({f"zeroshot/{name}/{m}": float(v) for m, v in values.items()})
    return out


def format_change(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """A fixed-width table of every figure both validations have: before, after and the change."""
    names = [name for name in before if name in after]
    width = max([len("metric"), *map(len, names)]) + 2
    lines = [f"{'metric':<{width}}{'before':>10}{'after':>10}{'change':>10}"]
    for name in names:
        lines.append(f"{name:<{width}}{before[name]:>10.4f}{after[name]:>10.4f}{after[name] - before[name]:>+10.4f}")
    return "\n".join(lines)


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A fixed-width table of retrieval metrics, one row per direction."""
    columns = ["R@1", "R@5", "R@10", "mean_rank", "median_rank"]
    lines = [f"{'direction':<30}" + "".join(f"{c:>12}" for c in columns)]
    for direction, values in metrics.items():
        lines.append(f"{direction:<30}" + "".join(f"{values[c]:>12.4f}" for c in columns))
    return "\n".join(lines)
