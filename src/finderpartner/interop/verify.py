"""Checking an export: onnxruntime against PyTorch on real inputs (parity of every graph and variant, top-1
agreement) and latency; ``finderpartner export`` runs it after writing the folder."""

from __future__ import annotations

import csv
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.files import scan_images
from ..data.transforms import load_image, normalize
from ..errors import ExportError
from ..model import DualEncoder, encode_image, encode_text
from ..progress import Progress
from .export import PARITY_COSINE, PARITY_LOGITS
from .onnx_runtime import (
    COMBINED,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    OnnxEncoders,
    graph_file,
    load_export_info,
    load_onnx_encoders,
    open_session,
)

log = logging.getLogger(__name__)


@dataclass
class Parity:
    """How closely one graph reproduces fp32 PyTorch on the verification inputs."""

    graph: str
    variant: str
    rows: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float | None = None  # text->image top-1 equal to PyTorch's, on the verification set


@dataclass
class Latency:
    graph: str
    batch: int
    torch_ms: float
    onnx_ms: dict[str, float]  # variant -> median milliseconds per batch


@dataclass
class Verification:
    images: int
    captions: int
    parity: list[Parity] = field(default_factory=list)
    logits_max_abs_diff: float = float("nan")  # fp32 model.onnx against PyTorch
    logits_tolerance: float = float("inf")  # PARITY_LOGITS x the model's logit scale
    latency: list[Latency] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        embeddings = all(p.min_cosine >= PARITY_COSINE for p in self.parity if p.variant == "fp32")
        return embeddings and self.logits_max_abs_diff <= self.logits_tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "threshold_cosine": PARITY_COSINE}


def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, float]:
    """(max abs diff, min cosine, mean cosine) between matching rows."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    cos = (ref * cand).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1) + 1e-12)
    return float(np.abs(ref - cand).max()), float(cos.min()), float(cos.mean())


def read_verification_inputs(images: Path, captions: Path | None, limit: int = 32) -> tuple[list[Path], list[str]]:
    """Up to ``limit`` image files under ``images`` and captions from a CSV (``caption`` column) or text file."""
    paths = [images / name for name in list(scan_images(images))[:limit]]
    if not paths:
        raise ExportError(f"no images under {images} to verify the export with")
    texts: list[str] = []
    if captions is not None:
        try:
            if captions.suffix.lower() == ".csv":
                with open(captions, encoding="utf-8-sig", newline="") as f:
                    texts = [row["caption"] for row in csv.DictReader(f) if row.get("caption")]
            else:
                texts = [line.strip() for line in captions.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, KeyError, UnicodeDecodeError, csv.Error) as e:  # csv.Error: e.g. a 10 MB field
            raise ExportError(
                f"cannot read captions from {captions} ({e}): give a CSV with a caption column "
                "or a text file with one caption per line"
            ) from None
    texts = list(dict.fromkeys(texts))[:limit] or ["a photo", "a photo of a person", "a large red circle on the left"]
    return paths, texts


def preprocess_images(encoder: DualEncoder, paths: Sequence[Path]) -> torch.Tensor:
    """Real image files through the model's inference preprocessing, normalised: what the ONNX graphs take."""
    return normalize(encoder.preprocess([load_image(p) for p in paths]), encoder.image_spec)


def verify_export(
    encoder: DualEncoder,
    export_dir: str | Path,
    images: Sequence[Path],
    captions: Sequence[str],
    *,
    latency_batches: Sequence[int] = (1, 8, 32),
    progress: bool = False,
) -> Verification:
    """Run PyTorch and every exported graph on the same real inputs; compare embeddings and logits, time them."""
    if not images or not captions:
        raise ExportError("verification needs at least one image and one caption")
    model = encoder.model.cpu().float().eval()
    folder = Path(export_dir)
    info = load_export_info(folder)
    pixels = preprocess_images(encoder, images)
    tokens = encoder.tokenize(captions)
    with torch.no_grad():
        ref_img = encode_image(model, pixels).numpy()
        ref_txt = encode_text(model, tokens["input_ids"], tokens["attention_mask"]).numpy()
    # the logits PyTorch's model means: exp(logit_scale) * cosine (+ a SigLIP model's bias), per text
    scale = float(model.logit_scale.detach().float().exp())
    ref_logits = scale * ref_txt @ ref_img.T + (encoder.logit_bias or 0.0)
    report = Verification(images=len(images), captions=len(captions), logits_tolerance=PARITY_LOGITS * scale)
    variants = ["fp32", *info.get("variants", {})]
    for variant in Progress(variants, desc="verifying with onnxruntime", disable=not progress, leave=False):
        onnx_enc = load_onnx_encoders(folder, variant=variant)
        img = onnx_enc.encode_pixels(pixels.numpy())
        txt = onnx_enc.encode_texts(list(captions))
        agree = float(np.mean((txt @ img.T).argmax(1) == (ref_txt @ ref_img.T).argmax(1)))
        report.parity.append(Parity(IMAGE_ENCODER, variant, len(img), *compare(ref_img, img)))
        report.parity.append(Parity(TEXT_ENCODER, variant, len(txt), *compare(ref_txt, txt), top1_agreement=agree))
        out = run_combined(graph_file(folder, info, COMBINED, variant), pixels.numpy(), onnx_enc.tokenize(captions))
        for name, ref in (("image_embeds", ref_img), ("text_embeds", ref_txt)):
            report.parity.append(Parity(f"{COMBINED}.{name}", variant, len(ref), *compare(ref, out[name])))
        if variant == "fp32":
            report.logits_max_abs_diff = max(
                float(np.abs(out["logits_per_text"] - ref_logits).max()),
                float(np.abs(out["logits_per_image"] - ref_logits.T).max()),
            )
    report.latency = measure_latency(model, encoder, folder, variants, pixels, list(captions), latency_batches)
    return report


