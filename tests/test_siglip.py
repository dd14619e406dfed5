"""A SigLIP-trained model (``train.loss: siglip``) as others use it: plain transformers loads it with its temperature
and bias, ``eval`` reports its own loss, the demo shows sigmoid probabilities, and the ONNX export keeps parity.
CLIP models carry no such record (their files are as before)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import micro_config
from safetensors.torch import load_file

from finderpartner.config import config_from_dict
from finderpartner.data.dataset import read_split
from finderpartner.data.sources import EvalSet
from finderpartner.demo import image_text_scores, probability_label
from finderpartner.embedding import Searcher, model_fingerprint
from finderpartner.errors import ModelError
from finderpartner.evaluate import evaluate_split
from finderpartner.loss import ClipLoss, SigmoidLoss, build_objective, saved_objective
from finderpartner.model import OBJECTIVE_KEY, load_model
from finderpartner.train import train

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

TEXTS = "a large red circle on the left\nsmall blue star, center\na small green square on the right side"


@pytest.fixture(scope="module")
def siglip_run(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a one-epoch SigLIP run of the micro model."""
    tmp = tmp_path_factory.mktemp("siglip")
    return train(config_from_dict(micro_config(tmp, small_data, loss="siglip", epochs=1))).run_dir


def _objective_in_checkpoint(run_dir: Path) -> tuple[float, float]:
    weights = load_file(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    return float(weights["objective.log_scale"]), float(weights["objective.bias"])


def test_plain_transformers_loads_the_temperature_and_the_bias(siglip_run: Path) -> None:
    from transformers import CLIPModel

    best = siglip_run / "best_model"
    model = CLIPModel.from_pretrained(best)
    record = model.config.finderpartner_objective
    assert record["loss"] == "siglip"
    # the best model is the last one here (one validation, at the end): the learnt values, not the init
    log_scale, bias = _objective_in_checkpoint(siglip_run)
    assert record["logit_bias"] == bias != -10.0 and record["logit_scale"] == log_scale != math.log(10.0)
    assert float(model.logit_scale.detach()) == log_scale  # exp(logit_scale) * cos + bias: computable from the folder
    assert json.loads((best / "config.json").read_text())[OBJECTIVE_KEY] == record
    card = (best / "README.md").read_text()
    assert "sigmoid(exp(logit_scale) * cos + logit_bias)" in card and "not logits.softmax(-1)" in card


def test_eval_and_a_new_run_use_the_saved_values(siglip_run: Path, small_data: Path) -> None:
    encoder = load_model(siglip_run / "best_model")
    log_scale, bias = _objective_in_checkpoint(siglip_run)
    assert encoder.logit_bias == bias
    objective = saved_objective(encoder.model, encoder.objective_record)
    assert isinstance(objective, SigmoidLoss)
    assert (float(objective.log_scale.detach()), float(objective.bias.detach())) == (log_scale, bias)
    # a run started from this model (model.name: its folder) continues from them, under either name
    for name in ("siglip", "sigmoid"):
        again = build_objective(name, encoder.model, record=encoder.objective_record)
        assert (float(again.log_scale.detach()), float(again.bias.detach())) == (log_scale, bias)
    table, _ = read_split(small_data, "val")
    val = EvalSet.from_table(table)
    cpu = torch.device("cpu")
    reported = evaluate_split(encoder, val, device=cpu, batch_size=16)  # what `finderpartner eval` computes
    assert reported.loss == evaluate_split(encoder, val, device=cpu, batch_size=16, objective=objective).loss
    assert reported.loss != evaluate_split(encoder, val, device=cpu, objective=ClipLoss(encoder.model.logit_scale)).loss


def test_a_clip_run_from_a_siglip_model_drops_the_record(siglip_run: Path, tmp_path: Path) -> None:
    encoder = load_model(siglip_run / "best_model")
    encoder.record_objective(build_objective("clip", encoder.model).record())  # what _save_best does
    encoder.save(tmp_path / "clip")
    assert OBJECTIVE_KEY not in json.loads((tmp_path / "clip" / "config.json").read_text())
    assert load_model(tmp_path / "clip").logit_bias is None


def test_clip_models_carry_no_record(trained_model: Path) -> None:
    assert OBJECTIVE_KEY not in json.loads((trained_model / "config.json").read_text())
    encoder = load_model(trained_model)
    assert encoder.logit_bias is None and isinstance(saved_objective(encoder.model, None), ClipLoss)
    assert "sigmoid" not in (trained_model / "README.md").read_text()


def test_a_malformed_record_is_an_error_not_a_clip_model(trained_model: Path) -> None:
    encoder = load_model(trained_model)
    setattr(encoder.model.config, OBJECTIVE_KEY, {"loss": "siglip", "logit_bias": "-10"})
    with pytest.raises(ModelError, match="malformed finderpartner_objective"):
        _ = encoder.logit_bias


def test_the_demo_shows_sigmoid_probabilities(siglip_run: Path, small_data: Path) -> None:
    searcher = Searcher(load_model(siglip_run / "best_model"), device=torch.device("cpu"), batch_size=8)
    image = sorted((small_data / "images" / "val").glob("*.jpg"))[3]
    probs, rows = image_text_scores(searcher, str(image), TEXTS)
    texts = TEXTS.splitlines()
    cosines = searcher.embed_texts(texts) @ searcher.embed_paths([image])[0][0]
    expected = 1 / (1 + np.exp(-(searcher.logit_scale * cosines + searcher.logit_bias)))
    for i, text in enumerate(texts):
        assert probs[text] == pytest.approx(expected[i], rel=1e-5, abs=1e-9)
    assert sum(probs.values()) != pytest.approx(1.0, abs=1e-3)  # independent per text, not a softmax
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert "sigmoid per text" in probability_label(searcher)


def test_onnx_export_keeps_parity_and_the_bias(siglip_run: Path, small_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from finderpartner.interop.export import export_onnx
    from finderpartner.interop.onnx_runtime import COMBINED, OnnxSearcher, open_session, variant_file
    from finderpartner.interop.verify import preprocess_images, verify_export

    encoder = load_model(siglip_run / "best_model")
    out = tmp_path / "onnx"
    info = export_onnx(encoder, out, fingerprint=model_fingerprint(encoder.model), source="test")
    assert info["logit_bias"] == encoder.logit_bias
    images = sorted((small_data / "images" / "val").glob("*.jpg"))[:4]
    captions = list(dict.fromkeys(read_split(small_data, "val")[0].captions))[:5]
    report = verify_export(encoder, out, images, captions, latency_batches=(2,))
    assert report.ok and report.logits_max_abs_diff < 1e-3
    # the combined graph: transformers' logits (exp(logit_scale) * cos) plus the bias
    pixels = preprocess_images(encoder, images)
    tok = encoder.tokenize(captions)
    (per_image,) = open_session(out / variant_file(COMBINED)).run(
        ["logits_per_image"],
        {
            "pixel_values": pixels.numpy(),
            "input_ids": tok["input_ids"].numpy(),
            "attention_mask": tok["attention_mask"].numpy(),
        },
    )
    with torch.no_grad():
        logits = encoder.model(pixel_values=pixels, **tok).logits_per_image.numpy()
    assert np.abs(per_image - (logits + encoder.logit_bias)).max() < 1e-4
    onnx_searcher = OnnxSearcher(out)
    assert onnx_searcher.logit_bias == encoder.logit_bias
    probs, _ = image_text_scores(onnx_searcher, str(images[0]), TEXTS)
    assert 0 < max(probs.values()) < 1 and sum(probs.values()) != pytest.approx(1.0, abs=1e-3)


def test_a_resumed_run_continues_from_the_checkpointed_values(
    siglip_run: Path, small_data: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "outputs"
    shutil.copytree(siglip_run.parent, copy)
    steps = sorted((copy / "run" / "checkpoints").glob("step_*"))
    assert len(steps) >= 2
    shutil.rmtree(steps[-1])  # as if killed after the one before: resume from there
    train(config_from_dict(micro_config(tmp_path, small_data, loss="siglip", epochs=1)), resume="auto")
    assert _objective_in_checkpoint(copy / "run") == _objective_in_checkpoint(siglip_run)
    resumed = json.loads((copy / "run" / "best_model" / "config.json").read_text())[OBJECTIVE_KEY]
    assert resumed == json.loads((siglip_run / "best_model" / "config.json").read_text())[OBJECTIVE_KEY]
