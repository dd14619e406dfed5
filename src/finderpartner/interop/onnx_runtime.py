"""Reading an ONNX export folder (``finderpartner export`` writes it): onnxruntime sessions, the tokenizer and
preprocessing saved with it, and ``OnnxSearcher``, which embeds galleries and queries with them.

Separate from ``export.py`` (which writes exports and needs the PyTorch model): search, indexing and the demo
use an export without the exporting code, and ``export.py`` uses this module to verify what it wrote. Graphs are
found through the folder's ``finderpartner_export.json`` (its ``files`` and ``variants``), so folders of the
earlier layout (format 1: ``image_encoder.onnx``, ``text_encoder.onnx``, ``clip.onnx``) are still searched.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..data.transforms import ImageSpec, normalize
from ..embedding import Failures, embed_image_files
from ..errors import ExportError
from ..model import image_spec_of, tokenize_texts

EXPORT_INFO = "finderpartner_export.json"
# 2: onnx/ holds model.onnx, text_model.onnx, vision_model.onnx sharing one weights file (model.onnx_data);
# 3: each graph holds its own weights (or data files named after it), the int8 graphs are *_quantized.onnx
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
# The graphs' roles (keys of the info's ``files``): the two encoders search uses, and the zero-shot model
IMAGE_ENCODER, TEXT_ENCODER, COMBINED = "image_encoder", "text_encoder", "clip"
ONNX_DIR = "onnx"  # as transformers.js lays a model out: config and preprocessing at the top, graphs in onnx/
GRAPH_STEMS = {COMBINED: "model", IMAGE_ENCODER: "vision_model", TEXT_ENCODER: "text_model"}
# transformers.js's file suffixes: its dtype q8 (a browser's default) reads *_quantized.onnx, fp16 *_fp16.onnx
VARIANT_SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_quantized"}


def require_optional(module: str) -> Any:
    """Import an optional ONNX dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"ONNX export and inference need {module.split('.')[0]}: pip install 'finderpartner[onnx]'"
        ) from None


def variant_file(role: str, variant: str = "fp32") -> str:
    """Where this version writes a graph, relative to the export folder: ``onnx/model.onnx``,
    ``onnx/text_model_quantized.onnx``, ... (transformers.js's names: ``_fp16``, ``_quantized`` for int8)."""
    return f"{ONNX_DIR}/{GRAPH_STEMS[role]}{VARIANT_SUFFIXES[variant]}.onnx"


def graph_file(folder: Path, info: dict[str, Any], role: str, variant: str = "fp32") -> Path:
    """The file of a graph in an export folder, as its info file lists it (any readable format)."""
    files = info.get("files", {}) if variant == "fp32" else info.get("variants", {}).get(variant, {})
    try:
        return folder / str(files[role])
    except (KeyError, TypeError):
        raise ExportError(
            f"{folder / EXPORT_INFO} lists no {role} graph"
            + ("" if variant == "fp32" else f" for the {variant} variant")
            + "; export the model again"
        ) from None


def onnx_tool_errors() -> tuple[type[BaseException], ...]:
    """What onnx and onnxruntime raise for a graph they cannot handle: their C++ errors derive from Exception only."""
    onnx = require_optional("onnx")
    state = require_optional("onnxruntime.capi.onnxruntime_pybind11_state")
    return (
        RuntimeError,
        ValueError,
        onnx.shape_inference.InferenceError,
        onnx.checker.ValidationError,
        state.Fail,
        state.InvalidGraph,
        state.InvalidArgument,
        state.NotImplemented,
        state.RuntimeException,
    )


