"""The export folder loads in Hugging Face optimum as it is: ``ORTModelForZeroShotImageClassification.from_pretrained``
finds onnx/model.onnx, its weights file and config.json, and computes what PyTorch does.

optimum-onnx needs transformers < 4.58, so it cannot live in the project's main environment (transformers 5):
`make test-optimum` (the last step of `make test`) runs this file with transformers 4.57 and optimum put in front of
the venv, and sets FINDERPARTNER_REQUIRE_OPTIMUM=1 so that a broken overlay fails instead of skipping; a plain
pytest run skips it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MICRO_SPEC

from finderpartner.config import config_from_dict
from finderpartner.data.dataset import read_split
from finderpartner.embedding import model_fingerprint
from finderpartner.interop.export import export_onnx
from finderpartner.interop.verify import preprocess_images
from finderpartner.model import build_model, encode_image, encode_text, load_model
from finderpartner.tokenizer import build_caption_tokenizer

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

pytest.importorskip("onnxruntime")
if os.environ.get("FINDERPARTNER_REQUIRE_OPTIMUM") == "1":
    import optimum.onnxruntime as ort_models  # make test-optimum: an import error is a failure, not a skip
else:
    ort_models = pytest.importorskip(
        "optimum.onnxruntime",
        reason="optimum-onnx is not installed (it needs transformers < 4.58): `make test-optimum` runs this file",
    )
OUTPUTS = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")


def _max_diffs(got, expected) -> dict[str, float]:
    return {name: float((getattr(got, name) - getattr(expected, name)).abs().max()) for name in OUTPUTS}


def test_optimum_loads_the_export_and_gives_pytorchs_logits(
    trained_model: Path, small_data: Path, tmp_path: Path
) -> None:
    encoder = load_model(trained_model)
    out = tmp_path / "onnx"
    export_onnx(encoder, out, fingerprint=model_fingerprint(encoder.model), source=str(trained_model))
    model = ort_models.ORTModelForZeroShotImageClassification.from_pretrained(out, local_files_only=True)
    loaded = getattr(model, "path", None) or model.model_path  # optimum-onnx: path; optimum 1.x: model_path
    assert Path(loaded).resolve() == (out / "onnx" / "model.onnx").resolve()

    images = sorted((small_data / "images" / "val").glob("*.jpg"))[:5]
    captions = list(dict.fromkeys(read_split(small_data, "val")[0].captions))[:4]
    pixels, tokens = preprocess_images(encoder, images), encoder.tokenize(captions)
    got = model(input_ids=tokens["input_ids"], pixel_values=pixels, attention_mask=tokens["attention_mask"])
    with torch.no_grad():
        expected = encoder.model(
            input_ids=tokens["input_ids"], pixel_values=pixels, attention_mask=tokens["attention_mask"]
        )
    diffs = _max_diffs(got, expected)
    print("optimum vs PyTorch, max |diff|:", json.dumps(diffs))
    assert got.logits_per_image.shape == (5, 4) and max(diffs.values()) < 1e-4

    # the folder's own tokenizer and image processor, through transformers' zero-shot pipeline
    from transformers import AutoImageProcessor, AutoTokenizer, pipeline

    tokenizer, processor = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
    classify = pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer, image_processor=processor)
    labels = ["red circle", "blue star", "green square"]
    scores = {
        r["label"]: r["score"] for r in classify(str(images[0]), candidate_labels=labels, hypothesis_template="{}")
    }
    with torch.no_grad():
        logits = encoder.model(
            **tokenizer(labels, padding=True, return_tensors="pt"),
            pixel_values=processor(images=[_rgb(images[0])], return_tensors="pt")["pixel_values"],
        ).logits_per_image[0]
    assert np.allclose([scores[label] for label in labels], logits.softmax(-1).numpy(), atol=1e-5)


def _rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.fixture
def bert_text_tower(small_data: Path, tmp_path: Path) -> Path:
    """A tiny BERT text model folder with a caption tokenizer and sentence-transformers' mean pooling: what a
    towers model's text side is (all-MiniLM-L6-v2), built offline."""
    from transformers import BertConfig, BertModel

    captions = read_split(small_data, "train")[0].captions
    tokenizer = build_caption_tokenizer(captions, vocab_size=600, context_length=24)
    folder = tmp_path / "bert"
    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=32, **size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def test_a_towers_export_loads_in_optimum_with_the_towers_own_pooling(bert_text_tower: Path, tmp_path: Path) -> None:
    """A VisionTextDualEncoderModel export: optimum runs it (its exporter cannot make one) and gives the logits
    finderpartner's model means, with mean pooling; transformers' own forward pools with BERT's pooler instead."""
    vision = {k: v for k, v in MICRO_SPEC.items() if k.startswith(("image", "patch", "vision"))}
    towers = {"text": str(bert_text_tower), "projection_dim": 32, "context_length": 24}
    encoder = build_model(config_from_dict({"model": {"name": "towers", "tiny": vision, "towers": towers}}).model)
    assert encoder.model.config.text_pooling == "mean"
    out = tmp_path / "onnx"
    export_onnx(encoder, out, fingerprint=model_fingerprint(encoder.model), source="towers")
    model = ort_models.ORTModelForZeroShotImageClassification.from_pretrained(out, local_files_only=True)
    tokens = encoder.tokenize(["a large red circle on the left", "star", "small blue square in the center"])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = model(input_ids=tokens["input_ids"], pixel_values=pixels, attention_mask=tokens["attention_mask"])
    with torch.no_grad():
        text = encode_text(encoder.model, tokens["input_ids"], tokens["attention_mask"])
        image = encode_image(encoder.model, pixels)
        logits = encoder.model.logit_scale.exp() * text @ image.T
        plain = encoder.model(
            input_ids=tokens["input_ids"], pixel_values=pixels, attention_mask=tokens["attention_mask"]
        )
    assert float((got.logits_per_text - logits).abs().max()) < 1e-4
    assert float((got.text_embeds - text).abs().max()) < 1e-5 and float((got.image_embeds - image).abs().max()) < 1e-5
    assert float((got.logits_per_text - plain.logits_per_text).abs().max()) > 1e-2  # not the pooler's logits
