"""Retrieval and classification metrics: pure functions of embeddings, no I/O.

Conventions, chosen so that figures compare with published CLIP results: ranks are 1-based; a query's rank is that of its best-scoring correct answer;
ties count against the query (a wrong answer scoring exactly as high as the best correct one ranks above
it); the median rank follows open_clip (``floor(median(rank - 1)) + 1``). Queries are ranked in chunks so
that memory stays ``chunk_size x candidates``; chunked and full give identical results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DIRECTIONS = ("image_to_text", "text_to_image")


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    captions: Sequence[str] | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """Image->text and text->image recall@k, mean and median rank.

    ``text_to_image[j]`` is the image of caption ``j``; an image may have several captions. An image query hits
    when any of its captions is within k; a caption query hits when its image is. With ``captions`` given, the
    ``*_caption_aware`` variants are added: any item whose caption text is identical counts as a correct answer.
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    own = torch.arange(len(t2i))  # strict: each caption is its own class
    out = _both_directions(image_emb, text_emb, t2i, own, ks, chunk_size, suffix="")
    if captions is not None:
        if len(captions) != len(t2i):
            raise ValueError(f"{len(captions)} captions for {len(t2i)} text embeddings")
        _, text_class = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
        out |= _both_directions(
            image_emb, text_emb, t2i, torch.as_tensor(text_class.reshape(-1)), ks, chunk_size, suffix="_caption_aware"
        )
    return out