def run_combined(path: Path, pixel_values: np.ndarray, tokens: dict[str, np.ndarray]) -> dict[str, Any]:
    """The zero-shot graph's outputs, by name, for normalised pixels and tokenised texts."""
    session = open_session(path)
    feed = {"pixel_values": np.ascontiguousarray(pixel_values, np.float32), **tokens}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: feed[i.name] for i in session.get_inputs()})))


def median_ms(fn: Callable[[], Any], *, min_seconds: float = 0.3, max_runs: int = 50, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds (after warm-up runs)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < 3 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def _repeat(x: Any, n: int) -> Any:
    """The first ``n`` rows of ``x``, cycling when it has fewer."""
    idx = np.arange(n) % len(x)
    return x[idx] if not isinstance(x, list) else [x[i] for i in idx]


def measure_latency(
    model: nn.Module,
    encoder: DualEncoder,
    folder: Path,
    variants: Sequence[str],
    pixels: torch.Tensor,
    captions: list[str],
    batches: Sequence[int],
) -> list[Latency]:
    """Per batch size: PyTorch (fp32, eager) vs each ONNX variant, for both encoders, on the same inputs.

    onnxruntime gets as many threads as PyTorch uses, so the comparison is of the runtimes, not of thread counts.
    """
    sessions = {v: load_onnx_encoders(folder, variant=v, threads=torch.get_num_threads()) for v in variants}
    rows = []
    for batch in batches:
        rows += _latency_at(model, encoder, sessions, _repeat(pixels, batch), _repeat(captions, batch))
    return rows


def _latency_at(
    model: nn.Module,
    encoder: DualEncoder,
    sessions: dict[str, OnnxEncoders],
    pixels: torch.Tensor,
    texts: list[str],
) -> list[Latency]:
    """Both encoders at one batch size: PyTorch, then each onnxruntime variant, on the same inputs."""
    tok = encoder.tokenize(texts)
    with torch.inference_mode():
        t_img = median_ms(functools.partial(encode_image, model, pixels))
        t_txt = median_ms(functools.partial(encode_text, model, tok["input_ids"], tok["attention_mask"]))
    px = pixels.numpy()
    onnx_img = {v: median_ms(functools.partial(s.encode_pixels, px)) for v, s in sessions.items()}
    onnx_txt = {
        v: median_ms(functools.partial(s.text_session.run, None, s.tokenize(texts))) for v, s in sessions.items()
    }
    return [Latency(IMAGE_ENCODER, len(texts), t_img, onnx_img), Latency(TEXT_ENCODER, len(texts), t_txt, onnx_txt)]


def format_verification(report: Verification) -> str:
    """Parity and latency tables for the terminal."""
    lines = [
        (
            f"parity with PyTorch fp32 on {report.images} images and {report.captions} captions "
            f"(fp32 must reach cosine >= {PARITY_COSINE}):"
        ),
        f"  {'graph':<20}{'variant':<9}{'max |diff|':>12}{'min cos':>12}{'mean cos':>12}{'top-1 same':>12}",
    ]
    for p in report.parity:
        agree = f"{p.top1_agreement:>12.3f}" if p.top1_agreement is not None else f"{'':>12}"
        lines.append(
            f"  {p.graph:<20}{p.variant:<9}{p.max_abs_diff:>12.2e}{p.min_cosine:>12.6f}{p.mean_cosine:>12.6f}{agree}"
        )
    lines.append(
        f"  model.onnx logits vs PyTorch's: max |diff| {report.logits_max_abs_diff:.2e} "
        f"(must be <= {report.logits_tolerance:.2e})"
    )
    variants = list(report.latency[0].onnx_ms) if report.latency else []
    lines += [
        "",
        "latency, median ms per batch (CPU unless a GPU provider was used):",
        f"  {'graph':<14}{'batch':>6}{'torch':>10}"
        + "".join(f"{'onnx ' + v:>12}" for v in variants)
        + f"{'speed-up':>10}",
    ]
    for r in report.latency:
        cells = "".join(f"{r.onnx_ms[v]:>12.2f}" for v in variants)
        lines.append(f"  {r.graph:<14}{r.batch:>6}{r.torch_ms:>10.2f}{cells}{r.torch_ms / r.onnx_ms['fp32']:>9.2f}x")
    lines.append("")
    lines.append("export verified" if report.ok else "EXPORT DOES NOT MATCH PYTORCH")
    return "\n".join(lines)
