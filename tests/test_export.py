"""ONNX export: a self-contained folder whose encoders reproduce PyTorch on real inputs, at any batch and text length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finderpartner.cli import main
from finderpartner.data.dataset import read_split
from finderpartner.embedding import model_fingerprint
from finderpartner.errors import ExportError
from finderpartner.export import (
    PARITY_COSINE,
    compare,
    export_onnx,
    preprocess_images,
    verify_export,
)
from finderpartner.model import encode_image, encode_text, load_model
from finderpartner.onnx_runtime import (
    COMBINED,
    EXPORT_INFO,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    image_spec_from_folder,
    load_onnx_encoders,
    open_session,
    variant_file,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def encoder(trained_model: Path):
    return load_model(trained_model)


@pytest.fixture(scope="module")
def exported(encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained micro model exported with the default exporter, plus the fp16 and int8 variants."""
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(encoder, out, fingerprint=model_fingerprint(encoder.model), fp16=True, int8=True, source="test")
    return out


@pytest.fixture(scope="module")
def val_images(small_data: Path) -> list[Path]:
    return sorted((small_data / "images" / "val").glob("*.jpg"))


@pytest.fixture(scope="module")
def val_captions(small_data: Path) -> list[str]:
    table, _ = read_split(small_data, "val")
    return list(dict.fromkeys(table.captions))


def test_export_folder_is_self_contained(exported: Path, encoder, trained_model: Path) -> None:
    info = json.loads((exported / EXPORT_INFO).read_text())
    assert info["fingerprint"] == model_fingerprint(load_model(trained_model).model)
    assert info["embed_dim"] == 32 and info["context_length"] == encoder.context_length
    assert info["files"] == {
        IMAGE_ENCODER: "image_encoder.onnx",
        TEXT_ENCODER: "text_encoder.onnx",
        COMBINED: "clip.onnx",
    }
    assert set(info["variants"]) == {"fp16", "int8"}
    for name in ("image_encoder", "text_encoder", "clip", "image_encoder.int8", "text_encoder.fp16"):
        onnx.checker.check_model(str(exported / f"{name}.onnx"))
    # batch and text length are symbolic dimensions, not the example's sizes
    image = onnx.load(str(exported / "image_encoder.onnx"), load_external_data=False)
    text = onnx.load(str(exported / "text_encoder.onnx"), load_external_data=False)
    assert image.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_param != "" for d in text.graph.input[0].type.tensor_type.shape.dim] == [True, True]
    # tokenizer and preprocessing are in the folder and equal the model's
    onnx_enc = load_onnx_encoders(exported)
    captions = ["a large red circle on the left", "star"]
    assert onnx_enc.tokenizer(captions)["input_ids"] == encoder.tokenizer(captions)["input_ids"]
    assert image_spec_from_folder(exported) == encoder.image_spec
    assert not list(exported.glob("*.safetensors")) and not list(exported.glob("*.data"))


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_image_encoder_matches_pytorch(exported: Path, encoder, val_images: list[Path], batch: int) -> None:
    pixels = preprocess_images(encoder, val_images[:batch])  # real images, the model's preprocessing
    with torch.no_grad():
        ref = encode_image(encoder.model, pixels).numpy()
    got = load_onnx_encoders(exported).encode_pixels(pixels.numpy())
    max_diff, min_cos, _ = compare(ref, got)
    assert got.shape == (batch, 32)
    assert min_cos >= PARITY_COSINE and max_diff < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