def _both_directions(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    t2i: torch.Tensor,
    text_class: torch.Tensor,
    ks: Sequence[int],
    chunk_size: int,
    suffix: str,
) -> dict[str, dict[str, float]]:
    num_images = image_emb.shape[0]
    # An image "has" a caption class when one of its captions belongs to it. Correct answers:
    #   caption j -> images having class(j);   image i -> captions whose class image i has.
    pairs = torch.unique(text_class * num_images + t2i)
    pair_class, pair_image = pairs // num_images, pairs % num_images
    images_of_class = _Csr(pair_class, pair_image, int(text_class.max()) + 1)
    classes_of_image = _Csr(pair_image, pair_class, num_images)
    captions_of_class = _Csr(text_class, torch.arange(len(text_class)), int(text_class.max()) + 1)

    def text_positives(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images_of_class.expand(text_class[queries])

    def image_positives(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, classes = classes_of_image.expand(queries)
        sub_rows, captions = captions_of_class.expand(classes)
        return rows[sub_rows], captions

    i2t = ranks(image_emb, text_emb, image_positives, chunk_size)
    t2i_ranks = ranks(text_emb, image_emb, text_positives, chunk_size)
    return {
        "image_to_text" + suffix: summarize_ranks(i2t, ks),
        "text_to_image" + suffix: summarize_ranks(t2i_ranks, ks),
    }


class _Csr:
    """key -> list of values, for expanding a chunk of queries into their (row, positive) pairs."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, num_keys: int):
        order = torch.argsort(keys, stable=True)
        self.values = values[order]
        self.counts = torch.bincount(keys, minlength=num_keys)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def expand(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in ``keys``, value) for every value of every key."""
        counts = self.counts[keys]
        rows = torch.repeat_interleave(torch.arange(len(keys)), counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return rows, self.values[self.starts[keys][rows] + offsets]


def ranks(query_emb: torch.Tensor, cand_emb: torch.Tensor, positives, chunk_size: int = 1024) -> torch.Tensor:
    """1-based rank of each query's best correct candidate; ties with wrong candidates count against the query.

    ``positives(query_indices)`` returns (row within the chunk, candidate index) pairs of correct answers.
    """
    query_emb, cand_emb = query_emb.float(), cand_emb.float()
    out = torch.empty(query_emb.shape[0], dtype=torch.long)
    for start in range(0, query_emb.shape[0], chunk_size):
        queries = torch.arange(start, min(start + chunk_size, query_emb.shape[0]))
        scores = query_emb[queries] @ cand_emb.t()
        mask = torch.zeros_like(scores, dtype=torch.bool)
        rows, cols = positives(queries)
        mask[rows, cols] = True
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every query needs at least one correct candidate")
        best = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
        out[queries] = 1 + ((scores >= best) & ~mask).sum(dim=1)
    return out


def top_candidates(
    query_emb: torch.Tensor, cand_emb: torch.Tensor, own: Sequence[int] | torch.Tensor, k: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query's ``k`` best candidates (indices and cosines, best first) and the 1-based rank of its own
    candidate ``own[q]`` (ties count against it, as in ``ranks``). For a few queries: all candidates at once."""
    scores = query_emb.float() @ cand_emb.float().t()
    best = scores.topk(min(k, scores.shape[1]), dim=1)
    own_score = scores.gather(1, torch.as_tensor(own, dtype=torch.long)[:, None])
    return best.indices, best.values, (scores >= own_score).sum(dim=1)


def summarize_ranks(rank: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    r = rank.double()
    out = {f"R@{k}": float((r <= k).double().mean()) for k in ks}
    out["mean_rank"] = float(r.mean())
    out["median_rank"] = float(np.floor(np.median((r - 1).numpy())) + 1)
    return out


def mean_recall(metrics: dict[str, dict[str, float]], caption_aware: bool = True) -> float:
    """Mean of every R@k in both directions (caption-aware when available): one number to pick a best model."""
    suffix = "_caption_aware" if caption_aware and "text_to_image_caption_aware" in metrics else ""
    values = [v for d in DIRECTIONS for k, v in metrics[d + suffix].items() if k.startswith("R@")]
    return float(np.mean(values))


def similarity_stats(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    *,
    num_negatives: int = 100_000,
    seed: int = 0,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Cosine similarity of matching vs non-matching pairs: summary, and the samples (for a histogram).

    Negatives are pairs (image, caption) where the caption is not one of the image's; sampled uniformly.
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    image_emb, text_emb = image_emb.float(), text_emb.float()
    positive = (image_emb[t2i] * text_emb).sum(-1).numpy()
    rng = np.random.default_rng(seed)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    negative = np.empty(0, dtype=np.float32)
    if n_img > 1:
        imgs = torch.as_tensor(rng.integers(0, n_img, num_negatives))
        txts = torch.as_tensor(rng.integers(0, n_txt, num_negatives))
        keep = t2i[txts] != imgs
        negative = (image_emb[imgs[keep]] * text_emb[txts[keep]]).sum(-1).numpy()
    stats = {
        "positive_mean": float(positive.mean()),
        "positive_std": float(positive.std()),
        "negative_mean": float(negative.mean()) if negative.size else float("nan"),
        "negative_std": float(negative.std()) if negative.size else float("nan"),
    }
    stats["gap"] = stats["positive_mean"] - stats["negative_mean"]
    # Probability that a random matching pair scores above a random non-matching one (ROC AUC).
    if negative.size:
        both = np.concatenate([positive, negative])
        order = both.argsort(kind="stable")
        rank = np.empty(len(both))
        rank[order] = np.arange(1, len(both) + 1)
        stats["auc"] = float(
            (rank[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * negative.size)
        )
    return stats, positive, negative


def zero_shot_accuracy(
    image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Zero-shot classification: each image is assigned the class whose (prompt-averaged) embedding is closest.

    Returns top-k accuracy for each k (up to the number of classes) and the mean per-class recall (top-1).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    scores = image_emb.float() @ class_emb.float().t()
    true = scores.gather(1, labels[:, None])
    rank = (scores >= true).sum(1)  # 1-based, the true class included; ties count against the image
    out = {f"top{k}": float((rank <= k).double().mean()) for k in ks if k <= class_emb.shape[0]}
    per_class = [float((rank[labels == c] == 1).double().mean()) for c in labels.unique()]
    out["mean_per_class_recall"] = float(np.mean(per_class))
    return out
