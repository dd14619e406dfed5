"""ONNX export of the dual encoder, and the onnxruntime check that the export computes what PyTorch does.

An export folder is self-contained: everything needed to embed images and texts without PyTorch models.

```
image_encoder.onnx    pixel_values (B, 3, H, W) float32, normalised  -> image_embeds (B, D), L2-normalised
text_encoder.onnx     input_ids, attention_mask (B, L) int64         -> text_embeds (B, D), L2-normalised
clip.onnx             all three inputs -> logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)
                      (SigLIP models: exp(logit_scale) * cos + logit_bias, probabilities = their sigmoid)
image_encoder.fp16.onnx, text_encoder.fp16.onnx, *.int8.onnx          optional smaller variants
tokenizer files, preprocessor_config.json                             the model's own tokenizer and preprocessing
finderpartner_export.json                                             fingerprint, embedding size, files, versions
```

Batch size is dynamic everywhere, and so is the text length (up to the model's context length). Reading an
export (and searching with it) is ``onnx_runtime.py``; this module writes and verifies. The
fingerprint is the source model's (``index.model_fingerprint``), so a gallery index built with PyTorch is
searched with the export and vice versa.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.files import scan_images
from .data.transforms import load_image, normalize
from .errors import ExportError
from .model import VOCAB_FILE_ERRORS, DualEncoder, encode_image, encode_text
from .onnx_runtime import (
    COMBINED,
    EXPORT_INFO,
    FORMAT_VERSION,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    OnnxEncoders,
    load_export_info,
    load_onnx_encoders,
    onnx_tool_errors,
    open_session,
    require_optional,
    variant_file,
)
from .outputs import claim_output, replace_dir, write_marker
from .progress import Progress
from .tokenizer import save_vocab_files

log = logging.getLogger(__name__)

PARITY_COSINE = 0.9999  # fp32 ONNX must agree with PyTorch at least this well on every embedding
EXPORTERS = ("auto", "dynamo", "torchscript")
# What torch.onnx.export raises for a model it cannot export (torch.export's and dynamo's errors are
# RuntimeErrors; the TorchScript tracer also raises the others); anything else is a bug and propagates.
EXPORTER_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError, KeyError)


# --------------------------------------------------------------------------------------------------------------
# The graphs: thin modules around model.py's encoders, so ONNX and PyTorch compute the same function.


class ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return encode_image(self.model, pixel_values)


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encode_text(self.model, input_ids, attention_mask)


class ClipLogits(nn.Module):
    """CLIP's forward: scaled cosine similarities between every image and every text.

    With a ``bias`` (a SigLIP model's ``logit_bias``) it is added: the logits whose sigmoid is the probability.
    """

    def __init__(self, model: nn.Module, bias: float | None = None):
        super().__init__()
        self.model = model
        self.bias = bias

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = encode_image(self.model, pixel_values)
        text = encode_text(self.model, input_ids, attention_mask)
        logits_per_text = self.model.logit_scale.exp() * text @ image.t()
        if self.bias is not None:
            logits_per_text = logits_per_text + self.bias
        return logits_per_text.t(), logits_per_text


@dataclass(frozen=True)
class _Graph:
    name: str
    module: nn.Module
    inputs: dict[str, dict[int, str]]  # input name -> {axis: dynamic dimension name}
    outputs: dict[str, dict[int, str]]


def _graphs(model: nn.Module, bias: float | None = None) -> list[_Graph]:
    text_in = {"input_ids": {0: "text_batch", 1: "sequence"}, "attention_mask": {0: "text_batch", 1: "sequence"}}
    logits = {"logits_per_image": {0: "batch", 1: "text_batch"}, "logits_per_text": {0: "text_batch", 1: "batch"}}
    return [
        _Graph(IMAGE_ENCODER, ImageEncoder(model), {"pixel_values": {0: "batch"}}, {"image_embeds": {0: "batch"}}),
        _Graph(TEXT_ENCODER, TextEncoder(model), text_in, {"text_embeds": {0: "text_batch"}}),
        _Graph(COMBINED, ClipLogits(model, bias), {"pixel_values": {0: "batch"}, **text_in}, logits),
    ]


def _example_inputs(encoder: DualEncoder) -> dict[str, torch.Tensor]:
    """Batch 2 (a batch of 1 could be specialised away) and a padded text batch, so masking is traced too."""
    spec = encoder.image_spec
    enc = encoder.tokenize(["a photo", "a photo of something on the left"])
    return {
        "pixel_values": torch.randn(2, 3, spec.crop, spec.crop, generator=torch.Generator().manual_seed(0)),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }


def resolve_exporter(exporter: str) -> str:
    """'dynamo' (torch.export, needs onnxscript and torch >= 2.6) when available, else the TorchScript exporter.

    torch 2.5's dynamo exporter fails on BERT-like text towers (tested: the towers model), so auto skips it there.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter != "auto":
        return exporter
    from packaging.version import Version

    if Version(torch.__version__.split("+")[0]) < Version("2.6"):
        return "torchscript"
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "torchscript"
    return "dynamo"


def _export_graph(
    graph: _Graph, example: dict[str, torch.Tensor], path: Path, *, exporter: str, opset: int, context_length: int
) -> None:
    args = tuple(example[name] for name in graph.inputs)
    names = {"input_names": list(graph.inputs), "output_names": list(graph.outputs)}
    # The exporters comment on every Python branch they trace through; the parity check after export is
    # what tells whether the graph is right, so their warnings are noise here.
    with warnings.catch_warnings(), contextlib.redirect_stdout(_LogWriter()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            from torch.export import Dim

            dims = {
                "batch": Dim("batch"),
                "text_batch": Dim("text_batch"),
                "sequence": Dim("sequence", max=context_length),
            }
            shapes = {name: {axis: dims[d] for axis, d in axes.items()} for name, axes in graph.inputs.items()}
            big = sum(p.numel() * p.element_size() for p in graph.module.parameters()) > 1.5 * 2**30
            torch.onnx.export(
                graph.module,
                args,
                str(path),
                dynamo=True,
                dynamic_shapes=shapes,
                opset_version=opset,
                external_data=big,
                verbose=False,
                **names,
            )
        else:
            torch.onnx.export(
                graph.module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                dynamic_axes={**graph.inputs, **graph.outputs},
                **names,
            )


class _LogWriter:
    """Where the dynamo exporter's progress prints go: the debug log, not the user's stdout (or --json)."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("exporter: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------
# Writing the folder


def export_onnx(
    encoder: DualEncoder,
    out_dir: str | Path,
    *,
    fingerprint: str,
    fp16: bool = False,
    int8: bool = False,
    exporter: str = "auto",
    opset: int = 18,
    source: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the export folder (atomically: an existing one is replaced only when the new one is complete).

    The folder follows the output rule (``outputs.claim_output``): never the model folder or inside it; an export
    of the same model is replaced, one of another model only with ``overwrite``, any other folder never.
    Returns the folder's ``finderpartner_export.json`` content. The model is put in eval mode on the CPU.
    """
    out_dir = Path(out_dir)
    model_dir = source if source and Path(source).is_dir() else None
    claim_output(
        out_dir,
        "export",
        {"model": source},
        overwrite=overwrite,
        legacy=_legacy_export,
        protect={"model": model_dir} if model_dir else None,
    )
    require_optional("onnx")
    exporter = resolve_exporter(exporter)
    if exporter == "dynamo":
        require_optional("onnxscript")
    model = encoder.model.cpu().float().eval()
    example = _example_inputs(encoder)
    info: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        steps = _graphs(model, encoder.logit_bias)
        variants = [v for v, on in (("fp16", fp16), ("int8", int8)) if on]
        bar = Progress(
            total=len(steps) + 2 * len(variants), desc="exporting to ONNX", unit="graph", disable=not progress
        )
        with bar, torch.no_grad():
            for graph in steps:
                bar.set_postfix_str(graph.name)
                try:
                    _export_graph(
                        graph,
                        example,
                        tmp / variant_file(graph.name),
                        exporter=exporter,
                        opset=opset,
                        context_length=encoder.context_length,
                    )
                except EXPORTER_ERRORS as e:  # the user needs the gist and a way out
                    other = "torchscript" if exporter == "dynamo" else "dynamo"
                    raise ExportError(
                        f"exporting {graph.name} with the {exporter} exporter failed: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}; "
                        f"try --exporter {other}"
                    ) from e
                bar.update()
            for variant in variants:
                for name in (IMAGE_ENCODER, TEXT_ENCODER):
                    bar.set_postfix_str(f"{name} {variant}")
                    convert = convert_fp16 if variant == "fp16" else quantize_int8
                    convert(tmp / variant_file(name), tmp / variant_file(name, variant))
                    bar.update()
        _write_preprocessing(encoder, tmp)
        info.update(_info(encoder, fingerprint, exporter, opset, variants, source))
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        write_marker(tmp, "export", {"model": source})

    replace_dir(write, out_dir, what=f"export folder {out_dir}")
    log.info("exported %s to %s (%s exporter, opset %d)", source or "model", out_dir, exporter, opset)
    return info


def _legacy_export(folder: Path) -> dict[str, Any] | None:
    """The inputs of an export written before output markers existed (its info file names the model)."""
    try:
        return {"model": json.loads((folder / EXPORT_INFO).read_text(encoding="utf-8")).get("source")}
    except (OSError, ValueError, AttributeError):
        return None


def _write_preprocessing(encoder: DualEncoder, out: Path) -> None:
    """The tokenizer and image processor, so the folder needs nothing else to embed raw text and images."""
    encoder.tokenizer.save_pretrained(out)
    encoder.image_processor.save_pretrained(out)
    if not (out / "vocab.json").exists() and getattr(encoder.tokenizer, "is_fast", False):
        # as in model.save_model: transformers 4's slow CLIPTokenizer reads vocab.json/merges.txt
        try:
            save_vocab_files(encoder.tokenizer, out)
        except VOCAB_FILE_ERRORS as e:  # not a BPE tokenizer: tokenizer.json is enough
            log.debug("no vocab.json/merges.txt written: %s", e)


def _info(
    encoder: DualEncoder, fingerprint: str, exporter: str, opset: int, variants: list[str], source: str | None
) -> dict[str, Any]:
    import transformers

    model = encoder.model
    bias = encoder.logit_bias  # SigLIP only: a CLIP export's info is as before
    return {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "embed_dim": int(model.config.projection_dim),
        "context_length": encoder.context_length,
        "image_size": encoder.image_spec.crop,
        "logit_scale": float(model.logit_scale.detach().float().exp()),
        **({"logit_bias": bias} if bias is not None else {}),
        "model_type": type(model).__name__,
        "source": source,
        "exporter": exporter,
        "opset": opset,
        "files": {name: variant_file(name) for name in (IMAGE_ENCODER, TEXT_ENCODER, COMBINED)},
        "variants": {v: {n: variant_file(n, v) for n in (IMAGE_ENCODER, TEXT_ENCODER)} for v in variants},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": require_optional("onnx").__version__,
            "python": platform.python_version(),
        },
    }


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations; inputs and outputs stay float32 so callers need not change."""
    onnx = require_optional("onnx")
    float16 = require_optional("onnxruntime.transformers.float16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about every value clamped into fp16 range
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the matrix multiplications (weights int8, activations quantized per batch)."""
    quantization = require_optional("onnxruntime.quantization")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # shape inference + graph optimisation first, as onnxruntime recommends for quantization
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except onnx_tool_errors() as e:  # an optimisation pass that cannot handle the graph: quantize it as exported
            log.debug("quantization pre-processing skipped: %s", e)
            shutil.copy(src, prepared)
        quantization.quantize_dynamic(
            str(prepared), str(dst), weight_type=quantization.QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )


# --------------------------------------------------------------------------------------------------------------
# Verification: onnxruntime vs PyTorch on real inputs, accuracy of the variants, latency


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
    logits_max_abs_diff: float = float("nan")
    latency: list[Latency] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.min_cosine >= PARITY_COSINE for p in self.parity if p.variant == "fp32")

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
    """Run PyTorch and every exported graph on the same real inputs; compare embeddings and time them."""
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
    report = Verification(images=len(images), captions=len(captions))
    variants = ["fp32", *info.get("variants", {})]
    for variant in Progress(variants, desc="verifying with onnxruntime", disable=not progress, leave=False):
        onnx_enc = load_onnx_encoders(folder, variant=variant)
        img = onnx_enc.encode_pixels(pixels.numpy())
        txt = onnx_enc.encode_texts(list(captions))
        agree = float(np.mean((txt @ img.T).argmax(1) == (ref_txt @ ref_img.T).argmax(1)))
        report.parity.append(Parity(IMAGE_ENCODER, variant, len(img), *compare(ref_img, img)))
        report.parity.append(Parity(TEXT_ENCODER, variant, len(txt), *compare(ref_txt, txt), top1_agreement=agree))
    report.logits_max_abs_diff = _combined_diff(model, folder, pixels, tokens, encoder.logit_bias)
    report.latency = measure_latency(model, encoder, folder, variants, pixels, list(captions), latency_batches)
    return report


