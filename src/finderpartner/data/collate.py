"""Batches: stack uint8 images, tokenise captions (in the worker), drop samples that failed to load."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .dataset import Skipped


@dataclass
class Batch:
    """A (micro-)batch of pairs. ``pixel_values`` are uint8; the trainer normalises them on the device."""

    index: torch.Tensor
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            move(self.index), move(self.pixel_values), move(self.input_ids), move(self.attention_mask), self.skipped
        )

    def split(self, size: int) -> list[Batch]:
        """Consecutive micro-batches of at most ``size`` pairs (the order of the contrastive batch is kept)."""
        parts = zip(*(t.split(size) for t in (self.index, self.pixel_values, self.input_ids, self.attention_mask)))
        return [Batch(*p) for p in parts]

    def pin_memory(self) -> Batch:  # called by the DataLoader's pin-memory thread on CUDA
        pin = lambda t: t.pin_memory()  # noqa: E731
        return Batch(self.index, pin(self.pixel_values), pin(self.input_ids), pin(self.attention_mask), self.skipped)


Tokenize = Callable[[list[str]], Mapping[str, torch.Tensor]]  # captions -> input_ids, attention_mask


class Collator:
    """Builds a ``Batch``; captions are tokenised here so that the work runs in the DataLoader workers.

    ``tokenize`` is the model's own (``DualEncoder.text_tokenizer()``: picklable, without the model), so
    training tokenises exactly as evaluation and search do.
    """

    def __init__(self, tokenize: Tokenize):
        self._tokenize = tokenize

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tokenize(captions)
        return enc["input_ids"], enc["attention_mask"]

    def __call__(self, samples: list[dict[str, Any] | Skipped]) -> Batch:
        good = [s for s in samples if not isinstance(s, Skipped)]
        skipped = [s for s in samples if isinstance(s, Skipped)]
        if not good:
            empty = torch.zeros(0, dtype=torch.long)
            return Batch(empty, torch.zeros(0, 3, 1, 1, dtype=torch.uint8), empty.view(0, 1), empty.view(0, 1), skipped)
        ids, mask = self.tokenize([s["caption"] for s in good])
        return Batch(
            torch.tensor([s["index"] for s in good]),
            torch.stack([s["pixel_values"] for s in good]),
            ids,
            mask,
            skipped,
        )
