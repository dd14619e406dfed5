"""The command line and the seed's entry points: exit codes, --json output, and the shims as real subprocesses."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from finderpartner.cli import build_parser, exit_code_table, main

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

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
    # a split of a data folder: each hit comes with its caption (the first of its image's rows)
    first_caption = {}
    for line in (small_data / "captions_val.csv").read_text().splitlines()[1:]:
        name, caption = line.split(",", 1)
        first_caption.setdefault(name, caption.strip('"'))
    assert [r["caption"] for r in by_folder["results"]] == [
        first_caption[Path(r["path"]).name] for r in by_folder["results"]
    ]
    assert (
        main(["search", "--model", str(trained_model), "--images", str(images), "--prompt", PROMPT, "--top-k", "2"])
        == 0
    )
    top = by_folder["results"][0]
    assert f"{top['path']}  <- {top['caption']}" in capsys.readouterr().out
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
    assert [(r["rank"], r["path"], r["score"]) for r in by_index["results"]] == [
        (r["rank"], r["path"], r["score"]) for r in by_folder["results"]
    ]
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
    ("script", "expected", "hidden"),
    [
        ("src/train_clip.py", ["--config", "--resume", "--create-sample-data"], ["--create_sample_data"]),
        ("export_clip.py", ["--model", "--out", "--fp16", "--int8"], ["--model_path", "--output_dir"]),
        ("gradio_demo.py", ["--model", "--host", "--port", "--index"], ["--model_path"]),
    ],
)
def test_seed_scripts_answer_help_from_any_folder(
    script: str, expected: list[str], hidden: list[str], tmp_path: Path
) -> None:
    """The shims' help is the command's: kebab-case flags; the seed's spellings still work (below) but are not shown."""
    run = _run(str(ROOT / script), "--help", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert all(flag in run.stdout for flag in expected), run.stdout
    assert not any(flag in run.stdout for flag in hidden), run.stdout
    assert "examples:" in run.stdout


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_help_has_a_description_examples_and_the_exit_codes(name: str) -> None:
    command = _commands()[name]
    text = command.format_help()
    assert command.description and len(command.description) > 60, name
    block = text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")  # continued lines joined
    runs = [line.strip() for line in block.splitlines() if (line + " ").startswith(f"  finderpartner {name} ")]
    assert 1 <= len(runs) <= 3 and len(runs) == len(block.splitlines()), block
    for run in runs:  # each example parses: flags that exist, values where they are needed
        argv = shlex.split(run.split(" > ")[0])[1:]
        assert build_parser().parse_args(argv).handler is not None, run
    assert f"exit codes:\n{exit_code_table()}" in text
    assert re.findall(r"--[a-z0-9-]*_", text) == [], "underscore flags belong to the hidden aliases"


def test_underscore_spellings_are_hidden_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    parse = build_parser().parse_args
    exported = parse(["export", "--model_path", "m", "--output_dir", "o", "--verify_count=4"])
    assert (exported.model, exported.out, exported.verify_count) == ("m", Path("o"), 4)
    assert parse(["demo", "--model_path=m", "--max_upload_mb", "2"]).max_upload_mb == 2.0
    assert parse(["train", "--create_sample_data"]).create_sample_data is True
    searched = parse(["search", "--model", "m", "--prompt", "x", "--top_k", "3", "--batch_size", "8"])
    assert (searched.top_k, searched.batch_size) == (3, 8)
    with pytest.raises(SystemExit) as err:  # an underscore spelling of no flag is still a usage error
        parse(["export", "--model", "m", "--out", "o", "--no_such_flag"])
    assert err.value.code == 2 and "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


def test_a_reader_that_stops_reading_is_not_an_internal_error() -> None:
    """`finderpartner ... | head`: the reader closes the pipe; the command ends quietly with 141, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "finderpartner.cli", "init-config", "--preset", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # type: ignore[union-attr]  # gone before the command writes
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_quiet_and_verbose_work_before_and_after_the_command() -> None:
    from finderpartner.cli import build_parser

    parse = build_parser().parse_args
    base = ["sample-data", "--out", "x"]
    assert parse(base).quiet is False and parse(base).verbose is False
    assert parse(["-q", *base]).quiet is True and parse([*base, "-q"]).quiet is True
    assert parse([*base, "--verbose"]).verbose is True and parse([*base, "--verbose"]).quiet is False