LONG = "a large red circle on the left next to a small blue star in the center and a green square on the right side"


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("lengths", ["short", "caption", "truncated", "mixed"])
def test_text_encoder_matches_pytorch(
    exported: Path, encoder, val_captions: list[str], batch: int, lengths: str
) -> None:
    pool = {
        "short": ["star", "red", "a b"],
        "caption": val_captions,
        "truncated": [LONG, LONG + " again"],
        "mixed": ["star", LONG, *val_captions],
    }[lengths]
    texts = [pool[i % len(pool)] for i in range(batch)]
    tok = encoder.tokenizer(
        texts, padding="longest", truncation=True, max_length=encoder.context_length, return_tensors="pt"
    )
    if lengths == "truncated":
        assert tok["input_ids"].shape[1] == encoder.context_length
    with torch.no_grad():
        ref = encode_text(encoder.model, tok["input_ids"], tok["attention_mask"]).numpy()
    got = load_onnx_encoders(exported).encode_texts(texts)
    max_diff, min_cos, _ = compare(ref, got)
    assert got.shape == (batch, 32)
    assert min_cos >= PARITY_COSINE and max_diff < 1e-5


def test_combined_model_gives_clip_logits(
    exported: Path, encoder, val_images: list[Path], val_captions: list[str]
) -> None:
    pixels = preprocess_images(encoder, val_images[:3])
    tok = encoder.tokenizer(val_captions[:5], padding="longest", return_tensors="pt")
    per_image, per_text = open_session(exported / variant_file(COMBINED)).run(
        None,
        {
            "pixel_values": pixels.numpy(),
            "input_ids": tok["input_ids"].numpy(),
            "attention_mask": tok["attention_mask"].numpy(),
        },
    )
    with torch.no_grad():
        out = encoder.model(pixel_values=pixels, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    assert per_image.shape == (3, 5) and per_text.shape == (5, 3)
    assert np.abs(per_image - out.logits_per_image.numpy()).max() < 1e-4
    assert np.abs(per_text - out.logits_per_text.numpy()).max() < 1e-4


def test_verification_reports_parity_accuracy_cost_and_latency(
    exported: Path, encoder, val_images, val_captions
) -> None:
    report = verify_export(encoder, exported, val_images[:8], val_captions[:8], latency_batches=(4,))
    assert report.ok
    rows = {(p.graph, p.variant): p for p in report.parity}
    assert set(rows) == {(g, v) for g in (IMAGE_ENCODER, TEXT_ENCODER) for v in ("fp32", "fp16", "int8")}
    assert rows[(TEXT_ENCODER, "fp32")].top1_agreement == 1.0
    # the smaller variants cost a little accuracy, and the report says how much
    assert rows[(IMAGE_ENCODER, "fp16")].min_cosine > 0.999 and rows[(IMAGE_ENCODER, "int8")].min_cosine > 0.98
    assert rows[(TEXT_ENCODER, "int8")].max_abs_diff > rows[(TEXT_ENCODER, "fp32")].max_abs_diff
    assert report.logits_max_abs_diff < 1e-3
    assert [(r.graph, r.batch) for r in report.latency] == [(IMAGE_ENCODER, 4), (TEXT_ENCODER, 4)]
    assert all(r.torch_ms > 0 and set(r.onnx_ms) == {"fp32", "fp16", "int8"} for r in report.latency)


def test_cli_export_with_the_torchscript_exporter(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ts"
    code = main(
        [
            "export",
            "--model",
            str(trained_model),
            "--out",
            str(out),
            "--exporter",
            "torchscript",
            "--json",
            "--images",
            str(small_data / "images" / "val"),
            "--captions",
            str(small_data / "captions_val.csv"),
            "--verify-count",
            "6",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["verification"]["ok"] and result["export"]["exporter"] == "torchscript"
    assert {p["variant"] for p in result["verification"]["parity"]} == {"fp32"}
    assert min(p["min_cosine"] for p in result["verification"]["parity"]) >= PARITY_COSINE
    assert json.loads((out / "verification.json").read_text())["ok"]
    assert load_onnx_encoders(out).encode_texts(["star"]).shape == (1, 32)


def test_a_model_folder_is_not_an_export(trained_model: Path, exported: Path) -> None:
    with pytest.raises(ExportError, match="export it first"):
        load_onnx_encoders(trained_model)
    with pytest.raises(ExportError, match="has no fp8 variant|--fp8"):
        load_onnx_encoders(exported, variant="fp8")
