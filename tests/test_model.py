from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MICRO_SPEC
from PIL import Image

from finderpartner.config import TinySpec
from finderpartner.data.transforms import EvalTransform, normalize
from finderpartner.errors import ModelError
from finderpartner.loss import MAX_LOGIT_SCALE, ClipLoss
from finderpartner.model import (
    build_tiny,
    encode_image,
    encode_text,
    load_model,
    save_model,
    set_attention,
)

CAPTIONS = ["a large red circle on the left", "small blue star, center", "a small green square on the right"]


@pytest.fixture(scope="module")
def encoder():
    return build_tiny(TinySpec(**MICRO_SPEC), CAPTIONS * 3, seed=3)


def test_embeddings_are_l2_normalised(encoder) -> None:
    model = encoder.model.eval()
    pixels = torch.randn(4, 3, 32, 32)
    enc = encoder.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img, txt = encode_image(model, pixels), encode_text(model, enc["input_ids"], enc["attention_mask"])
    assert img.shape == (4, 32) and txt.shape == (3, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_tiny_build_is_deterministic(encoder) -> None:
    again = build_tiny(TinySpec(**MICRO_SPEC), CAPTIONS * 3, seed=3)
    for (name, a), (_, b) in zip(encoder.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert abs(float(encoder.model.logit_scale.detach()) - np.log(1 / 0.07)) < 1e-4  # CLIP's initial temperature


def test_attention_auto_is_eager_for_short_cpu_sequences_and_gives_the_same_embeddings() -> None:
    import transformers

    short = build_tiny(TinySpec(**MICRO_SPEC), CAPTIONS * 3, seed=3).model.eval()  # 17 vision tokens
    long = build_tiny(TinySpec(**{**MICRO_SPEC, "image_size": 160, "patch_size": 8}), CAPTIONS * 3).model  # 401
    assert set_attention(short, "auto", torch.device("cuda")) == "default"  # GPUs keep transformers' choice
    if not hasattr(short, "set_attn_implementation"):
        pytest.skip(f"transformers {transformers.__version__} cannot switch attention after loading")
    pixels = torch.randn(3, 3, 32, 32)
    tokens = build_tiny(TinySpec(**MICRO_SPEC), CAPTIONS * 3, seed=3).tokenizer(
        CAPTIONS, padding=True, return_tensors="pt"
    )
    set_attention(short, "sdpa", torch.device("cpu"))
    with torch.no_grad():
        before = encode_image(short, pixels), encode_text(short, tokens["input_ids"], tokens["attention_mask"])
    assert set_attention(short, "auto", torch.device("cpu")).startswith("vision eager (17 tokens), text eager")
    assert short.config.vision_config._attn_implementation == "eager"
    with torch.no_grad():
        after = encode_image(short, pixels), encode_text(short, tokens["input_ids"], tokens["attention_mask"])
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) < 1e-5
    assert set_attention(long, "auto", torch.device("cpu")).startswith("vision sdpa (401 tokens)")
    # training in fp32 on a CPU (no native bf16): SDPA is the faster kernel there at every length
    assert set_attention(short, "auto", torch.device("cpu"), "fp32").startswith("vision sdpa (17 tokens), text sdpa")
    assert set_attention(short, "auto", torch.device("cpu"), "bf16").startswith("vision eager (17 tokens), text eager")


def test_logit_scale_is_clamped_at_100(encoder) -> None:
    with torch.no_grad():
        encoder.model.logit_scale.fill_(10.0)
    ClipLoss(encoder.model.logit_scale).clamp_()  # the objective owns the temperature's clamp
    assert float(encoder.model.logit_scale.detach().exp()) == pytest.approx(100.0)
    with torch.no_grad():
        encoder.model.logit_scale.fill_(np.log(1 / 0.07))
    assert MAX_LOGIT_SCALE == pytest.approx(np.log(100))


# Runs in a fresh interpreter that never imports finderpartner: plain transformers must be enough.
_PLAIN = r"""
import json, sys
import numpy as np, torch, transformers
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, CLIPTokenizerFast, pipeline
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from PIL import Image
folder, pixels_file, out_file = sys.argv[1:4]
captions = json.loads(sys.argv[4])
model = CLIPModel.from_pretrained(folder).eval()
processor = CLIPProcessor.from_pretrained(folder)
fast = CLIPTokenizerFast.from_pretrained(folder)
auto = AutoTokenizer.from_pretrained(folder)
enc = processor(text=captions, padding=True, return_tensors="pt")
assert fast(captions)["input_ids"] == auto(captions)["input_ids"] == processor.tokenizer(captions)["input_ids"]
def as_tensor(x):  # transformers 5 returns an output object from get_*_features
    return x if isinstance(x, torch.Tensor) else x.pooler_output
with torch.no_grad():
    img = as_tensor(model.get_image_features(pixel_values=torch.from_numpy(np.load(pixels_file))))
    txt = as_tensor(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    # the single-tower classes read projection_dim from the sub-configs
    img_wp = CLIPVisionModelWithProjection.from_pretrained(folder).eval()(
        pixel_values=torch.from_numpy(np.load(pixels_file))).image_embeds
    txt_wp = CLIPTextModelWithProjection.from_pretrained(folder).eval()(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
unit = lambda x: torch.nn.functional.normalize(x, dim=-1).numpy()
img, txt, img_wp, txt_wp = unit(img), unit(txt), unit(img_wp), unit(txt_wp)
picture = Image.new("RGB", (40, 50), (200, 30, 30))
pre = processor(images=picture, return_tensors="pt")["pixel_values"].numpy()
# the default template "This is a photo of {}." is longer than the micro model's 16-token context
scores = pipeline("zero-shot-image-classification", model=folder)(picture, candidate_labels=["red circle", "blue star"],
                                                                   hypothesis_template="{}")
np.savez(out_file, img=img, txt=txt, img_wp=img_wp, txt_wp=txt_wp, pre=pre, ids=enc["input_ids"].numpy())
print(json.dumps({"transformers": transformers.__version__, "labels": [s["label"] for s in scores],
                  "modules": sorted(m for m in sys.modules if m.startswith("finderpartner"))}))
"""


@pytest.mark.slow  # a subprocess loads it with transformers alone
def test_saved_model_loads_with_plain_transformers_and_gives_the_same_embeddings(encoder, tmp_path: Path) -> None:
    folder = save_model(encoder, tmp_path / "best_model", card="# test card\n")
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    pixels = torch.randn(3, 3, 32, 32)
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _PLAIN,
            str(folder),
            str(tmp_path / "pixels.npy"),
            str(tmp_path / "out.npz"),
            json.dumps(CAPTIONS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["modules"] == [] and sorted(info["labels"]) == ["blue star", "red circle"]
    theirs = np.load(tmp_path / "out.npz")
    model = encoder.model.eval()
    enc = encoder.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    assert np.array_equal(enc["input_ids"].numpy(), theirs["ids"])
    with torch.no_grad():
        ours_img = encode_image(model, pixels).numpy()
        ours_txt = encode_text(model, enc["input_ids"], enc["attention_mask"]).numpy()
    diffs = np.abs(ours_img - theirs["img"]).max(), np.abs(ours_txt - theirs["txt"]).max()
    print(f"\nplain transformers vs finderpartner: max abs diff image {diffs[0]:.2e}, text {diffs[1]:.2e}")
    assert max(diffs) <= 1e-5
    # CLIPVisionModelWithProjection / CLIPTextModelWithProjection load the same folder and agree with CLIPModel
    single = np.abs(theirs["img_wp"] - theirs["img"]).max(), np.abs(theirs["txt_wp"] - theirs["txt"]).max()
    print(f"WithProjection classes vs CLIPModel: max abs diff image {single[0]:.2e}, text {single[1]:.2e}")
    assert max(single) <= 1e-5
    # our inference preprocessing follows the saved processor (same size, crop, mean, std)
    picture = Image.new("RGB", (40, 50), (200, 30, 30))
    ours_pre = normalize(EvalTransform(encoder.image_spec)(picture)[None], encoder.image_spec).numpy()
    assert ours_pre.shape == theirs["pre"].shape
    assert np.abs(ours_pre - theirs["pre"]).max() < 0.05


def test_load_model_round_trip(encoder, tmp_path: Path) -> None:
    folder = save_model(encoder, tmp_path / "m")
    loaded = load_model(folder)
    assert loaded.image_spec == encoder.image_spec and loaded.context_length == encoder.context_length
    for (name, a), (_, b) in zip(encoder.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_folder_and_uncached_hub_id_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "no_such_model")
    with pytest.raises(ModelError, match=r"not in the Hugging Face cache.*huggingface-cli download"):
        load_model("finderpartner-tests/not-a-real-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a complete save_pretrained folder"):
        load_model(tmp_path / "empty")
