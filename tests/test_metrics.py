from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finderpartner.metrics import mean_recall, retrieval_metrics, similarity_stats, zero_shot_accuracy

# Hand-computed case: 3 images, 4 captions; caption j belongs to image T2I[j]; captions 0 and 3 share their text.
# Scores are chosen directly: image embeddings are the identity, so score(caption j, image i) = S[j][i].
S = torch.tensor(
    [
        [0.9, 0.1, 0.5],  # c0 "a" (image 0)
        [0.2, 0.8, 0.2],  # c1 "b" (image 0): image 2 ties with image 0 -> tie counts against the query
        [0.3, 0.3, 0.1],  # c2 "c" (image 1): image 0 ties with image 1
        [0.7, 0.0, 0.6],  # c3 "a" (image 2)
    ]
)
T2I = [0, 0, 1, 2]
CAPTIONS = ["a", "b", "c", "a"]


@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_hand_computed_case(chunk: int) -> None:
    m = retrieval_metrics(torch.eye(3), S, T2I, CAPTIONS, chunk_size=chunk)
    # text->image ranks [1, 3, 2, 2]
    assert m["text_to_image"] == {"R@1": 0.25, "R@5": 1.0, "R@10": 1.0, "mean_rank": 2.0, "median_rank": 2.0}
    # image->text: image 0 hits with c0 (any of its captions), image 1's c2 is beaten by c1 -> ranks [1, 2, 1]
    assert m["image_to_text"]["R@1"] == pytest.approx(2 / 3)
    assert m["image_to_text"]["mean_rank"] == pytest.approx(4 / 3)
    assert m["image_to_text"]["median_rank"] == 1.0
    # caption-aware: c3 ("a") also accepts image 0, whose caption c0 is "a" -> ranks [1, 3, 2, 1]
    assert m["text_to_image_caption_aware"] == {
        "R@1": 0.5,
        "R@5": 1.0,
        "R@10": 1.0,
        "mean_rank": 1.75,
        "median_rank": 1.0,
    }
    assert m["image_to_text_caption_aware"]["R@1"] == pytest.approx(2 / 3)


def test_ties_count_against_the_query() -> None:
    # every caption scores the same against every image: each query ranks after all wrong answers
    m = retrieval_metrics(torch.ones(4, 2), torch.ones(4, 2), [0, 1, 2, 3])
    assert m["text_to_image"]["R@1"] == 0.0 and m["text_to_image"]["mean_rank"] == 4.0
    assert m["image_to_text"]["mean_rank"] == 4.0


def test_equals_open_clip_definition_on_random_embeddings() -> None:
    open_clip_train = pytest.importorskip("open_clip_train.train")
    torch.manual_seed(0)
    image = F.normalize(torch.randn(200, 32), dim=-1)
    text = F.normalize(torch.randn(200, 32), dim=-1)
    theirs = open_clip_train.get_clip_metrics(image, text, torch.tensor(1.0))
    ours = retrieval_metrics(image, text, torch.arange(200), chunk_size=37)
    for direction in ("image_to_text", "text_to_image"):
        for key in ("R@1", "R@5", "R@10", "mean_rank", "median_rank"):
            assert ours[direction][key] == pytest.approx(float(theirs[f"{direction}_{key}"])), (direction, key)


def test_chunked_equals_full_with_multiple_captions_and_repeats() -> None:
    torch.manual_seed(1)
    image = F.normalize(torch.randn(150, 16), dim=-1)
    t2i = torch.arange(300) // 2
    captions = [f"caption {j % 70}" for j in range(300)]  # many repeated texts
    text = F.normalize(image[t2i] + 0.8 * torch.randn(300, 16), dim=-1)
    full = retrieval_metrics(image, text, t2i, captions, chunk_size=10_000)
    for chunk in (1, 7, 64):
        assert retrieval_metrics(image, text, t2i, captions, chunk_size=chunk) == full
    assert full["text_to_image_caption_aware"]["R@1"] >= full["text_to_image"]["R@1"]


def test_mean_recall_uses_caption_aware_when_present() -> None:
    m = retrieval_metrics(torch.eye(3), S, T2I, CAPTIONS)
    values = [
        m[d][k] for d in ("image_to_text_caption_aware", "text_to_image_caption_aware") for k in ("R@1", "R@5", "R@10")
    ]
    assert mean_recall(m) == pytest.approx(sum(values) / 6)


def test_zero_shot_accuracy_hand_case() -> None:
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0.2, 0.0], [0.1, 0.0, 0.9], [0.6, 0.5, 0.0], [0.0, 0.0, 1.0]])
    labels = [0, 2, 1, 1]  # image 2 is wrong (class 0 scores higher), image 3 is wrong (class 2)
    acc = zero_shot_accuracy(images, classes, labels, ks=(1, 2))
    assert acc["top1"] == 0.5
    assert acc["top2"] == 0.75  # image 2's true class is second; image 3's true class ties last
    assert acc["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)


def test_similarity_stats_separate_matching_pairs() -> None:
    torch.manual_seed(2)
    image = F.normalize(torch.randn(100, 16), dim=-1)
    text = F.normalize(image + 0.1 * torch.randn(100, 16), dim=-1)
    stats, pos, neg = similarity_stats(image, text, torch.arange(100), num_negatives=5000)
    assert len(pos) == 100 and 0 < len(neg) <= 5000
    assert stats["positive_mean"] > 0.9 and abs(stats["negative_mean"]) < 0.1
    assert stats["auc"] > 0.99 and math.isclose(stats["gap"], stats["positive_mean"] - stats["negative_mean"])