def load_export_info(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / EXPORT_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        hint = (
            " (it is a model folder: export it first with `finderpartner export --model M --out DIR`)"
            if (Path(export_dir) / "config.json").is_file()
            else ""
        )
        raise ExportError(f"{export_dir} is not an ONNX export folder: it has no {EXPORT_INFO}{hint}") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({e}); export the model again") from None
    if info.get("format") not in READABLE_FORMATS:
        raise ExportError(f"{export_dir} was written by another version (format {info.get('format')}); export again")
    return info


def image_spec_from_folder(folder: str | Path) -> ImageSpec:
    """The model's preprocessing (resize, crop, mean, std) from a saved ``preprocessor_config.json``."""
    path = Path(folder) / "preprocessor_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        size = cfg["size"] if isinstance(cfg["size"], dict) else {"shortest_edge": cfg["size"]}
        crop = cfg.get("crop_size")
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        processor = SimpleNamespace(
            size=size,
            crop_size=crop,
            do_center_crop=cfg.get("do_center_crop", True),
            image_mean=cfg["image_mean"],
            image_std=cfg["image_std"],
        )
        return image_spec_of(processor)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(
            f"{path} is missing or incomplete ({type(e).__name__}: {e}); export the model again"
        ) from None


def providers_for(device: str = "cpu") -> list[str]:
    """onnxruntime execution providers: CUDA first when asked for (or 'auto') and available, always CPU."""
    ort = require_optional("onnxruntime")
    available = ort.get_available_providers()
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ExportError(
            "--device cuda: this onnxruntime has no CUDA provider; pip install onnxruntime-gpu or use cpu"
        )
    return ["CPUExecutionProvider"]


def open_session(
    path: Path, providers: Sequence[str] | None = None, threads: int | None = None, *, spin: bool = True
) -> Any:
    """An onnxruntime session; ``threads`` pins its intra-op thread count (default: onnxruntime's choice).

    ``spin=False`` for a server: onnxruntime's threads otherwise busy-wait after each run for the next one, CPU
    that the same process's HTTP and vector-search threads need (serve at concurrency 8, 1M store: 17 -> 13 ms of
    server CPU per request). Batch jobs keep the spinning: there the next run follows at once.
    """
    ort = require_optional("onnxruntime")
    if not path.is_file():
        raise ExportError(
            f"{path} is missing; export the model again"
            + (" with --fp16/--int8" if any(v in path.name for v in ("fp16", "int8")) else "")
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings (unused initializers, ...) are not actionable
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))


@dataclass
class OnnxEncoders:
    """The two exported encoders with their tokenizer and preprocessing: embeds raw texts and pixels."""

    folder: Path
    info: dict[str, Any]
    tokenizer: Any
    image_spec: ImageSpec
    image_session: Any
    text_session: Any
    variant: str = "fp32"

    @property
    def context_length(self) -> int:
        return int(self.info["context_length"])

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Normalised float32 (B, 3, H, W) -> L2-normalised embeddings."""
        return self.image_session.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})[0]

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = tokenize_texts(self.tokenizer, texts, self.context_length, tensors="np")
        wanted = {i.name for i in self.text_session.get_inputs()}
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in wanted}

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        parts = [
            self.text_session.run(None, self.tokenize(texts[i : i + batch_size]))[0]
            for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, int(self.info["embed_dim"])), np.float32)


def load_onnx_encoders(
    export_dir: str | Path, *, variant: str = "fp32", device: str = "cpu", threads: int | None = None, spin: bool = True
) -> OnnxEncoders:
    """Open an export folder for inference with onnxruntime (``variant``: fp32, or fp16/int8 if exported)."""
    folder = Path(export_dir)
    info = load_export_info(folder)
    if variant != "fp32" and variant not in info.get("variants", {}):
        raise ExportError(f"{folder} has no {variant} variant; export it with --{variant}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the tokenizer saved in {folder} ({e}); export the model again") from None
    providers = providers_for(device)
    return OnnxEncoders(
        folder=folder,
        info=info,
        tokenizer=tokenizer,
        image_spec=image_spec_from_folder(folder),
        image_session=open_session(graph_file(folder, info, IMAGE_ENCODER, variant), providers, threads, spin=spin),
        text_session=open_session(graph_file(folder, info, TEXT_ENCODER, variant), providers, threads, spin=spin),
        variant=variant,
    )


class OnnxSearcher:
    """The same as ``embedding.Searcher`` with an export folder: onnxruntime, no PyTorch model.

    The tokenizer and preprocessing come from the export folder; the fingerprint is the source model's, so
    indexes are shared with ``Searcher``. ``variant`` picks fp32 or an fp16/int8 export (same fingerprint:
    their embeddings differ from fp32 by the accuracy cost that ``export`` reported).
    """

    def __init__(
        self,
        export_dir: str | Path,
        *,
        variant: str = "fp32",
        device: str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        spin: bool = True,
    ):
        self.onnx = load_onnx_encoders(export_dir, variant=variant, device=device, spin=spin)
        self.batch_size = batch_size
        self.num_workers = num_workers

    @property
    def fingerprint(self) -> str:
        return str(self.onnx.info["fingerprint"])

    @property
    def source(self) -> str | None:
        """The model folder the export was made from (to find the run's validation images)."""
        return self.onnx.info.get("source")

    @property
    def logit_scale(self) -> float:
        return float(self.onnx.info["logit_scale"])

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's bias (an export of a SigLIP model has one); None for CLIP."""
        bias = self.onnx.info.get("logit_bias")
        return None if bias is None else float(bias)

    def _encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return self.onnx.encode_pixels(normalize(pixels, self.onnx.image_spec).numpy())

    def embed_paths(self, paths: Sequence[Path], progress: bool = False) -> tuple[np.ndarray, Failures]:
        return embed_image_files(
            paths,
            self.onnx.image_spec,
            self._encode_pixels,
            int(self.onnx.info["embed_dim"]),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=progress,
        )

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.onnx.encode_texts(list(texts), batch_size=self.batch_size)
