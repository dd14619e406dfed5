"""User mistakes end in a message that names the file, row or key and says what to do, with the right exit code,
never a traceback, and leave existing files as they were. Everything runs for real: the micro model, real files."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import micro_config
from PIL import UnidentifiedImageError

from finderpartner.cli import main
from finderpartner.config import load_config
from finderpartner.data.transforms import load_image
from finderpartner.errors import ConfigError, DataError, ModelError, UsageError

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on the left"
FAST = ["--precision", "fp32", "--workers", "0"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """search --images keeps its gallery index in the user cache: keep it inside the test."""
    monkeypatch.setenv("FINDERPARTNER_CACHE", str(tmp_path / "cache"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_data(small_data: Path, dest: Path) -> Path:
    shutil.copytree(small_data, dest)
    return dest


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "caption"])
        writer.writerows(rows)


def _rows(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["filename"], r["caption"]) for r in csv.DictReader(f)]


def _config(tmp: Path, data: Path, **train: object) -> Path:
    cfg = micro_config(tmp, data, **{"epochs": 1, "checkpoint_every": 100, **train})
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# 1. Pickle weights are never loaded without --trust-pickle


class _Exploit:
    """Unpickling this creates ``marker``: what a malicious pytorch_model.bin could do (or worse)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def pickled_model(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder whose only weights are a malicious pickle pytorch_model.bin, the marker it would create)."""
    tmp = tmp_path_factory.mktemp("pickled")
    folder = tmp / "best_model"
    shutil.copytree(trained_model, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp / "EXPLOITED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    return folder, marker


def test_the_malicious_pickle_really_runs_code_when_unpickled(pickled_model: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = pickled_model
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Exploit(probe)))  # what torch.load(weights_only=False) would do with the file
    assert probe.exists()
    assert b"EXPLOITED" in (folder / "pytorch_model.bin").read_bytes()


def _commands(model: Path, small_data: Path, out: Path) -> dict[str, list[str]]:
    images = str(small_data / "images" / "val")
    return {
        "search": ["search", "--model", str(model), "--images", images, "--prompt", PROMPT, *FAST],
        "eval": ["eval", "--model", str(model), "--data", str(small_data), "--out", str(out), *FAST],
        "index": ["index", "--model", str(model), "--images", images, "--out", str(out), *FAST],
        "export": ["export", "--model", str(model), "--out", str(out)],
        "demo": ["demo", "--model", str(model), "--images", images, "--port", "1", *FAST],
        "validate-data": ["validate-data", "--data", str(small_data), "--model", str(model)],
    }


@pytest.mark.parametrize("command", ["search", "eval", "index", "export", "demo", "validate-data"])
def test_pickle_weights_are_refused_without_trust_pickle(
    command: str, pickled_model: tuple[Path, Path], small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, marker = pickled_model
    before, data_before = _snapshot(folder), _snapshot(small_data)
    assert main(_commands(folder, small_data, tmp_path / "out")[command]) == ModelError.exit_code == 5
    err = capsys.readouterr().err
    assert f"{folder / 'pytorch_model.bin'} holds pickle weights" in err and "--trust-pickle" in err
    assert "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert _snapshot(folder) == before and _snapshot(small_data) == data_before


def test_training_from_a_pickle_folder_is_refused_naming_the_config_key(
    pickled_model: tuple[Path, Path], small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, marker = pickled_model
    config = _config(tmp_path, small_data)
    assert main(["train", "--config", str(config), "--set", f"model.name={folder}"]) == 5
    err = capsys.readouterr().err
    assert f"{folder / 'pytorch_model.bin'} holds pickle weights" in err and "model.trust_pickle: true" in err
    assert not marker.exists() and not (tmp_path / "outputs" / "run" / "best_model").exists()


def test_trusted_pickle_still_never_runs_code(
    pickled_model: tuple[Path, Path], small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--trust-pickle loads pickle weights with torch's weights-only unpickler: tensors yes, code no."""
    folder, marker = pickled_model
    code = main(
        [
            "search",
            "--model",
            str(folder),
            "--trust-pickle",
            "--images",
            str(small_data / "images" / "val"),
            "--prompt",
            PROMPT,
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 5 and f"{folder / 'pytorch_model.bin'}: torch's weights-only loader refused these pickle weights" in err
    )
    assert "the file holds something besides tensors (" in err and "such as code" in err
    assert "will not load it, not even with --trust-pickle" in err
    assert "weights_only" not in err  # torch's advice (weights_only=False would run the code) is not passed on
    assert "Traceback" not in err and not marker.exists()


def test_damaged_safetensors_weights_are_a_model_error(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(trained_model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy that stopped part-way
    before = _snapshot(folder)
    assert (
        main(["eval", "--model", str(folder), "--data", str(small_data), "--out", str(tmp_path / "eval"), *FAST]) == 5
    )
    err = capsys.readouterr().err
    assert f"{folder}: the safetensors weights cannot be read" in err and "damaged or incomplete" in err
    assert "Traceback" not in err and not (tmp_path / "eval").exists() and _snapshot(folder) == before


def test_trust_pickle_loads_real_pickle_weights_with_a_warning(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickle_model"
    shutil.copytree(trained_model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")  # a legitimate pickle checkpoint
    (folder / "model.safetensors").unlink()
    images = str(small_data / "images" / "val")
    assert main(["search", "--model", str(trained_model), "--images", images, "--prompt", PROMPT, "--json", *FAST]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["search", "--model", str(folder), "--images", images, "--prompt", PROMPT, "--json", *FAST]) == 5
    assert "--trust-pickle" in capsys.readouterr().err
    assert (
        main(
            [
                "search",
                "--model",
                str(folder),
                "--trust-pickle",
                "--images",
                images,
                "--prompt",
                PROMPT,
                "--json",
                *FAST,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"] == expected["results"]
    assert "loading pickle weights" in captured.err and "pytorch_model.bin" in captured.err


@pytest.mark.parametrize(
    "script, extra",
    [
        ("src/main.py", ["--prompt", PROMPT]),
        ("export_clip.py", ["--output_dir", "OUT"]),
        ("gradio_demo.py", ["--port", "1"]),
    ],
)
def test_seed_shims_refuse_pickle_and_accept_the_flag(
    script: str, extra: list[str], pickled_model: tuple[Path, Path], small_data: Path, tmp_path: Path
) -> None:
    folder, marker = pickled_model
    flag = "--model" if script == "src/main.py" else "--model_path"
    extra = [str(tmp_path / "out") if a == "OUT" else a for a in extra]
    images = [] if script == "export_clip.py" else ["--images", str(small_data / "images" / "val")]
    args = [sys.executable, script, flag, str(folder), *images, *extra]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 5 and "--trust-pickle" in run.stderr and "Traceback" not in run.stderr, run.stderr
    help_run = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "--trust-pickle" in help_run.stdout
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cached_hub_model_with_only_pickle_weights_is_refused(
    pickled_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id whose cached snapshot has only pytorch_model.bin (how old hub models come) is refused by name."""
    from huggingface_hub import constants

    from finderpartner.model import load_model

    folder, marker = pickled_model
    repo = tmp_path / "hub" / "models--someone--old-clip"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as e:
        load_model("someone/old-clip")
    assert f"{snapshot / 'pytorch_model.bin'} holds pickle weights" in str(e.value) and "--trust-pickle" in str(e.value)
    assert not marker.exists()


def test_in_hf_cache_does_not_swallow_real_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from finderpartner.env import in_hf_cache

    assert in_hf_cache("not a valid repo id!") is False  # an invalid id is simply not cached

    def broken(*_: object, **__: object) -> None:
        raise PermissionError("cache folder not readable")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", broken)
    with pytest.raises(PermissionError):
        in_hf_cache("openai/clip-vit-base-patch32")


# --------------------------------------------------------------------------------------------------------------
# 2. An empty prompt is refused


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_search_prompt_is_a_usage_error(
    prompt: str, trained_model: Path, small_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "search",
            "--model",
            str(trained_model),
            "--images",
            str(small_data / "images" / "val"),
            "--prompt",
            prompt,
            *FAST,
        ]
    )
    captured = capsys.readouterr()
    assert code == UsageError.exit_code == 2
    assert "--prompt is empty" in captured.err and "None" not in captured.out


def test_demo_refuses_empty_texts(trained_model: Path, small_data: Path) -> None:
    gr = pytest.importorskip("gradio")
    import torch

    from finderpartner.demo import gallery_search, image_text_scores, text_similarity
    from finderpartner.embedding import Searcher
    from finderpartner.index import cached_gallery
    from finderpartner.model import load_model

    searcher = Searcher(load_model(trained_model), device=torch.device("cpu"), precision="fp32", batch_size=8)
    image = str(min((small_data / "images" / "val").glob("*.jpg")))
    with pytest.raises(gr.Error, match="enter at least one text"):
        image_text_scores(searcher, image, " \n  \n")
    with pytest.raises(gr.Error, match="enter at least one text"):
        text_similarity(searcher, "")
    with pytest.raises(gr.Error, match="describe who or what"):
        gallery_search(searcher, cached_gallery(searcher, small_data / "images" / "val")[0], "   ", 5)


# --------------------------------------------------------------------------------------------------------------
# 3. HEIC photos and other unreadable formats


HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x01\x00meta" + bytes(64)
no_heif_plugin = pytest.mark.skipif(
    importlib.util.find_spec("pillow_heif") is not None, reason="pillow-heif reads HEIC"
)


@no_heif_plugin
def test_heic_photo_is_named_with_the_fix(tmp_path: Path) -> None:
    photo = tmp_path / "IMG_0001.HEIC"
    photo.write_bytes(HEIC_HEAD)
    with pytest.raises(UnidentifiedImageError) as e:
        load_image(photo)
    message = str(e.value)
    assert "IMG_0001.HEIC is a HEIC/HEIF photo" in message and "pip install pillow-heif" in message
    assert "convert the photo to JPEG" in message and "JPEG, PNG, WebP" in message
    renamed = tmp_path / "photo.jpg"  # a HEIC saved under a .jpg name is recognised by its content
    renamed.write_bytes(HEIC_HEAD)
    with pytest.raises(UnidentifiedImageError, match="photo.jpg is a HEIC/HEIF photo"):
        load_image(renamed)


def test_unidentified_image_names_the_supported_formats(tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("not an image at all", encoding="utf-8")
    with pytest.raises(UnidentifiedImageError) as e:
        load_image(notes)
    assert "notes.png is not an image in a supported format (readable formats: JPEG, PNG, WebP, BMP, GIF, TIFF" in str(
        e.value
    )


@no_heif_plugin
def test_validate_data_reports_heic_rows_with_the_fix(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy_data(small_data, tmp_path / "data")
    (data / "images" / "val" / "holiday.heic").write_bytes(HEIC_HEAD)
    rows = _rows(data / "captions_val.csv")
    _write_csv(data / "captions_val.csv", [*rows, ("holiday.heic", "a photo from the phone")])
    assert main(["validate-data", "--data", str(data), "--split", "val"]) == 1
    out = capsys.readouterr().out
    assert (
        f"captions_val.csv:{len(rows) + 2}: 'holiday.heic': cannot be decoded" in out
        and "pip install pillow-heif" in out
    )


@no_heif_plugin
def test_gallery_scan_reports_heic_instead_of_ignoring_it(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for src in sorted((small_data / "images" / "val").glob("*.jpg"))[:3]:
        shutil.copy(src, gallery / src.name)
    (gallery / "IMG_0002.heic").write_bytes(HEIC_HEAD)
    before = _snapshot(gallery)
    assert (
        main(["index", "--model", str(trained_model), "--images", str(gallery), "--out", str(tmp_path / "idx"), *FAST])
        == 0
    )
    captured = capsys.readouterr()
    assert "3 images (" in captured.out and "1 unreadable" in captured.out
    assert "could not embed IMG_0002.heic" in captured.err and "pip install pillow-heif" in captured.err
    assert _snapshot(gallery) == before


# --------------------------------------------------------------------------------------------------------------
# 4 and 5. Validation: `--set data.val_split=` disables it; a split too small to rank is refused before training


def test_empty_val_split_override_disables_validation(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_config(None, ["data.val_split="]).data.val_split == ""
    assert load_config(None, ["data.val_split=null"]).data.val_split == ""
    config = _config(tmp_path, small_data, max_steps=2)
    assert main(["train", "--config", str(config), "--set", "data.val_split="]) == 0
    capsys.readouterr()
    run = tmp_path / "outputs" / "run"
    assert (run / "best_model" / "model.safetensors").is_file()
    assert load_config(run / "config.yaml").data.val_split == ""
    # search and export find the run's images without a validation split (the training split instead)
    assert main(["search", "--model", str(run / "best_model"), "--prompt", PROMPT, "--json", *FAST]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits and all(Path(h["path"]).parent == small_data / "images" / "train" for h in hits)


@pytest.mark.parametrize("rows", [1, 3])
def test_val_split_with_one_image_is_refused_before_training(
    rows: int, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy_data(small_data, tmp_path / "data")
    image = _rows(data / "captions_val.csv")[0][0]
    _write_csv(data / "captions_val.csv", [(image, f"caption number {i}") for i in range(rows)])
    before = _snapshot(data)
    config = _config(tmp_path, data)
    assert main(["train", "--config", str(config)]) == DataError.exit_code == 4
    err = capsys.readouterr().err
    assert f"validation split 'val' ({data / 'captions_val.csv'}) has 1 distinct image(s) in {rows} pair(s)" in err
    assert "add more validation pairs" in err and "--set data.val_split=" in err
    run = tmp_path / "outputs" / "run"
    assert not (run / "best_model").exists() and not (run / "checkpoints").exists() and not (run / "tokenizer").exists()
    assert _snapshot(data) == before


def test_validation_shards_with_one_image_are_refused_before_training(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("webdataset")
    data = _copy_data(small_data, tmp_path / "data")
    _write_csv(data / "captions_val.csv", _rows(data / "captions_val.csv")[:1])
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        assert main(["-q", "make-shards", "--data", str(data), "--split", split, "--out", str(shards)]) == 0
    config = _config(tmp_path, data)
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--set",
            "data.format=webdataset",
            "--set",
            f"data.train_shards={shards / 'train-000000.tar'}",
            "--set",
            f"data.val_shards={shards / 'val-000000.tar'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 4 and f"the validation set ({shards / 'val-000000.tar'}) has 1 distinct image(s) in 1 pair(s)" in err
    assert "--set data.val_shards=" in err and not (tmp_path / "outputs" / "run" / "best_model").exists()


def test_eval_of_a_one_image_split_is_refused(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy_data(small_data, tmp_path / "data")
    _write_csv(data / "captions_val.csv", _rows(data / "captions_val.csv")[:1])
    assert (
        main(["eval", "--model", str(trained_model), "--data", str(data), "--out", str(tmp_path / "eval"), *FAST]) == 4
    )
    assert "split 'val'" in capsys.readouterr().err and not (tmp_path / "eval").exists()


# --------------------------------------------------------------------------------------------------------------
# 6 and 7. CSVs that validate-data used to pass, or crash on


def test_header_only_csv_is_a_fatal_problem_in_validate_data_and_train(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy_data(small_data, tmp_path / "data")
    _write_csv(data / "captions_val.csv", [])
    before = _snapshot(data)
    assert main(["validate-data", "--data", str(data), "--split", "val"]) == 1
    out = capsys.readouterr().out
    assert f"{data / 'captions_val.csv'}: no rows" in out
    assert main(["validate-data", "--data", str(data), "--split", "val", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["val"]["problems"]
    assert [(p["kind"], p["fatal"]) for p in problems] == [("no_rows", True)]
    assert main(["train", "--config", str(_config(tmp_path, data))]) == 4
    assert f"{data / 'captions_val.csv'}: no rows" in capsys.readouterr().err
    assert _snapshot(data) == before


def test_huge_caption_is_reported_on_its_line_and_reading_goes_on(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy_data(small_data, tmp_path / "data")
    rows = _rows(data / "captions_val.csv")
    _write_csv(data / "captions_val.csv", [rows[0], (rows[1][0], "x" * 10_000_000), *rows[2:]])
    before = _snapshot(data)
    assert main(["validate-data", "--data", str(data), "--split", "val"]) == 1
    captured = capsys.readouterr()
    assert f"{data / 'captions_val.csv'}:3: a field is longer than 131072 characters" in captured.out
    assert f"val: {len(rows) - 1} usable pair(s) of {len(rows)}" in captured.out  # the rows after it were read
    assert "Traceback" not in captured.err
    assert main(["train", "--config", str(_config(tmp_path, data))]) == 4
    assert f"{data / 'captions_val.csv'}:3: a field is longer than" in capsys.readouterr().err
    assert _snapshot(data) == before


def test_export_verification_captions_with_a_huge_field_are_an_export_error(small_data: Path, tmp_path: Path) -> None:
    from finderpartner.errors import ExportError
    from finderpartner.interop.verify import read_verification_inputs

    captions = tmp_path / "captions.csv"
    _write_csv(captions, [("a.jpg", "fine"), ("b.jpg", "x" * 10_000_000)])
    with pytest.raises(ExportError, match=f"cannot read captions from {captions} .*field larger than field limit"):
        read_verification_inputs(small_data / "images" / "val", captions)


# --------------------------------------------------------------------------------------------------------------
# 8. Config paths that are not readable files


def test_config_that_is_a_folder_or_unreadable_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    assert main(["train", "--config", str(folder)]) == ConfigError.exit_code == 3
    assert f"config file {folder} is a folder" in capsys.readouterr().err
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)  # unreadable whoever runs the test (root included)
    assert main(["train", "--config", str(loop)]) == 3
    assert f"cannot read config file {loop}: Too many levels of symbolic links" in capsys.readouterr().err
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.yaml"
        locked.write_text("seed: 1\n", encoding="utf-8")
        locked.chmod(0)
        assert main(["train", "--config", str(locked)]) == 3
        assert f"cannot read config file {locked}: Permission denied" in capsys.readouterr().err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"seed: \xff\xfe\n")
    assert main(["train", "--config", str(binary)]) == 3
    assert f"config file {binary} is not UTF-8" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# 9. Captions cut to the context length are counted, once


LONG = "a large red circle on the left next to a small blue star in the center above a green square on the right side"


def test_training_warns_once_about_captions_longer_than_the_context(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy_data(small_data, tmp_path / "data")
    rows = _rows(data / "captions_train.csv")
    firsts = sorted({f: i for i, (f, _) in reversed(list(enumerate(rows)))}.values())[:6]  # rows of 6 different images
    for i in firsts:
        rows[i] = (rows[i][0], LONG if i != firsts[-1] else LONG + " again")
    _write_csv(data / "captions_train.csv", rows)
    assert main(["train", "--config", str(_config(tmp_path, data, max_steps=1)), "--set", "data.val_split="]) == 0
    err = capsys.readouterr().err
    note = f"6 of {len(rows)} captions (2 distinct) are longer than the model's 16-token context and are cut, e.g. '{LONG[:77]}...'"
    assert err.count("are longer than the model's") == 1 and note in err


def test_eval_warns_once_about_captions_longer_than_the_context(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy_data(small_data, tmp_path / "data")
    rows = _rows(data / "captions_val.csv")
    second = next(i for i, (f, _) in enumerate(rows) if f != rows[0][0])  # a row of another image
    rows[0], rows[second] = (rows[0][0], LONG), (rows[second][0], LONG)
    _write_csv(data / "captions_val.csv", rows)
    assert (
        main(["eval", "--model", str(trained_model), "--data", str(data), "--out", str(tmp_path / "eval"), *FAST]) == 0
    )
    err = capsys.readouterr().err
    assert err.count("are longer than the model's") == 1
    assert (
        f"captions_val.csv:2: 2 of {len(rows)} captions (1 distinct) are longer than the model's 16-token context"
        in err
    )


# --------------------------------------------------------------------------------------------------------------
# 10. The demo explains a non-image upload without showing server paths


def test_demo_upload_that_is_not_an_image_gets_a_clear_message(trained_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    import socket

    import torch

    from finderpartner.demo import launch_demo
    from finderpartner.embedding import Searcher
    from finderpartner.model import load_model

    searcher = Searcher(load_model(trained_model), device=torch.device("cpu"), precision="fp32", batch_size=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch_demo(searcher, None, port=port, prevent_thread_lock=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        upload = tmp_path / "notes.txt"
        upload.write_text("meeting notes, not a photo", encoding="utf-8")
        with pytest.raises(Exception) as e:
            client.predict(gradio_client.handle_file(str(upload)), PROMPT, api_name="/image_texts")
        message = str(e.value)
        assert "is not a readable image" in message and "JPEG, PNG" in message, message
        assert "/tmp" not in message and "gradio" not in message.lower().replace("gradio_client", ""), message
        fake = tmp_path / "photo.jpg"  # an image extension does not help
        fake.write_bytes(b"\xff\xd8 not really a jpeg")
        with pytest.raises(Exception, match="is not a readable image"):
            client.predict(gradio_client.handle_file(str(fake)), PROMPT, api_name="/image_texts")
    finally:
        demo.close()


def test_a_config_json_that_lies_about_sizes_is_a_model_error_naming_the_tensors(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    liar = Path(shutil.copytree(trained_model, tmp_path / "liar"))
    config = json.loads((liar / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2  # edited by hand, or copied from another model
    (liar / "config.json").write_text(json.dumps(config))
    code = main(["eval", "--model", str(liar), "--data", str(small_data), "--out", str(tmp_path / "ev"), *FAST])
    err = capsys.readouterr().err
    assert code == ModelError.exit_code == 5 and "Traceback" not in err
    assert f"{liar}: config.json does not describe these weights" in err
    assert "text_model.embeddings.token_embedding.weight (weights [" in err and "and " in err and "more" in err
    assert "restore the config.json saved with model.safetensors" in err and not (tmp_path / "ev").exists()


# --------------------------------------------------------------------------------------------------------------
# Messages that named the wrong cause


def test_resume_from_a_path_that_does_not_exist_says_so_and_writes_nothing(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, small_data)
    for missing in (
        tmp_path / "no_such_checkpoint",
        tmp_path / "outputs" / "elsewhere" / "checkpoints" / "step_000004",
    ):
        assert main(["train", "--config", str(config), "--resume", str(missing)]) == 6
        err = capsys.readouterr().err
        assert f"--resume {missing}: no such file or folder" in err and "manifest" not in err and "mix" not in err
        assert not (tmp_path / "outputs" / "run").exists()  # no run folder (it used to get config.yaml)
    assert main(["-q", "train", "--config", str(config), "--set", "train.max_steps=2"]) == 0
    before = _snapshot(tmp_path / "outputs" / "run")
    assert main(["train", "--config", str(config), "--resume", str(tmp_path / "no_such_checkpoint")]) == 6
    assert "no such file or folder" in capsys.readouterr().err  # not "would mix two runs"
    assert _snapshot(tmp_path / "outputs" / "run") == before


def test_resume_auto_after_settings_changed_says_what_they_do_or_refuses(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, small_data, checkpoint_every=4)
    assert main(["-q", "train", "--config", str(config), "--set", "train.max_steps=4"]) == 0
    capsys.readouterr()
    resume = ["train", "--config", str(config), "--resume", "auto"]
    assert main([*resume, "--set", "train.max_steps=2"]) == 6  # fewer steps than the checkpoint has
    err = capsys.readouterr().err
    assert (
        "train.max_steps 4 -> 2 since the checkpoint, so the run now ends at step 2, but the checkpoint is at step 4"
        in err
    )
    assert main([*resume, "--set", "train.batch_size=8"]) == 6
    assert "train.batch_size 16 -> 8 (the checkpoint's place in the data is counted in contrastive batches of 16)" in (
        capsys.readouterr().err
    )
    assert main(["-q", *resume, "--set", "train.max_steps=8", "--set", "train.lr=1e-4", "--set", "seed=8"]) == 0
    err = capsys.readouterr().err
    assert (
        "train.max_steps 4 -> 8 since the checkpoint: the run now ends at step 8, and the learning-rate schedule" in err
    )
    assert "at step 4 the learning rate goes from" in err
    assert "train.lr 0.001 -> 0.0001 since the checkpoint: not used, the resumed run keeps the checkpoint's" in err
    assert "seed 7 -> 8 since the checkpoint: the coming steps read the data as now configured" in err


def test_validate_data_names_a_missing_folder_a_file_and_a_one_image_split_as_train_does(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate-data", "--data", str(tmp_path / "nowhere")]) == 4
    assert f"--data {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    data = _copy_data(small_data, tmp_path / "data")
    assert main(["validate-data", "--data", str(data / "captions_val.csv")]) == 4
    assert (
        f"is a file; give the data folder that holds images/<split>/ and captions_<split>.csv (for this file: --data {data})"
        in (capsys.readouterr().err)
    )
    _write_csv(data / "captions_val.csv", _rows(data / "captions_val.csv")[:1])  # one validation row
    assert main(["validate-data", "--data", str(data), "--split", "val"]) == 1
    out = capsys.readouterr().out
    assert "1 distinct usable image(s) in 1 pair(s): eval and training (as data.val_split) need at least 2" in out
    assert main(["train", "--config", str(_config(tmp_path, data))]) == DataError.exit_code  # and train agrees
    assert "has 1 distinct image(s) in 1 pair(s)" in capsys.readouterr().err


def test_eval_refuses_its_report_folder_before_embedding_and_names_a_missing_split(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Path(shutil.copytree(trained_model, tmp_path / "run" / "best_model"))
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "my_notes.txt").write_text("mine")  # the default --out holds a user's file
    assert main(["eval", "--model", str(model), "--data", str(small_data), *FAST]) == 10
    err = capsys.readouterr().err
    assert "--out " in err and "(my_notes.txt); it never replaces them" in err
    assert "embedding" not in err and "checking images" not in err  # refused before any work
    assert main(["eval", "--model", str(model), "--data", str(small_data), "--split", "nosuch", *FAST]) == 4
    err = capsys.readouterr().err
    assert f"there is no split 'nosuch' (the splits in {small_data}: train, val)" in err
    assert "data.on_error" not in err and "train on" not in err  # no training advice


def test_a_huge_prompt_is_said_to_be_cut_and_echoed_short(
    trained_model: Path, small_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "a large red circle on the left " * 3600  # about 110 KB
    args = ["search", "--model", str(trained_model), "--images", str(small_data / "images" / "val"), *FAST]
    assert main([*args, "--prompt", prompt]) == 0
    captured = capsys.readouterr()
    assert re.search(
        r"--prompt is \d{5} tokens long; the model reads only the first 16 \(its context length\)", captured.err
    )
    header = captured.out.splitlines()[0]
    assert header.startswith("top 5 of 24 images for 'a large red circle") and header.endswith("...':")
    assert len(header) < 120


def test_a_zero_byte_query_image_and_an_index_of_a_file_are_named(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "query.jpg"
    empty.write_bytes(b"")
    args = ["search", "--model", str(trained_model), "--images", str(small_data / "images" / "val"), *FAST]
    assert main([*args, "--image", str(empty)]) == 4
    assert "query.jpg is a zero-byte file" in capsys.readouterr().err  # as validate-data says it
    note = tmp_path / "afile.txt"
    note.write_text("not photos")
    assert (
        main(["index", "--model", str(trained_model), "--images", str(note), "--out", str(tmp_path / "i"), *FAST]) == 4
    )
    assert f"{note} is a file, not a folder: --images takes the folder of images" in capsys.readouterr().err
