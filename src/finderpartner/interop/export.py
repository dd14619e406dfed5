"""ONNX export of the dual encoder, and the onnxruntime check that the export computes what PyTorch does.

An export folder is self-contained (everything needed to embed images and texts without PyTorch) and laid out as
Hugging Face's ONNX tools expect a CLIP model: ``optimum.onnxruntime.ORTModelForZeroShotImageClassification``
loads it as it is, and transformers.js loads it with its defaults (its file names, ``transformers.js_config`` in
config.json; tests/test_export_browser.py loads it in headless Chromium).

```
config.json, tokenizer files, preprocessor_config.json   the model's config, tokenizer and image preprocessing
onnx/model.onnx          input_ids, attention_mask (B_txt, L) int64, pixel_values (B_img, 3, H, W) float32,
                         normalised -> logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img),
                         text_embeds (B_txt, D), image_embeds (B_img, D), L2-normalised: optimum's CLIP
                         zero-shot graph (SigLIP models: logits = exp(logit_scale) * cos + logit_bias)
onnx/text_model.onnx     input_ids, attention_mask -> text_embeds      the encoders search uses: the same
onnx/vision_model.onnx   pixel_values -> image_embeds                  nodes, cut out of model.onnx
onnx/*_fp16.onnx, onnx/*_quantized.onnx                  optional smaller variants (--fp16, --int8), laid out alike
finderpartner_export.json                                fingerprint, embedding size, files, versions
```

Each graph holds its own weights (a browser gives a graph only the data files named after it), so the encoders'
weights are on disk twice: in their graph and in model.onnx. A graph whose weights exceed ``INLINE_MAX_BYTES``
keeps them in data files named after it (``text_model.onnx_data``, ``text_model.onnx_data_1``, ...), each under
``DATA_CHUNK_BYTES``, as transformers.js reads them (config.json's ``use_external_data_format`` says how many).
Batch sizes are dynamic everywhere, and so is the text length (up to the model's context length). Reading an
export (and searching with it) is ``onnx_runtime.py``; this module writes and verifies. The
fingerprint is the source model's (``embedding.model_fingerprint``), so a gallery index built with PyTorch is
searched with the export and vice versa.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import platform
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, OutputError
from ..model import VOCAB_FILE_ERRORS, DualEncoder, encode_image, encode_text
from ..outputs import claim_output, marked_files, read_marker, write_output
from ..progress import Progress
from ..tokenizer import save_vocab_files
from .onnx_runtime import (
    COMBINED,
    EXPORT_INFO,
    FORMAT_VERSION,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    onnx_tool_errors,
    require_optional,
    variant_file,
)

log = logging.getLogger(__name__)

PARITY_COSINE = 0.9999  # fp32 ONNX must agree with PyTorch at least this well on every embedding
PARITY_LOGITS = 1 - PARITY_COSINE  # ... and its logits within this times the logit scale (cosines within 1e-4)
EXPORTERS = ("auto", "dynamo", "torchscript")
# What torch.onnx.export raises for a model it cannot export (torch.export's and dynamo's errors are
# RuntimeErrors; the TorchScript tracer also raises the others); anything else is a bug and propagates.
EXPORTER_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError, KeyError)
EXTERNAL_MIN_BYTES = 1024  # in a graph with external data, smaller tensors stay inside the graph
# Protobuf cannot serialise a graph of 2 GiB or more, and a browser reads each file into one ArrayBuffer (at most
# 2 GiB in Chromium): a graph with more weights than this keeps them in data files of at most DATA_CHUNK_BYTES each.
INLINE_MAX_BYTES = 1_800_000_000
DATA_CHUNK_BYTES = 1_800_000_000


# --------------------------------------------------------------------------------------------------------------
# The graph: one module around model.py's encoders, so ONNX and PyTorch compute the same function.


class ZeroShotModel(nn.Module):
    """CLIP's forward with optimum's names: logits between every image and every text, and both embeddings.

    Embeddings come from ``model.encode_image`` / ``encode_text`` (so a towers model pools its texts as it does in
    PyTorch); with a ``bias`` (a SigLIP model's ``logit_bias``) it is added to the logits.
    """

    def __init__(self, model: nn.Module, bias: float | None = None):
        super().__init__()
        self.model = model
        self.bias = bias

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image = encode_image(self.model, pixel_values)
        text = encode_text(self.model, input_ids, attention_mask)
        logits_per_text = self.model.logit_scale.exp() * text @ image.t()
        if self.bias is not None:
            logits_per_text = logits_per_text + self.bias
        return logits_per_text.t(), logits_per_text, text, image


# input name -> {axis: dynamic dimension name}, in the forward's order; the names are optimum's
INPUTS = {
    "input_ids": {0: "text_batch_size", 1: "sequence_length"},
    "pixel_values": {0: "image_batch_size"},
    "attention_mask": {0: "text_batch_size", 1: "sequence_length"},
}
OUTPUTS = {
    "logits_per_image": {0: "image_batch_size", 1: "text_batch_size"},
    "logits_per_text": {0: "text_batch_size", 1: "image_batch_size"},
    "text_embeds": {0: "text_batch_size"},
    "image_embeds": {0: "image_batch_size"},
}
# The encoder graphs cut out of the zero-shot graph: their inputs and outputs
ENCODERS = {
    TEXT_ENCODER: (["input_ids", "attention_mask"], ["text_embeds"]),
    IMAGE_ENCODER: (["pixel_values"], ["image_embeds"]),
}


def _example_inputs(encoder: DualEncoder) -> dict[str, torch.Tensor]:
    """Batch 2 (a batch of 1 could be specialised away) and a padded text batch, so masking is traced too."""
    spec = encoder.image_spec
    enc = encoder.tokenize(["a photo", "a photo of something on the left"])
    return {
        "input_ids": enc["input_ids"],
        "pixel_values": torch.randn(2, 3, spec.crop, spec.crop, generator=torch.Generator().manual_seed(0)),
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


def _export_module(
    module: nn.Module, example: dict[str, torch.Tensor], path: Path, *, exporter: str, opset: int, context_length: int
) -> None:
    """``torch.onnx.export`` of the zero-shot module to ``path`` (weights beside it, as the exporter chooses)."""
    args = tuple(example[name] for name in INPUTS)
    names = {"input_names": list(INPUTS), "output_names": list(OUTPUTS)}
    # The exporters comment on every Python branch they trace through; the parity check after export is
    # what tells whether the graph is right, so their warnings are noise here.
    with warnings.catch_warnings(), contextlib.redirect_stdout(_LogWriter()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            from torch.export import Dim

            dims = {
                "image_batch_size": Dim("image_batch_size"),
                "text_batch_size": Dim("text_batch_size"),
                "sequence_length": Dim("sequence_length", max=context_length),
            }
            shapes = {name: {axis: dims[d] for axis, d in axes.items()} for name, axes in INPUTS.items()}
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                dynamic_shapes=shapes,
                opset_version=opset,
                external_data=True,  # any size; the weights are rewritten into the shared file anyway
                verbose=False,
                **names,
            )
        else:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                dynamic_axes={**INPUTS, **OUTPUTS},
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
# The graphs: the zero-shot graph and the two encoders cut out of it node for node, each with its own weights


def write_graphs(model: Any, folder: Path, variant: str = "fp32") -> tuple[dict[str, str], dict[str, int]]:
    """Write a zero-shot ``onnx.ModelProto`` as ``model.onnx`` and the two encoder graphs cut out of it, each with
    its own weights. Returns role -> file, relative to ``folder`` (the export folder), and file name -> number of
    external-data files, for the graphs too large to hold their weights (transformers.js's
    ``use_external_data_format``)."""
    onnx = require_optional("onnx")
    from onnx.external_data_helper import load_external_data_for_model

    _strip_metadata(model.graph.node)
    for function in model.functions:
        _strip_metadata(function.node)
    _sort_nodes(model.graph)  # the cut keeps the node order, and the checker wants producers first
    files = {role: variant_file(role, variant) for role in (COMBINED, IMAGE_ENCODER, TEXT_ENCODER)}
    combined = folder / files[COMBINED]
    combined.parent.mkdir(parents=True, exist_ok=True)
    # The cut runs shape inference, which serialises the graph: it gets the structure alone, its tensors in a
    # scratch file that each graph then reads back what it needs from (file, offset, length).
    scratch = folder / f".cut-{variant}"
    scratch.mkdir()
    try:
        onnx.save_model(
            model, str(scratch / "all.onnx"), save_as_external_data=True, location="all.onnx_data", size_threshold=0
        )
        structure = onnx.load(str(scratch / "all.onnx"), load_external_data=False)
        extractor = onnx.utils.Extractor(structure)
        chunks = {}
        for role in (*ENCODERS, COMBINED):  # the cut reads ``structure`` itself: it is saved (changed) last
            graph = structure if role == COMBINED else extractor.extract_model(*ENCODERS[role])
            load_external_data_for_model(graph, str(scratch))
            path = folder / files[role]
            if count := _save_graph(graph, path):
                chunks[path.name] = count
            try:
                onnx.checker.check_model(str(path))
            except onnx_tool_errors() as e:  # e.g. a tensor used only inside a control-flow subgraph was left out
                reason = " ".join(str(e).split())[:300]
                raise ExportError(
                    f"{path.name}, cut out of {combined.name}, is not a valid graph ({reason}); "
                    "export with the other --exporter"
                ) from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files, chunks


def _save_graph(graph: Any, path: Path) -> int:
    """Save a graph with its weights inside, or, above ``INLINE_MAX_BYTES``, in data files named after it
    (``<name>.onnx_data``, ``<name>.onnx_data_1``, ...: transformers.js's names), each at most ``DATA_CHUNK_BYTES``.
    Returns the number of data files (0: weights inside)."""
    onnx = require_optional("onnx")
    from onnx.external_data_helper import set_external_data

    tensors = [t for t in _initializers(graph) if t.HasField("raw_data")]
    if sum(len(t.raw_data) for t in tensors) <= INLINE_MAX_BYTES:
        onnx.save_model(graph, str(path))
        return 0
    chunk, used = 0, 0
    for tensor in tensors:
        size = len(tensor.raw_data)
        if size < EXTERNAL_MIN_BYTES:
            continue
        if used and used + size > DATA_CHUNK_BYTES:
            chunk, used = chunk + 1, 0
        set_external_data(tensor, location=f"{path.name}_data" + (f"_{chunk}" if chunk else ""))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        used += size
    onnx.save_model(graph, str(path))  # writes each external tensor's raw data to its file, in order
    return chunk + 1


def _initializers(model: Any) -> list[Any]:
    """Every initializer of a graph, those of its control-flow subgraphs included."""
    found = []

    def walk(graph: Any) -> None:
        found.extend(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                for inner in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    walk(inner)

    walk(model.graph)
    return found


def _sort_nodes(graph: Any) -> None:
    """Order the nodes so that each comes after those whose outputs it reads, otherwise keeping their order.

    onnxruntime's fp16 converter appends the casts of the graph's inputs after the nodes that read them;
    onnxruntime runs that, but the ONNX checker (and the encoder graphs cut out of it) need the order.
    """
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    needs = [{producer[name] for name in _reads(node) if name in producer} - {i} for i, node in enumerate(nodes)]
    readers: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for dep in deps:
            readers.setdefault(dep, []).append(i)
    waiting = [len(deps) for deps in needs]
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for reader in readers.get(i, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) == len(nodes):  # else a cycle: left as it is, for the checker to name
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _reads(node: Any) -> set[str]:
    """The values a node reads: its inputs and what the nodes of its subgraphs (If, Loop branches) read."""
    names = set(node.input)
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            for inner in graph.node:
                names |= _reads(inner)
    return names


def _strip_metadata(nodes: Any) -> None:
    """Drop the per-node metadata the dynamo exporter records (the Python stack trace and FX node of every op,
    with this machine's paths): often larger than a small model's weights, and of no use to a runtime."""
    for node in nodes:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _strip_metadata(attribute.g.node)
            for graph in attribute.graphs:
                _strip_metadata(graph.node)


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
    of the same model is replaced, one of another model only with ``overwrite``, any other folder never; files
    a user added are kept (``outputs.write_output``). The variants an earlier export of the same model wrote and
    this one does not (``--int8`` then ``--fp16``) stay beside the new ones (``_kept_variants``).
    Returns the folder's ``finderpartner_export.json`` content. The model is put in eval mode on the CPU.
    """
    out_dir = Path(out_dir)
    model_dir = source if source and Path(source).is_dir() else None
    state = claim_output(
        out_dir,
        "export",
        {"model": source},
        overwrite=overwrite,
        legacy=_legacy_export,
        protect={"model": model_dir} if model_dir else None,
    )
    wanted = [v for v, on in (("fp16", fp16), ("int8", int8)) if on]
    earlier = _kept_variants(out_dir, wanted, fingerprint, overwrite) if state == "same" else {}
    onnx = require_optional("onnx")
    exporter = resolve_exporter(exporter)
    if exporter == "dynamo":
        require_optional("onnxscript")
    model = encoder.model.cpu().float().eval()
    example = _example_inputs(encoder)
    info: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        scratch = tmp / ".scratch"  # the exporter's own output, rewritten into onnx/ and removed
        scratch.mkdir()
        variants = [v for v, on in (("fp16", fp16), ("int8", int8)) if on]
        bar = Progress(total=1 + len(variants), desc="exporting to ONNX", unit="graph set", disable=not progress)
        with bar, torch.no_grad():
            bar.set_postfix_str("fp32")
            raw = scratch / "model.onnx"
            _export_fp32(encoder, model, example, raw, exporter=exporter, opset=opset)
            files, chunks = write_graphs(onnx.load(str(raw)), tmp)
            bar.update()
            written = {}
            for variant in variants:
                bar.set_postfix_str(variant)
                convert = convert_fp16 if variant == "fp16" else quantize_int8
                written[variant], more = write_graphs(convert(tmp / files[COMBINED], scratch), tmp, variant)
                chunks.update(more)
                bar.update()
        shutil.rmtree(scratch)
        chunks.update(_earlier_chunks(out_dir, earlier))
        _write_preprocessing(encoder, tmp, transformers_js_config([*variants, *earlier], chunks))
        info.update(_info(encoder, fingerprint, exporter, opset, files, {**earlier, **written}, source, chunks))
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")

    chunked = _earlier_chunks(out_dir, earlier)
    graphs = [f for v in earlier for f in earlier[v].values()]
    kept = graphs + [
        str(Path(f).parent / d) for f in graphs for d in _data_names(Path(f).name, chunked.get(Path(f).name, 0))
    ]
    write_output(write, out_dir, "export", {"model": source}, what=f"export folder {out_dir}", keep=kept)
    if earlier:
        log.info("kept the %s variant(s) of the earlier export of this model in %s", ", ".join(earlier), out_dir)
    log.info("exported %s to %s (%s exporter, opset %d)", source or "model", out_dir, exporter, opset)
    return info


def _export_fp32(
    encoder: DualEncoder, model: nn.Module, example: dict[str, torch.Tensor], raw: Path, *, exporter: str, opset: int
) -> None:
    """The exporter's fp32 graph of the zero-shot model at ``raw``; a failure names the other exporter to try."""
    try:
        _export_module(
            ZeroShotModel(model, encoder.logit_bias),
            example,
            raw,
            exporter=exporter,
            opset=opset,
            context_length=encoder.context_length,
        )
    except EXPORTER_ERRORS as e:  # the user needs the gist and a way out
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ExportError(
            f"exporting the model with the {exporter} exporter failed: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}; "
            f"try --exporter {other}"
        ) from e


def _kept_variants(out: Path, wanted: Sequence[str], fingerprint: str, overwrite: bool) -> dict[str, dict[str, str]]:
    """The variants (role -> file) of the earlier export in ``out`` that this export does not write, to keep.

    They stay only when they are exports of this very model (same fingerprint) and are all listed in the folder's
    marker; variants of another version of the model would no longer match fp32: refused, or dropped with
    ``overwrite``.
    """
    try:
        previous = json.loads((out / EXPORT_INFO).read_text(encoding="utf-8"))
        variants = {v: dict(f) for v, f in previous.get("variants", {}).items() if v not in wanted}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}
    if not variants:
        return {}
    if previous.get("fingerprint") != fingerprint:
        if overwrite:
            log.warning("--overwrite: dropping the %s variant(s) of the earlier export in %s", ", ".join(variants), out)
            return {}
        flags = " ".join(f"--{v}" for v in variants)
        raise OutputError(
            f"--out {out} holds the {', '.join(variants)} variant(s) of an earlier export of another version of "
            f"this model (its weights changed since); they would no longer match: pass {flags} to export them "
            "again too, or --overwrite to drop them"
        )
    listed = marked_files(read_marker(out)) or set()
    return {v: f for v, f in variants.items() if set(f.values()) <= listed}


def _earlier_chunks(out: Path, earlier: dict[str, dict[str, str]]) -> dict[str, int]:
    """Graph file name -> number of external-data files, for the graphs of the kept earlier variants."""
    if not earlier:
        return {}
    names = {Path(f).name for files in earlier.values() for f in files.values()}
    try:
        previous = json.loads((out / EXPORT_INFO).read_text(encoding="utf-8")).get("external_data") or {}
        return {name: int(count) for name, count in previous.items() if name in names}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _data_names(graph: str, count: int) -> list[str]:
    """The external-data files of a graph saved by ``_save_graph`` in ``count`` chunks."""
    return [f"{graph}_data" + (f"_{i}" if i else "") for i in range(count)]


def _legacy_export(folder: Path) -> dict[str, Any] | None:
    """The inputs of an export written before output markers existed (its info file names the model)."""
    try:
        return {"model": json.loads((folder / EXPORT_INFO).read_text(encoding="utf-8")).get("source")}
    except (OSError, ValueError, AttributeError):
        return None


def transformers_js_config(variants: Sequence[str], chunks: dict[str, int]) -> dict[str, Any]:
    """config.json's ``transformers.js_config``: what transformers.js needs to load the export with its defaults.

    In a browser it loads the q8 graphs (``*_quantized.onnx``) unless told otherwise: without the int8 variant the
    config names fp32 (``dtype``). ``use_external_data_format`` maps each graph that keeps its weights in data
    files to their number (transformers.js fetches ``<graph>.onnx_data``, ``<graph>.onnx_data_1``, ...).
    """
    config: dict[str, Any] = {} if "int8" in variants else {"dtype": "fp32"}
    if chunks:
        config["use_external_data_format"] = dict(sorted(chunks.items()))
    return config


def _write_preprocessing(encoder: DualEncoder, out: Path, js_config: dict[str, Any] | None = None) -> None:
    """The model's config, tokenizer and image processor: the folder needs nothing else to embed raw text and
    images, and Hugging Face's loaders (optimum, transformers.js) find what they read beside ``onnx/``."""
    encoder.model.config.save_pretrained(out)
    if js_config is not None:  # transformers.js's own key in config.json (other readers keep it as an attribute)
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        config["transformers.js_config"] = js_config
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    encoder.tokenizer.save_pretrained(out)
    encoder.image_processor.save_pretrained(out)
    if not (out / "vocab.json").exists() and getattr(encoder.tokenizer, "is_fast", False):
        # as in model.save_model: transformers 4's slow CLIPTokenizer reads vocab.json/merges.txt
        try:
            save_vocab_files(encoder.tokenizer, out)
        except VOCAB_FILE_ERRORS as e:  # not a BPE tokenizer: tokenizer.json is enough
            log.debug("no vocab.json/merges.txt written: %s", e)


def _info(
    encoder: DualEncoder,
    fingerprint: str,
    exporter: str,
    opset: int,
    files: dict[str, str],
    variants: dict[str, dict[str, str]],
    source: str | None,
    chunks: dict[str, int],
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
        "files": files,
        "external_data": chunks,  # graph file -> its number of data files (none: every graph holds its weights)
        "variants": variants,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": require_optional("onnx").__version__,
            "python": platform.python_version(),
        },
    }


def convert_fp16(src: Path, scratch: Path) -> Any:
    """fp16 weights and activations; inputs and outputs stay float32 so callers need not change."""
    onnx = require_optional("onnx")
    float16 = require_optional("onnxruntime.transformers.float16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about every value clamped into fp16 range
        return float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)


def quantize_int8(src: Path, scratch: Path) -> Any:
    """Dynamic int8 quantization of the matrix multiplications (weights int8, activations quantized per batch)."""
    onnx = require_optional("onnx")
    quantization = require_optional("onnxruntime.quantization")
    inline, prepared, quantized = scratch / "inline.onnx", scratch / "prepared.onnx", scratch / "int8.onnx"
    try:
        # shape inference + graph optimisation first, as onnxruntime recommends for quantization; it cannot
        # follow external data, so it gets a copy with the weights inside (models under protobuf's 2 GB)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        onnx.save_model(onnx.load(str(src)), str(inline))
        quant_pre_process(str(inline), str(prepared), skip_symbolic_shape=True)
    except onnx_tool_errors() as e:  # an optimisation pass that cannot handle the graph: quantize it as exported
        log.debug("quantization pre-processing skipped: %s", e)
        prepared = src
    quantization.quantize_dynamic(
        str(prepared), str(quantized), weight_type=quantization.QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
    )
    return onnx.load(str(quantized))
