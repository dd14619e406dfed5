"""ONNX export: a self-contained folder whose encoders reproduce PyTorch on real inputs, at any batch and text length,
laid out as Hugging Face's tools expect (optimum itself: test_export_optimum.py; transformers.js in a browser:
test_export_browser.py), each graph with its own weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import modes_off_usual

from finderpartner.cli import main
from finderpartner.data.dataset import read_split
from finderpartner.embedding import model_fingerprint
from finderpartner.errors import ExportError
from finderpartner.interop.export import PARITY_COSINE, export_onnx
from finderpartner.interop.onnx_runtime import (
    COMBINED,
    EXPORT_INFO,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    OnnxSearcher,
    image_spec_from_folder,
    load_onnx_encoders,
    open_session,
)
from finderpartner.interop.verify import compare, preprocess_images, verify_export
from finderpartner.model import encode_image, encode_text, load_model

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

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
    assert info["format"] == 3
    assert info["files"] == {
        COMBINED: "onnx/model.onnx",
        IMAGE_ENCODER: "onnx/vision_model.onnx",
        TEXT_ENCODER: "onnx/text_model.onnx",
    }
    assert info["variants"]["int8"][TEXT_ENCODER] == "onnx/text_model_quantized.onnx"  # transformers.js's q8 name
    assert set(info["variants"]) == {"fp16", "int8"}
    for name in ("model", "vision_model", "text_model", "vision_model_quantized", "text_model_fp16", "model_quantized"):
        onnx.checker.check_model(str(exported / "onnx" / f"{name}.onnx"), full_check=True)
    # batch and text length are symbolic dimensions, not the example's sizes
    image = onnx.load(str(exported / info["files"][IMAGE_ENCODER]), load_external_data=False)
    text = onnx.load(str(exported / info["files"][TEXT_ENCODER]), load_external_data=False)
    assert image.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_param != "" for d in text.graph.input[0].type.tensor_type.shape.dim] == [True, True]
    # tokenizer, preprocessing and the model's config are in the folder and equal the model's
    onnx_enc = load_onnx_encoders(exported)
    captions = ["a large red circle on the left", "star"]
    assert onnx_enc.tokenizer(captions)["input_ids"] == encoder.tokenizer(captions)["input_ids"]
    assert image_spec_from_folder(exported) == encoder.image_spec
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "clip" and config["projection_dim"] == 32
    assert not list(exported.rglob("*.safetensors")) and not list(exported.rglob("*.data"))


def test_each_graph_holds_its_own_weights(exported: Path, encoder) -> None:
    """A browser gives a graph only data files named after it, so each graph holds its weights (below 2 GB: inside
    it), and config.json tells transformers.js what to load (its default in a page, q8, is the int8 variant)."""
    info = json.loads((exported / EXPORT_INFO).read_text())
    parameter_bytes = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
    files = {"fp32": info["files"], **info["variants"]}
    for variant, graphs in files.items():
        for role, file in graphs.items():
            graph = onnx.load(str(exported / file), load_external_data=False).graph
            assert not [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL], (variant, role)
    # model.onnx holds every weight; the two encoders together hold them again (the logit scale aside)
    fp32 = {role: (exported / file).stat().st_size for role, file in info["files"].items()}
    assert parameter_bytes < fp32[COMBINED] < 1.5 * parameter_bytes
    assert parameter_bytes < fp32[IMAGE_ENCODER] + fp32[TEXT_ENCODER] < 1.5 * parameter_bytes
    assert (exported / info["variants"]["int8"][COMBINED]).stat().st_size < parameter_bytes / 2
    written = {p for p in exported.rglob("*") if p.is_file() and ".onnx" in p.name}
    assert written == {exported / f for graphs in files.values() for f in graphs.values()}  # no data files
    assert info["external_data"] == {}
    assert modes_off_usual(exported) == {}  # a web server running as another user can serve every file
    js_config = json.loads((exported / "config.json").read_text())["transformers.js_config"]
    assert js_config == {}  # the int8 variant is there: a page's default (q8) finds *_quantized.onnx


def test_a_graph_above_the_inline_limit_reads_data_files_named_after_it(
    encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, val_images, val_captions
) -> None:
    """Above INLINE_MAX_BYTES each graph's weights go to <graph>.onnx_data, <graph>.onnx_data_1, ... of at most
    DATA_CHUNK_BYTES each (transformers.js's names and chunking; config.json says how many), verified as ever."""
    from finderpartner.interop import export as export_module

    largest = max(p.numel() * p.element_size() for p in encoder.model.parameters())  # a tensor is never split
    monkeypatch.setattr(export_module, "INLINE_MAX_BYTES", 4096)
    monkeypatch.setattr(export_module, "DATA_CHUNK_BYTES", largest)
    out = tmp_path / "onnx"
    export_onnx(encoder, out, fingerprint=model_fingerprint(encoder.model), int8=True, source="test")
    info = json.loads((out / EXPORT_INFO).read_text())
    for file, count in info["external_data"].items():
        graph = onnx.load(str(out / "onnx" / file), load_external_data=False).graph
        locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"{file}_data"} | {f"{file}_data_{i}" for i in range(1, count)}, file
        assert all((out / "onnx" / name).stat().st_size <= largest for name in locations)
    assert info["external_data"]["model.onnx"] >= 2 and set(info["external_data"]) == {
        Path(f).name for graphs in (info["files"], *info["variants"].values()) for f in graphs.values()
    }
    js_config = json.loads((out / "config.json").read_text())["transformers.js_config"]
    assert js_config == {"use_external_data_format": info["external_data"]}
    assert verify_export(encoder, out, val_images[:4], val_captions[:4], latency_batches=()).ok
    assert modes_off_usual(out) == {}


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