def _combined_diff(
    model: nn.Module, folder: Path, pixels: torch.Tensor, tokens: Any, bias: float | None = None
) -> float:
    """Max abs difference of clip.onnx's logits to transformers' own CLIP forward (plus a SigLIP model's bias)."""
    session = open_session(folder / variant_file(COMBINED))
    feed = {
        "pixel_values": pixels.numpy(),
        "input_ids": tokens["input_ids"].numpy(),
        "attention_mask": tokens["attention_mask"].numpy(),
    }
    per_image, per_text = session.run(None, feed)
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    shift = 0.0 if bias is None else bias
    return max(
        float(np.abs(out.logits_per_image.numpy() + shift - per_image).max()),
        float(np.abs(out.logits_per_text.numpy() + shift - per_text).max()),
    )


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
        f"  {'graph':<14}{'variant':<9}{'max |diff|':>12}{'min cos':>12}{'mean cos':>12}{'top-1 same':>12}",
    ]
    for p in report.parity:
        agree = f"{p.top1_agreement:>12.3f}" if p.top1_agreement is not None else f"{'':>12}"
        lines.append(
            f"  {p.graph:<14}{p.variant:<9}{p.max_abs_diff:>12.2e}{p.min_cosine:>12.6f}{p.mean_cosine:>12.6f}{agree}"
        )
    lines.append(f"  clip.onnx logits vs transformers' forward: max |diff| {report.logits_max_abs_diff:.2e}")
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
