"""export (ONNX) and convert (open_clip <-> transformers)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..outputs import claim_files, write_text_atomic
from .common import add_trust_pickle, hidden_alias, new_command, run_split

log = logging.getLogger("finderpartner")


def add_export_command(sub: Any) -> None:
    p = new_command(
        sub,
        "export",
        "export to ONNX in optimum's and transformers.js's layout (model + both encoders), verify with onnxruntime",
        description="""
Export to ONNX in Hugging Face optimum's layout: onnx/model.onnx (logits and both embeddings; it loads in
optimum's ORTModelForZeroShotImageClassification), onnx/text_model.onnx and onnx/vision_model.onnx (L2-normalised
embeddings, for search; transformers.js loads them in a web page), each with its own weights, and config.json,
the tokenizer and preprocessing beside them.
Then verify every graph against PyTorch with onnxruntime on real inputs (max abs diff, cosine, latency);
--fp16 / --int8 also report what the smaller variants cost in accuracy.""",
        examples="""
finderpartner export --model outputs/clip_tiny/best_model --out exports/clip_tiny
finderpartner export --model outputs/clip/best_model --out exports/clip --fp16 --int8""",
    )
    p.add_argument("--model", required=True, help="saved model folder or hub id")
    hidden_alias(p, "--model_path", "--model")
    add_trust_pickle(p)
    p.add_argument(
        "--out", type=Path, required=True, help="export folder (new, or an earlier export of the same model)"
    )
    hidden_alias(p, "--output_dir", "--out")
    p.add_argument("--overwrite", action="store_true", help="replace an export of another model at --out")
    p.add_argument("--fp16", action="store_true", help="also write fp16 encoders (for GPUs) and report their accuracy")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write int8 graphs (dynamic quantization; *_quantized.onnx, transformers.js's q8) and report their "
        "accuracy",
    )
    p.add_argument(
        "--exporter",
        default="auto",
        choices=["auto", "dynamo", "torchscript"],
        help="torch.onnx exporter (auto: dynamo when onnxscript is installed)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--images", type=Path, help="images to verify with (default: the run's validation images)")
    p.add_argument(
        "--captions", type=Path, help="captions to verify with: a CSV with a caption column, or one per line"
    )
    p.add_argument("--verify-count", type=int, default=32, help="images and captions used for verification")
    p.add_argument("--json", action="store_true", help="print the export info and verification as JSON")
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    import tempfile

    from ..embedding import model_fingerprint
    from ..interop.export import ExportError, export_onnx
    from ..interop.verify import format_verification, read_verification_inputs, verify_export
    from ..model import load_model

    encoder = load_model(args.model, trust_pickle=args.trust_pickle)
    source = str(Path(args.model).resolve()) if Path(args.model).is_dir() else str(args.model)  # usable from any cwd
    info = export_onnx(
        encoder,
        args.out,
        fingerprint=model_fingerprint(encoder.model),
        fp16=args.fp16,
        int8=args.int8,
        exporter=args.exporter,
        opset=args.opset,
        source=source,
        overwrite=args.overwrite,
        progress=not args.json,
    )
    with tempfile.TemporaryDirectory() as tmp:
        images, captions = args.images, args.captions
        if images is None:
            images, run_captions = run_split(Path(args.model)) or _sample_images(Path(tmp), encoder.image_spec.crop)
            captions = captions or run_captions
        paths, texts = read_verification_inputs(images, captions, args.verify_count)
        report = verify_export(encoder, args.out, paths, texts, progress=not args.json)
    claim_files(args.out, "export", {"model": source}, ["verification.json"])
    write_text_atomic(args.out / "verification.json", json.dumps(report.to_dict(), indent=2))
    if args.json:
        print(json.dumps({"export": info, "verification": report.to_dict()}, indent=2))
    else:
        print(format_verification(report))
        print(f"export folder: {args.out}")
    if not report.ok:
        raise ExportError(
            f"the ONNX export in {args.out} does not reproduce PyTorch (see the table above); "
            "try --exporter torchscript or another --opset"
        )
    return 0


def _sample_images(tmp: Path, size: int) -> tuple[Path, Path]:
    """A few synthetic sample images with captions, for verifying an export when no data is at hand."""
    from ..data.sample import make_sample_data

    log.info("no --images given and the run's validation images were not found: verifying on synthetic sample images")
    root = make_sample_data(tmp / "sample", train_images=0, val_images=16, image_size=max(32, size)).root
    return root / "images" / "val", root / "captions_val.csv"


def add_convert_command(sub: Any) -> None:
    p = new_command(
        sub,
        "convert",
        "convert between open_clip checkpoints and transformers CLIPModel folders",
        description="Convert a CLIP between open_clip and transformers, both ways, for the ViT CLIPs both libraries\n"
        "share (timm, ResNet or HF-text towers, attentional pooling and the towers model are refused).",
        examples="""
finderpartner convert --to hf --model ViT-B-32 --checkpoint open_clip_model.safetensors --out models/vit-b-32
finderpartner convert --to open_clip --model outputs/clip_tiny/best_model --out open_clip/clip_tiny
""",
        notes="""
--to hf: --model is an open_clip model name or model config JSON (with --checkpoint), or an open_clip folder
(open_clip_config.json + weights). --to open_clip: --model is a saved CLIPModel folder or hub id. The tokenizer
travels with the model; before anything is written, source and result embed the same images and texts and must
agree (cosine >= 0.9999, same token ids). How to load the result is printed.
""",
    )
    p.add_argument("--to", required=True, choices=["hf", "open_clip"], help="the library to convert to")
    p.add_argument(
        "--model",
        required=True,
        help="--to hf: open_clip model name, model config JSON or open_clip folder; --to open_clip: CLIPModel folder",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="open_clip weights (.safetensors; .pt/.bin need --trust-pickle), --to hf only",
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder to write (new, or an earlier conversion)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion of another model at --out")
    add_trust_pickle(p)
    p.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from ..interop.convert import convert

    result = convert(
        args.to,
        args.model,
        args.out,
        checkpoint=args.checkpoint,
        trust_pickle=args.trust_pickle,
        overwrite=args.overwrite,
    )
    print(result.verification)
    print(f"written: {result.out}")
    print(result.usage)
    return 0