def test_the_zero_shot_graph_is_clips_forward(exported: Path, encoder, val_images, val_captions) -> None:
    """onnx/model.onnx: optimum's inputs and outputs for CLIP zero-shot, the values of transformers' forward."""
    pixels = preprocess_images(encoder, val_images[:3])
    tok = encoder.tokenizer(val_captions[:5], padding="longest", return_tensors="pt")
    session = open_session(exported / "onnx" / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "pixel_values", "attention_mask"]
    names = ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]
    assert [o.name for o in session.get_outputs()] == names
    got = session.run(None, {"pixel_values": pixels.numpy(), **{k: v.numpy() for k, v in tok.items()}})
    with torch.no_grad():
        out = encoder.model(pixel_values=pixels, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    assert [g.shape for g in got] == [(3, 5), (5, 3), (5, 32), (3, 32)]
    for name, value in zip(names, got):
        assert np.abs(value - getattr(out, name).numpy()).max() < 1e-4, name


def test_verification_reports_parity_accuracy_cost_and_latency(
    exported: Path, encoder, val_images, val_captions
) -> None:
    report = verify_export(encoder, exported, val_images[:8], val_captions[:8], latency_batches=(4,))
    assert report.ok
    rows = {(p.graph, p.variant): p for p in report.parity}
    graphs = (IMAGE_ENCODER, TEXT_ENCODER, f"{COMBINED}.image_embeds", f"{COMBINED}.text_embeds")
    assert set(rows) == {(g, v) for g in graphs for v in ("fp32", "fp16", "int8")}
    assert rows[(TEXT_ENCODER, "fp32")].top1_agreement == 1.0
    # the smaller variants cost a little accuracy, and the report says how much
    assert rows[(IMAGE_ENCODER, "fp16")].min_cosine > 0.999 and rows[(IMAGE_ENCODER, "int8")].min_cosine > 0.98
    assert rows[(TEXT_ENCODER, "int8")].max_abs_diff > rows[(TEXT_ENCODER, "fp32")].max_abs_diff
    assert report.logits_max_abs_diff < 1e-4 < report.logits_tolerance  # model.onnx's logits are PyTorch's
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
    assert result["verification"]["logits_max_abs_diff"] < 1e-4
    assert load_onnx_encoders(out).encode_texts(["star"]).shape == (1, 32)


def test_a_model_folder_is_not_an_export(trained_model: Path, exported: Path) -> None:
    with pytest.raises(ExportError, match="export it first"):
        load_onnx_encoders(trained_model)
    with pytest.raises(ExportError, match="has no fp8 variant|--fp8"):
        load_onnx_encoders(exported, variant="fp8")


def test_an_export_of_the_earlier_layout_is_still_searched(exported: Path, tmp_path: Path) -> None:
    """Format 1 (image_encoder.onnx and text_encoder.onnx at the top, weights inside): read through its info."""
    old = tmp_path / "old"
    old.mkdir()
    info = json.loads((exported / EXPORT_INFO).read_text())
    for role, name in ((IMAGE_ENCODER, "image_encoder.onnx"), (TEXT_ENCODER, "text_encoder.onnx")):
        onnx.save_model(onnx.load(str(exported / info["files"][role])), str(old / name))  # weights inline
    for f in exported.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != EXPORT_INFO:
            (old / f.name).write_bytes(f.read_bytes())
    files = {IMAGE_ENCODER: "image_encoder.onnx", TEXT_ENCODER: "text_encoder.onnx", COMBINED: "clip.onnx"}
    old_info = {k: v for k, v in info.items() if k not in ("external_data", "variants")}
    (old / EXPORT_INFO).write_text(json.dumps({**old_info, "format": 1, "files": files, "variants": {}}))
    texts = ["star", "a large red circle on the left"]
    assert np.abs(OnnxSearcher(old).embed_texts(texts) - OnnxSearcher(exported).embed_texts(texts)).max() == 0
    with pytest.raises(ExportError, match="no int8 variant"):
        OnnxSearcher(old, variant="int8")


def test_an_encoder_that_cannot_be_cut_out_is_a_clear_error(tmp_path: Path) -> None:
    """A weight used only inside a control-flow subgraph (an If branch) is not found by the cut: named, not run."""
    from onnx import TensorProto, helper, numpy_helper

    from finderpartner.interop.export import write_graphs

    weight = numpy_helper.from_array(np.ones((4, 8), np.float32), "text_weight")
    branch = helper.make_graph(
        [helper.make_node("Identity", ["text_weight"], ["branch_out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [4, 8])],
    )
    nodes = [
        helper.make_node("ReduceMax", ["attention_mask"], ["any_token"], keepdims=0),
        helper.make_node("Cast", ["any_token"], ["cond"], to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["text_embeds"], then_branch=branch, else_branch=branch),
        helper.make_node("Identity", ["pixel_values"], ["image_embeds"]),
        helper.make_node("Identity", ["input_ids"], ["ids_seen"]),
    ]
    io = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "zero_shot",
        [
            io("input_ids", TensorProto.INT64, [4, 8]),
            io("pixel_values", TensorProto.FLOAT, [2, 8]),
            io("attention_mask", TensorProto.INT64, [4, 8]),
        ],
        [io("text_embeds", TensorProto.FLOAT, [4, 8]), io("image_embeds", TensorProto.FLOAT, [2, 8])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)  # the whole graph is valid; the text encoder cut out of it is not
    with pytest.raises(ExportError, match="text_model.onnx, cut out of model.onnx, is not a valid graph"):
        write_graphs(model, tmp_path)


def test_export_from_another_folder_verifies_on_the_runs_images(
    trained_model: Path, small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A run trained with a relative data.root (from its own folder): export run elsewhere finds the run's val images
    through the run folder's place; when they are gone it says where it looked."""
    import logging
    import shutil

    import yaml

    from finderpartner.cli.common import run_split

    project = tmp_path / "project"
    shutil.copytree(small_data, project / "data")
    shutil.copytree(trained_model, project / "outputs" / "run" / "best_model")
    config = {"experiment": "run", "output_dir": "outputs", "data": {"root": "data"}}
    (project / "outputs" / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = Path("..") / "project" / "outputs" / "run" / "best_model"
    assert main(["export", "--model", str(model), "--out", "export", "--verify-count", "20", "--json"]) == 0
    report = json.loads((elsewhere / "export" / "verification.json").read_text())
    assert report["images"] == 20 and report["ok"]  # the run's 24 val images (synthetic ones would be 16)

    shutil.rmtree(project / "data")
    monkeypatch.setattr(logging.getLogger("finderpartner"), "propagate", True)  # main() set up its own handler
    with caplog.at_level("INFO", logger="finderpartner.cli"):
        assert run_split(model) is None
    looked = [r.getMessage() for r in caplog.records if "are not at" in r.getMessage()]
    assert looked and str(elsewhere / "data" / "images" / "val") in looked[0]
    assert str(project.resolve() / "data" / "images" / "val") in looked[0]
