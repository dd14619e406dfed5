"""Embedding many images and texts in batches, and the fingerprint that says which model made the vectors.

Evaluation, gallery indexing, search and export verification all embed through the loops here; the loops
take an encoding function, so the PyTorch model (``Searcher``, ``embed_images``) and the ONNX runtime
(``onnx_runtime.OnnxSearcher``) share them. Nothing here knows about indexes or reports: those modules
import this one, never the other way round.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.dataset import ImageFileDataset, Skipped
from .data.transforms import EvalTransform, ImageSpec
from .env import autocast_factory
from .model import DualEncoder
from .progress import Progress
from .signals import ignore_in_worker

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
Failures = list[tuple[int, str]]  # (row, reason) of each image that could not be read: its row is NaN


def _collate(samples: list[Any]) -> tuple[list[int], torch.Tensor | None, list[Any]]:
    good = [s for s in samples if not isinstance(s, Skipped)]
    bad = [s for s in samples if isinstance(s, Skipped)]
    pixels = torch.stack([s["pixel_values"] for s in good]) if good else None
    return [s["index"] for s in good], pixels, bad


def embed_image_files(
    paths: Sequence[Any],
    spec: ImageSpec,
    encode: Callable[[torch.Tensor], np.ndarray],
    dim: int,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    max_pixels: int | None = None,
    pin_memory: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, Failures]:
    """Embed image files (or encoded image bytes, or PIL images) with ``encode`` (uint8 pixels (B, 3, H, W) -> (B, dim)).

    Unreadable files are NaN rows and listed as (row, reason). Decoding and the model's preprocessing
    (EvalTransform) run in ``num_workers`` DataLoader processes. Evaluation, indexing and search all embed here.
    """
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    failures: Failures = []
    loader = DataLoader(
        ImageFileDataset(list(paths), EvalTransform(spec), max_pixels),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        generator=torch.Generator(),  # leave the global RNG stream alone (exact resumes)
        worker_init_fn=ignore_in_worker,  # Ctrl-C / SIGTERM stop the main process, which stops its workers
    )
    for rows, pixels, bad in Progress(loader, desc="embedding images", unit="batch", disable=not progress, leave=False):
        failures += [(s.index, s.reason) for s in bad]
        if pixels is not None:
            out[rows] = encode(pixels)
    return out, failures


@torch.no_grad()
def embed_images(
    encoder: DualEncoder,
    paths: Sequence[Any],
    *,
    autocast: Autocast = contextlib.nullcontext,
    batch_size: int = 256,
    num_workers: int = 0,
    max_pixels: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, Failures]:
    """Normalised embeddings (float32, CPU) of image files (or encoded bytes, or PIL images); unreadable ones are NaN rows, listed."""
    encoder.model.eval()

    def encode(pixels: torch.Tensor) -> np.ndarray:
        with autocast():
            return encoder.encode_images(pixels).float().cpu().numpy()

    out, failures = embed_image_files(
        paths,
        encoder.image_spec,
        encode,
        encoder.embed_dim,
        batch_size=batch_size,
        num_workers=num_workers,
        max_pixels=max_pixels,
        pin_memory=encoder.device.type == "cuda",
        progress=progress,
    )
    return torch.from_numpy(out), failures


@torch.no_grad()
def embed_texts(
    encoder: DualEncoder,
    texts: Sequence[str],
    *,
    autocast: Autocast = contextlib.nullcontext,
    batch_size: int = 256,
) -> torch.Tensor:
    """Normalised text embeddings (float32, CPU)."""
    encoder.model.eval()
    parts = []
    for start in range(0, len(texts), batch_size):
        with autocast():
            parts.append(encoder.encode_texts(texts[start : start + batch_size]).cpu())
    return torch.cat(parts) if parts else torch.empty((0, encoder.embed_dim))


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's config and weights: equal exactly when the embeddings would be.

    Bookkeeping (where the model was loaded from, which transformers wrote it) is left out: the same weights
    reached through another path embed the same, and an index built from them stays valid.
    """
    h = hashlib.sha256(json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "finderpartner_train_batch_size",  # how it was trained, not what it computes
}  # the weights' bytes tell the dtype


def _stable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without bookkeeping keys ('_name_or_path', versions, dtype), at every level."""
    return {
        k: _stable_config(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }


class Searcher:
    """A PyTorch model ready to embed galleries and queries: what ``search``, ``index``, ``src/main.py`` and the demo use.

    It provides what ``index.Embedder`` asks for; ``onnx_runtime.OnnxSearcher`` is the same with an export folder.
    """

    def __init__(
        self,
        encoder: DualEncoder,
        *,
        device: torch.device,
        precision: str = "fp32",
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        self.encoder = encoder
        self.device = device
        self.autocast = autocast_factory(device, precision)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.model = encoder.model.to(device).eval()
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the factor cosines are multiplied by (then a softmax, or for SigLIP + bias, a sigmoid)."""
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's bias (``DualEncoder.logit_bias``): probabilities are sigmoids, not a softmax; None for CLIP."""
        return self.encoder.logit_bias

    def embed_paths(self, paths: Sequence[Path], progress: bool = False) -> tuple[np.ndarray, Failures]:
        vectors, failures = embed_images(
            self.encoder,
            paths,
            autocast=self.autocast,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=progress,
        )
        return vectors.numpy(), failures

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return embed_texts(self.encoder, list(texts), autocast=self.autocast, batch_size=self.batch_size).numpy()
