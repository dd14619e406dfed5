"""The command line and the seed's entry points: exit codes, --json output, and the shims as real subprocesses."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finderpartner.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on the left"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """search --images keeps its gallery index in the user cache: keep it inside the test."""
    monkeypatch.setenv("FINDERPARTNER_CACHE", str(tmp_path / "cache"))


def _run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, **(env or {})}
    )


def test_sample_data_then_validate_data_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert (
        main(["sample-data", "--out", str(data), "--train-images", "6", "--val-images", "4", "--image-size", "32"]) == 0
    )
    out = capsys.readouterr().out
    assert "train: 6 images, 12 pairs" in out and "val: 4 images, 8 pairs" in out
    assert main(["validate-data", "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["usable_pairs"] == 12 and report["val"]["problems"] == []
    with open(data / "captions_val.csv", encoding="utf-8") as f:
        victim = next(csv.DictReader(f))["filename"]
    (data / "images" / "val" / victim).unlink()  # a row whose image is missing: a fatal problem
    assert main(["validate-data", "--data", str(data)]) == 1
    assert victim in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["validate-data", "--data", str(empty)]) == 4  # DataError: not a data folder
    assert "no captions_<split>.csv" in capsys.readouterr().err


def test_eval_json(trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "eval",
            "--model",
            str(trained_model),
            "--data",
            str(small_data),
            "--out",
            str(tmp_path / "eval"),
            "--json",
            "--precision",
            "fp32",
            "--workers",
            "0",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["num_images"] == 24 and result["num_captions"] == 48
    assert set(result["retrieval"]) >= {"image_to_text", "text_to_image"}
    assert 0 <= result["mean_recall"] <= 1 and (tmp_path / "eval").is_dir()


def test_eval_and_training_validation_give_the_same_loss_at_the_same_named_batch(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = (trained_model / "README.md").read_text(encoding="utf-8")
    best_step = int(re.search(r"step (\d+), epoch", card).group(1))
    # the card names the loss's batch, the license, the context length and where the tokenizer came from
    assert "Validation loss" in card and "(at contrastive batch 16, the training batch" in card
    assert "\nlicense: other\n" in card and "Texts are truncated to 16 tokens" in card
    assert "learnt from the training captions" in card
    records = [json.loads(line) for line in (trained_model.parent / "metrics.jsonl").read_text().splitlines()]
    (validation,) = [r for r in records if r["step"] == best_step and "val/loss" in r]
    assert validation["val/loss_batch_size"] == 16  # the micro config's batch, logged with the loss
    args = ["eval", "--model", str(trained_model), "--data", str(small_data), "--precision", "fp32", "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "(at contrastive batch 16, the training batch)" in printed
    assert main([*args, "--out", str(tmp_path / "b"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print(f"\ntraining validation loss {validation['val/loss']:.6f}, eval loss {result['loss']:.6f} (batch 16)")
    assert result["loss_batch_size"] == 16 and result["loss"] == pytest.approx(validation["val/loss"], abs=1e-4)
    # another batch is another loss, and says so
    assert main([*args, "--out", str(tmp_path / "c"), "--loss-batch", "4"]) == 0
    assert "(at contrastive batch 4, --loss-batch)" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "d"), "--loss-batch", "1"]) == 2
    assert "at least 2 pairs" in capsys.readouterr().err


def _search_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["search", *args, "--json", "--precision", "fp32", "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_index_then_search_json(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = small_data / "images" / "val"
    by_folder = _search_json(
        capsys, "--model", str(trained_model), "--images", str(images), "--prompt", PROMPT, "--top-k", "4"
    )
    assert by_folder["query"] == PROMPT and [r["rank"] for r in by_folder["results"]] == [1, 2, 3, 4]
    scores = [r["score"] for r in by_folder["results"]]
    assert scores == sorted(scores, reverse=True) and all(
        Path(r["path"]).parent == images for r in by_folder["results"]
    )
    assert (
        main(
            [
                "index",
                "--model",
                str(trained_model),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "idx"),
                "--precision",
                "fp32",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert "24 images (24 new" in capsys.readouterr().out
    by_index = _search_json(
        capsys, "--model", str(trained_model), "--index", str(tmp_path / "idx"), "--prompt", PROMPT, "--top-k", "4"
    )
    assert by_index == by_folder
    query = by_folder["results"][0]["path"]  # an image query finds that image first
    assert (
        _search_json(capsys, "--model", str(trained_model), "--index", str(tmp_path / "idx"), "--image", query)[
            "results"
        ][0]["path"]
        == query
    )
    assert (
        main(
            ["search", "--model", str(trained_model), "--index", str(tmp_path / "idx"), "--prompt", "x", "--top-k", "0"]
        )
        == 2
    )
    assert "--top-k must be at least 1" in capsys.readouterr().err


def test_seed_main_py_is_the_search_command(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--model",
        str(trained_model),
        "--images",
        str(small_data / "images" / "val"),
        "--prompt",
        PROMPT,
        "--top-k",
        "3",
        "--json",
        "--precision",
        "fp32",
        "--workers",
        "0",
    ]
    run = _run("src/main.py", *args, env={"FINDERPARTNER_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == _search_json(capsys, *args[:-5])


def test_seed_check_env_script_json() -> None:
    run = _run("scripts/check_env.py", "--json")
    report = json.loads(run.stdout)
    assert run.returncode == (0 if report["ok"] else 1) and report["python"]["version"] == ".".join(
        map(str, sys.version_info[:3])
    )


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("src/train_clip.py", ["--config", "--resume", "--create_sample_data"]),
        ("export_clip.py", ["--model_path", "--output_dir", "--fp16", "--int8"]),
        ("gradio_demo.py", ["--model_path", "--host", "--port", "--index"]),
    ],
)
def test_seed_scripts_answer_help_from_any_folder(script: str, expected: list[str], tmp_path: Path) -> None:
    run = _run(str(ROOT / script), "--help", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert all(flag in run.stdout for flag in expected), run.stdout
