"""WiSE-FT (finderpartner merge, eval --sweep-alpha): exact interpolation, plain transformers folders, refusals that
write nothing, and a sweep whose end points are the two models' own evaluations."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import MICRO_SPEC
from safetensors.torch import load_file

from finderpartner.cli import main
from finderpartner.errors import ModelError, OutputError, UsageError
from finderpartner.merge import interpolate

WEIGHTS = "model.safetensors"


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with the SHA-256 of its bytes (as tests/test_data_safety.py)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def _captions(data: Path) -> list[str]:
    with open(data / "captions_train.csv", encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> dict[str, Path]:
    """base and finetuned: one architecture and tokenizer, other weights (and logit scales); wide: another width,
    same tokenizer; foreign: the same architecture with a tokenizer learnt from other captions."""
    from finderpartner.config import TinySpec
    from finderpartner.model import build_tiny, save_model

    tmp = tmp_path_factory.mktemp("merge_models")
    spec = TinySpec(**MICRO_SPEC)
    base = build_tiny(spec, _captions(small_data), seed=1)
    finetuned = build_tiny(spec, [], seed=2, tokenizer=base.tokenizer)
    with torch.no_grad():
        finetuned.model.logit_scale.fill_(3.0)  # base: the init value (log 1/0.07)
    wide = build_tiny(TinySpec(**{**MICRO_SPEC, "vision_width": 96}), [], seed=3, tokenizer=base.tokenizer)
    foreign = build_tiny(spec, ["a red circle", "a blue square", "two green triangles"] * 4, seed=4)
    return {
        "base": save_model(base, tmp / "base"),
        "finetuned": save_model(finetuned, tmp / "finetuned"),
        "wide": save_model(wide, tmp / "wide"),
        "foreign": save_model(foreign, tmp / "foreign"),
    }


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_alpha_0_and_1_are_the_models_and_0_5_their_exact_average(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    code, stdout, _ = _cli(
        capsys,
        "merge",
        "--base",
        models["base"],
        "--finetuned",
        models["finetuned"],
        "--alpha",
        "0",
        "0.5",
        "1",
        "--out",
        out,
    )
    assert code == 0 and f"alpha 0.5: {out / 'alpha_0.5'}" in stdout
    a, b = load_file(models["base"] / WEIGHTS), load_file(models["finetuned"] / WEIGHTS)
    m0, m5, m1 = (load_file(out / f"alpha_{x}" / WEIGHTS) for x in ("0", "0.5", "1"))
    assert set(m0) == set(m5) == set(m1) == set(a) == set(b)
    for key in a:
        assert torch.equal(m0[key], a[key]) and torch.equal(m1[key], b[key]), key
        lerp = (1 - 0.5) * a[key].float() + 0.5 * b[key].float()
        assert m5[key].dtype == torch.float32 and torch.equal(m5[key], lerp), key
    assert float(m5["logit_scale"]) == pytest.approx((float(a["logit_scale"]) + 3.0) / 2)  # interpolated too
    assert not torch.equal(m5["text_projection.weight"], a["text_projection.weight"])
    card = (out / "alpha_0.5" / "README.md").read_text(encoding="utf-8")
    assert f"base: `{models['base']}`" in card and f"finetuned: `{models['finetuned']}`" in card
    assert "alpha: 0.5" in card
    marker = json.loads((out / ".finderpartner.json").read_text(encoding="utf-8"))
    assert marker["kind"] == "merge" and marker["inputs"]["alpha"] == [0.0, 0.5, 1.0]


def test_a_single_alpha_is_a_plain_transformers_folder_that_embeds(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    out = tmp_path / "wise"
    args = ["merge", "--base", models["base"], "--finetuned", models["finetuned"], "--alpha", "0.25", "--out", out]
    assert _cli(capsys, *args)[0] == 0
    model = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    inputs = processor(
        text=["a red circle", "a blue square"],
        images=[Image.new("RGB", (40, 40), "red")],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert "alpha 0.25" in (out / "README.md").read_text(encoding="utf-8")
    # the same command again rewrites its own folder; other alphas need --overwrite; --overwrite then replaces it
    assert _cli(capsys, *args)[0] == 0
    args[-3] = "0.75"
    code, _, err = _cli(capsys, *args)
    assert code == OutputError.exit_code and "pass --overwrite to replace it" in err
    assert _cli(capsys, *args, "--overwrite")[0] == 0
    assert "alpha 0.75" in (out / "README.md").read_text(encoding="utf-8")


def test_interpolation_copies_integer_buffers_and_keeps_the_finetuned_dtype() -> None:
    base = {
        "w": torch.tensor([1.0, 2.0]),
        "half": torch.tensor([1.0, 3.0], dtype=torch.bfloat16),
        "position_ids": torch.arange(3),
        "mask": torch.tensor([True, False]),
    }
    finetuned = {
        "w": torch.tensor([3.0, 6.0]),
        "half": torch.tensor([2.0, 5.0], dtype=torch.bfloat16),
        "position_ids": torch.arange(3) + 10,
        "mask": torch.tensor([False, True]),
    }
    merged = interpolate(base, finetuned, 0.25)
    assert torch.equal(merged["w"], torch.tensor([1.5, 3.0]))
    assert merged["half"].dtype == torch.bfloat16 and torch.equal(merged["half"].float(), torch.tensor([1.25, 3.5]))
    assert torch.equal(merged["position_ids"], finetuned["position_ids"])
    assert torch.equal(merged["mask"], finetuned["mask"])
    assert torch.equal(interpolate(base, finetuned, 1.5)["w"], torch.tensor([4.0, 8.0]))  # extrapolated


@pytest.mark.parametrize(
    ("other", "fragments"),
    [
        ("wide", ["their architectures differ (config vision_config.hidden_size: 64 in base, 96 in finetuned)"]),
        ("foreign", ["their tokenizers differ (vocabularies of", "two tiny models trained on different data"]),
    ],
)
def test_other_architectures_and_tokenizers_are_refused_and_nothing_is_written(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], other: str, fragments: list[str]
) -> None:
    out = tmp_path / "merged"
    before = snapshot(models["base"], models[other])
    code, _, err = _cli(capsys, "merge", "--base", models["base"], "--finetuned", models[other], "--out", out)
    assert code == ModelError.exit_code
    assert f"cannot merge base {models['base']} and finetuned {models[other]}" in err
    for fragment in fragments:
        assert fragment in err
    assert not out.exists() and not list(tmp_path.iterdir())
    assert snapshot(models["base"], models[other]) == before


def test_out_equal_to_or_inside_an_input_is_refused_and_the_input_is_unchanged(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(models["base"], models["finetuned"])
    base, finetuned = models["base"], models["finetuned"]
    code, _, err = _cli(capsys, "merge", "--base", base, "--finetuned", finetuned, "--out", finetuned)
    assert code == OutputError.exit_code and f"--out {finetuned} is the input finetuned {finetuned}" in err
    code, _, err = _cli(capsys, "merge", "--base", base, "--finetuned", finetuned, "--out", base / "merged")
    assert code == OutputError.exit_code and "is inside the input base" in err
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.docx").write_bytes(b"years of work")
    code, _, err = _cli(capsys, "merge", "--base", base, "--finetuned", finetuned, "--out", documents, "--overwrite")
    assert code == OutputError.exit_code and "did not write (thesis.docx); it never replaces them" in err
    assert (documents / "thesis.docx").read_bytes() == b"years of work" and len(list(documents.iterdir())) == 1
    assert snapshot(models["base"], models["finetuned"]) == before


def test_alpha_outside_0_1_needs_extrapolate(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["merge", "--base", models["base"], "--finetuned", models["finetuned"], "--alpha", "1.5"]
    code, _, err = _cli(capsys, *args, "--out", tmp_path / "x")
    assert code == UsageError.exit_code and "--alpha 1.5 is outside [0, 1]" in err and "--extrapolate" in err
    assert not (tmp_path / "x").exists()
    assert _cli(capsys, *args, "--extrapolate", "--out", tmp_path / "x")[0] == 0
    a, b = load_file(models["base"] / WEIGHTS), load_file(models["finetuned"] / WEIGHTS)
    merged = load_file(tmp_path / "x" / WEIGHTS)
    key = "visual_projection.weight"
    assert torch.equal(merged[key], (1 - 1.5) * a[key] + 1.5 * b[key])
    assert "extrapolated" in (tmp_path / "x" / "README.md").read_text(encoding="utf-8")


RUNTIME = ["--device", "cpu", "--precision", "fp32", "--workers", "0"]


@pytest.mark.slow  # embeds the split at every alpha
def test_sweep_writes_table_json_and_plot_and_its_ends_are_eval_of_each_model(
    models: dict[str, Path], small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "wise"
    code, stdout, _ = _cli(
        capsys,
        "eval",
        "--sweep-alpha",
        "--base",
        models["base"],
        "--finetuned",
        models["finetuned"],
        "--data",
        small_data,
        "--split",
        "val",
        "--split2",
        "train",
        "--alpha",
        "0",
        "0.5",
        "1",
        "--out",
        out,
        *RUNTIME,
    )
    assert code == 0
    assert "sample/val mean recall" in stdout and "sample/train t2i R@1" in stdout
    assert [line.split()[0] for line in stdout.splitlines()[1:4]] == ["0", "0.5", "1"]
    assert (out / "wise_ft.png").stat().st_size > 0
    record = json.loads((out / "wise_ft.json").read_text(encoding="utf-8"))
    assert [row["alpha"] for row in record["rows"]] == [0.0, 0.5, 1.0]
    assert [s["name"] for s in record["sets"]] == ["sample/val", "sample/train"]
    for alpha_row, model in ((record["rows"][0], "base"), (record["rows"][2], "finetuned")):
        for i, split in enumerate(("val", "train")):
            code, stdout, _ = _cli(
                capsys,
                "eval",
                "--model",
                models[model],
                "--data",
                small_data,
                "--split",
                split,
                "--out",
                tmp_path / "eval",
                "--json",
                *RUNTIME,
            )
            assert code == 0
            assert alpha_row["sets"][i]["summary"] == json.loads(stdout), (model, split)
    assert record["rows"][0]["sets"][0]["summary"] != record["rows"][2]["sets"][0]["summary"]


def test_sweep_on_one_set_plots_against_alpha_and_prints_json(
    models: dict[str, Path], small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "wise"
    code, stdout, _ = _cli(
        capsys,
        "eval",
        "--sweep-alpha",
        "--base",
        models["base"],
        "--finetuned",
        models["finetuned"],
        "--data",
        small_data,
        "--alpha",
        "0.2",
        "0.8",
        "--out",
        out,
        "--json",
        *RUNTIME,
    )
    record = json.loads(stdout)
    assert code == 0 and [row["alpha"] for row in record["rows"]] == [0.2, 0.8] and len(record["sets"]) == 1
    assert record == json.loads((out / "wise_ft.json").read_text(encoding="utf-8"))
    assert (out / "wise_ft.png").is_file() and json.loads((out / ".finderpartner.json").read_text())["kind"] == "eval"


def test_sweep_refusals(
    models: dict[str, Path], small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, finetuned = models["base"], models["finetuned"]
    sweep = ["eval", "--sweep-alpha", "--data", small_data, *RUNTIME]
    cases = [
        (["eval", "--data", small_data], 2, "eval needs --model"),
        (["eval", "--model", base, "--data", small_data, "--alpha", "0.5"], 2, "only work(s) with --sweep-alpha"),
        ([*sweep, "--base", base], 2, "--sweep-alpha needs --finetuned"),
        ([*sweep, "--base", base, "--finetuned", finetuned, "--model", base], 2, "drop --model"),
        ([*sweep, "--base", base, "--finetuned", finetuned, "--alpha", "-0.5"], 2, "pass --extrapolate"),
        ([*sweep, "--base", base, "--finetuned", finetuned, "--split2", "val"], 2, "is the first one"),
        ([*sweep, "--base", base, "--finetuned", models["wide"]], 5, "their architectures differ"),
        ([*sweep, "--base", base, "--finetuned", finetuned, "--out", finetuned], 10, "is the input finetuned"),
    ]
    before = snapshot(base, finetuned)
    for args, want, fragment in cases:
        code, _, err = _cli(capsys, *args)
        assert code == want and fragment in err, (args, code, err)
    assert snapshot(base, finetuned) == before
    assert not (Path(finetuned).parent / "eval").exists()
