"""Never lose a user's files: one test per data-loss case. Each asserts the message, the exit code, and that every
file that existed before is byte-identical afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import micro_config
from safetensors.torch import load_file

from finderpartner.cli import main
from finderpartner.errors import CheckpointError, OutputError, StorageError
from finderpartner.interop.onnx_runtime import load_onnx_encoders
from finderpartner.search.faiss_store import FaissStore

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders (or given itself) with the SHA-256 of its bytes."""
    found = {}
    for folder in folders:
        for p in [Path(folder), *sorted(Path(folder).rglob("*"))]:
            if p.is_file():
                found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


@pytest.fixture
def photos(tmp_path: Path, small_data: Path) -> Path:
    """A user's photo folder (a copy of the sample val images, plus a note)."""
    folder = Path(shutil.copytree(small_data / "images" / "val", tmp_path / "photos"))
    (folder / "notes.txt").write_text("my holiday")
    return folder


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_index_out_equal_to_images_is_refused(trained_model: Path, photos: Path, capsys) -> None:
    before = snapshot(photos)
    code, err = _cli(capsys, "index", "--model", str(trained_model), "--images", str(photos), "--out", str(photos))
    assert code == OutputError.exit_code == 10
    assert f"--out {photos} is the input images {photos}" in err and "choose a --out outside it" in err
    assert snapshot(photos) == before


def test_index_out_inside_the_gallery_or_an_unrelated_folder_is_refused(
    trained_model: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    code, err = _cli(
        capsys, "index", "--model", str(trained_model), "--images", str(photos), "--out", str(photos / "idx")
    )
    assert code == 10 and "is inside the input images" in err and not (photos / "idx").exists()
    unrelated = tmp_path / "documents"
    unrelated.mkdir()
    (unrelated / "thesis.docx").write_bytes(b"years of work")
    before = snapshot(photos, unrelated)
    code, err = _cli(capsys, "index", "--model", str(trained_model), "--images", str(photos), "--out", str(unrelated))
    assert code == 10
    assert "holds 1 item(s) that finderpartner did not write (thesis.docx); it never replaces them" in err
    code, err = _cli(
        capsys, "index", "--model", str(trained_model), "--images", str(photos), "--out", str(unrelated), "--overwrite"
    )
    assert code == 10 and "never replaces them" in err  # --overwrite replaces only what finderpartner made
    assert snapshot(photos, unrelated) == before


def test_index_out_equal_to_model_is_refused(trained_model: Path, photos: Path, capsys) -> None:
    before = snapshot(trained_model)
    code, err = _cli(
        capsys, "index", "--model", str(trained_model), "--images", str(photos), "--out", str(trained_model)
    )
    assert code == 10 and f"is the input model {trained_model}" in err
    assert snapshot(trained_model) == before


def test_export_out_equal_to_model_is_refused(trained_model: Path, capsys) -> None:
    before = snapshot(trained_model)
    code, err = _cli(capsys, "export", "--model", str(trained_model), "--out", str(trained_model))
    assert code == 10 and f"--out {trained_model} is the input model" in err
    code, err = _cli(capsys, "export", "--model", str(trained_model), "--out", str(trained_model / "onnx"))
    assert code == 10 and "is inside the input model" in err
    assert snapshot(trained_model) == before


def test_damaged_or_foreign_model_index_is_rebuilt_in_place_with_overwrite(
    trained_model: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "idx"
    assert (
        main(["index", "--model", str(trained_model), "--images", str(photos), "--out", str(out), "--workers", "0"])
        == 0
    )
    (out / "manifest.json").write_text("{")  # damaged
    capsys.readouterr()
    code, err = _cli(capsys, "search", "--model", str(trained_model), "--index", str(out), "--prompt", "a red circle")
    assert (
        code == 4
        and f"rebuild it: finderpartner index --model <model> --images <folder> --out {out} --overwrite" in err
    )
    code, err = _cli(
        capsys, "index", "--model", str(trained_model), "--images", str(photos), "--out", str(out), "--workers", "0"
    )
    assert code == 4 and "damaged" in err  # without --overwrite: refused again, unchanged
    assert (out / "manifest.json").read_text() == "{"
    assert (
        main(
            [
                "index",
                "--model",
                str(trained_model),
                "--images",
                str(photos),
                "--out",
                str(out),
                "--workers",
                "0",
                "--overwrite",
            ]
        )
        == 0
    )
    code, _ = _cli(capsys, "search", "--model", str(trained_model), "--index", str(out), "--prompt", "a red circle")
    assert code == 0


def test_sample_data_never_replaces_a_real_data_set(small_data: Path, tmp_path: Path, capsys) -> None:
    data = Path(shutil.copytree(small_data, tmp_path / "my_data"))
    (data / "sample_meta.json").unlink()  # a user's own data set in the same layout
    (data / ".finderpartner.json").unlink()
    before = snapshot(data)
    code, err = _cli(
        capsys, "sample-data", "--out", str(data), "--overwrite", "--train-images", "4", "--val-images", "2"
    )
    assert code == 10 and "which sample-data did not write; it never replaces them" in err
    assert snapshot(data) == before


def test_make_shards_and_eval_never_write_into_their_inputs(
    trained_model: Path, small_data: Path, tmp_path: Path, capsys
) -> None:
    data = Path(shutil.copytree(small_data, tmp_path / "data"))
    before = snapshot(data, trained_model)
    images = data / "images" / "train"
    code, err = _cli(capsys, "make-shards", "--data", str(data), "--split", "train", "--out", str(images))
    assert code == 10 and f"--out {images} is the input images" in err
    code, err = _cli(
        capsys,
        "eval",
        "--model",
        str(trained_model),
        "--data",
        str(data),
        "--out",
        str(trained_model),
        "--workers",
        "0",
    )
    assert code == 10 and f"--out {trained_model} is the input model" in err
    assert snapshot(data, trained_model) == before
    shards = tmp_path / "shards"  # a shard folder beside (or inside) the data folder is fine, and re-runnable
    assert main(["make-shards", "--data", str(data), "--split", "val", "--out", str(shards), "--shard-size", "10"]) == 0
    assert main(["make-shards", "--data", str(data), "--split", "val", "--out", str(shards), "--shard-size", "30"]) == 0
    assert sorted(p.name for p in shards.glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]  # stale shards removed


# --------------------------------------------------------------------------------------------------------------
# Training into a run folder


def _config(tmp: Path, data: Path, **train: object) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(micro_config(tmp, data, **train)), encoding="utf-8")
    return path


def test_training_again_into_a_run_folder_is_refused_not_mixed(small_data: Path, tmp_path: Path, capsys) -> None:
    config = _config(tmp_path, small_data, epochs=1, checkpoint_every=4)
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "outputs" / "run"
    before = snapshot(run)
    code, err = _cli(capsys, "train", "--config", str(config))
    assert code == 10
    assert (
        f"the run folder {run} already holds a training run (checkpoints up to step 8, best_model/, metrics.jsonl). "
        "Continue it with --resume auto, start a separate run with --set experiment=NEW_NAME, or start this one "
        "over with --overwrite"
    ) in err
    code, err = _cli(capsys, "train", "--config", str(config), "--resume", "auto", "--overwrite")
    assert code == 2 and "give one of them" in err
    assert snapshot(run) == before
    assert main(["train", "--config", str(config), "--overwrite", "--set", "train.max_steps=2"]) == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]  # only the new run's
    steps = [yaml.safe_load(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 2


def test_resume_auto_with_every_checkpoint_damaged_is_an_error(small_data: Path, tmp_path: Path, capsys) -> None:
    config = _config(tmp_path, small_data, epochs=1, checkpoint_every=4)
    assert main(["train", "--config", str(config)]) == 0
    checkpoints = tmp_path / "outputs" / "run" / "checkpoints"
    for ckpt in checkpoints.iterdir():
        with open(ckpt / "model.safetensors", "r+b") as f:
            f.seek(200)
            f.write(b"garbage")
    before = snapshot(tmp_path / "outputs")
    code, err = _cli(capsys, "train", "--config", str(config), "--resume", "auto")
    assert code == CheckpointError.exit_code == 6
    assert f"--resume auto: none of the 2 checkpoint(s) in {checkpoints} is usable" in err
    assert "model.safetensors does not match its checksum" in err and "--overwrite" in err
    assert snapshot(tmp_path / "outputs") == before


def test_a_torn_metrics_line_is_ignored_on_resume(small_data: Path, tmp_path: Path, capsys) -> None:
    config = _config(tmp_path, small_data, epochs=1, checkpoint_every=4)
    assert main(["train", "--config", str(config), "--set", "train.max_steps=4"]) == 0
    metrics = tmp_path / "outputs" / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 6, "train/lo')  # a crash mid-write
    assert main(["train", "--config", str(config), "--resume", "auto", "--set", "train.max_steps=8"]) == 0
    lines = metrics.read_text().splitlines()
    assert all(line.startswith('{"step": ') and line.endswith("}") for line in lines)
    steps = [yaml.safe_load(x)["step"] for x in lines]
    assert steps == sorted(steps) and set(steps) == {2, 4, 6, 8}
    assert f"{metrics}: ignoring a torn last line" in capsys.readouterr().err


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_second_training_in_the_same_folder_is_refused_while_the_first_runs(small_data: Path, tmp_path: Path) -> None:
    """Two real processes: the second is refused with the first's PID; a SIGKILLed first leaves no stale lock."""
    config = _config(tmp_path, small_data, max_steps=100_000, checkpoint_every=100_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "finderpartner.cli", "train", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    run = tmp_path / "outputs" / "run"
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").stat().st_size:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.5)
        second = subprocess.run(
            [sys.executable, "-m", "finderpartner.cli", "train", "--config", str(config), "--resume", "auto"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert second.returncode == 10, second.stderr
        assert f"run folder {run} is in use by PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    after_kill = subprocess.run(
        [
            sys.executable,
            "-m",
            "finderpartner.cli",
            "train",
            "--config",
            str(config),
            "--overwrite",
            "--set",
            "train.max_steps=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert after_kill.returncode == 0, after_kill.stderr


# --------------------------------------------------------------------------------------------------------------
# A full disk


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A real tmpfs mounted at ``mount`` (root only; the test is skipped elsewhere), unmounted afterwards."""
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of 5 MB: room for one micro checkpoint (3.1 MB) but not two."""
    with tmpfs(tmp_path / "disk", "size=5m") as mount:
        yield mount


def test_full_disk_stops_cleanly_and_resume_after_freeing_space_is_bitwise_exact(
    small_data: Path, tmp_path: Path, small_disk: Path, capsys
) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    assert main(["train", "--config", str(_config(reference, small_data, epochs=2, checkpoint_every=4))]) == 0

    raw = micro_config(tmp_path, small_data, epochs=2, checkpoint_every=4)
    raw["output_dir"] = str(small_disk / "outputs")
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(raw))
    code, err = _cli(capsys, "train", "--config", str(config))
    run = small_disk / "outputs" / "run"
    assert code == StorageError.exit_code == 11, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"disk full while writing checkpoint {run / 'checkpoints' / 'step_000008'}" in err
    assert f"free of 5.0 MB on the disk holding {small_disk}" in err
    assert "the previous checkpoint step_000004 is intact: resume from it with --resume auto" in err
    leftovers = [p for p in small_disk.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == []
    before = snapshot(run / "checkpoints")

    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)  # space freed
    assert snapshot(run / "checkpoints") == before
    assert main(["train", "--config", str(config), "--resume", "auto"]) == 0
    final = load_file(run / "checkpoints" / "step_000016" / "model.safetensors")
    expected = load_file(reference / "outputs" / "run" / "checkpoints" / "step_000016" / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(final[k].equal(expected[k]) for k in final)


def test_a_read_only_output_dir_is_a_clear_error(small_data: Path, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "read_only", "ro,size=1m") as read_only:
        raw = micro_config(tmp_path, small_data)
        raw["output_dir"] = str(read_only / "outputs")
        config = tmp_path / "ro.yaml"
        config.write_text(yaml.safe_dump(raw))
        code, err = _cli(capsys, "train", "--config", str(config))
        assert code == StorageError.exit_code == 11 and "Traceback" not in err
        assert f"could not write the lock file of {read_only / 'outputs' / 'run'}: Read-only file system" in err


# --------------------------------------------------------------------------------------------------------------
# Rerunning a command into its own earlier output: only its own files change


def _user_files(out: Path) -> dict[str, str]:
    """Files a user adds to an output folder after the command wrote it (one inside a folder of the command's)."""
    (out / "notes.txt").write_text("my notes")
    (out / "mine").mkdir()
    (out / "mine" / "result.csv").write_text("a,b\n1,2\n")
    (out / ".old-drafts").mkdir()
    (out / ".old-drafts" / "ch1.txt").write_text("chapter one")
    inner = next((p for p in sorted(out.iterdir()) if p.is_dir() and p.name not in ("mine", ".old-drafts")), None)
    if inner is not None:
        (inner / "my_comment.txt").write_text("about these files")
    return snapshot(out / "notes.txt", out / "mine", out / ".old-drafts", *([inner] if inner else []))


def _still_there(before: dict[str, str]) -> None:
    after = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in before if Path(p).is_file()}
    assert after == before, sorted(set(before) - set(after))


def test_export_again_keeps_the_users_files_and_the_other_variants(trained_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exp0"
    assert main(["-q", "export", "--model", str(trained_model), "--out", str(out), "--int8"]) == 0
    mine = {p: h for p, h in _user_files(out).items() if "my_comment" in p or "onnx" not in p}
    int8 = snapshot(*(out / "onnx").glob("*_quantized.onnx*"))
    assert len(int8) == 3  # model, text_model, vision_model: each graph holds its weights
    capsys.readouterr()
    assert main(["export", "--model", str(trained_model), "--out", str(out), "--fp16"]) == 0
    _still_there(mine)
    _still_there(int8)  # the earlier int8 export of the same model stays beside the new fp16 one
    info = json.loads((out / "finderpartner_export.json").read_text())
    assert sorted(info["variants"]) == ["fp16", "int8"]
    assert "onnx int8" in capsys.readouterr().out  # and is verified again with the rest
    assert load_onnx_encoders(out, variant="int8").encode_texts(["a red circle"]).shape[0] == 1


def test_a_user_file_where_export_writes_is_refused_by_name(trained_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exp1"
    assert main(["-q", "export", "--model", str(trained_model), "--out", str(out)]) == 0
    (out / "onnx" / "model_quantized.onnx").write_bytes(b"the user's own quantized model")
    before = snapshot(out)
    code, err = _cli(capsys, "export", "--model", str(trained_model), "--out", str(out), "--int8")
    assert code == OutputError.exit_code
    assert f"{out / 'onnx' / 'model_quantized.onnx'} was not written by finderpartner" in err
    assert "Nothing was changed" in err and snapshot(out) == before


def test_export_variants_of_another_model_version_are_replaced_only_with_overwrite(
    trained_model: Path, tmp_path: Path, capsys
) -> None:
    from finderpartner.model import load_model, save_model

    model = Path(shutil.copytree(trained_model, tmp_path / "model"))
    out = tmp_path / "exp2"
    assert main(["-q", "export", "--model", str(model), "--out", str(out), "--int8"]) == 0
    encoder = load_model(model)  # the model is trained further: same folder, other weights
    with torch.no_grad():
        encoder.model.text_projection.weight.mul_(1.5)
    save_model(encoder, model)
    before = snapshot(out)
    code, err = _cli(capsys, "export", "--model", str(model), "--out", str(out), "--fp16")
    assert code == OutputError.exit_code and snapshot(out) == before
    assert "holds the int8 variant(s) of an earlier export of another version of this model" in err
    assert "pass --int8 to export them again too, or --overwrite to drop them" in err
    assert main(["-q", "export", "--model", str(model), "--out", str(out), "--fp16", "--overwrite"]) == 0
    assert not list((out / "onnx").glob("*_quantized*"))
    assert sorted(json.loads((out / "finderpartner_export.json").read_text())["variants"]) == ["fp16"]


def test_index_again_after_a_new_photo_keeps_the_users_files_and_dot_tmp_siblings(
    trained_model: Path, photos: Path, tmp_path: Path, small_data: Path, capsys
) -> None:
    out = tmp_path / "idx11"
    sibling = tmp_path / ".tmp-idx11"  # a user's folder that happens to have the old staging name
    sibling.mkdir()
    (sibling / "thesis.txt").write_text("years of work")
    old = tmp_path / ".old-idx11"
    old.mkdir()
    (old / "draft.txt").write_text("a draft")
    index = ["index", "--model", str(trained_model), "--images", str(photos), "--out", str(out), "--workers", "0"]
    assert main(index) == 0
    mine = _user_files(out) | snapshot(sibling, old)
    shutil.copy(small_data / "images" / "train" / "000000.jpg", photos / "new_photo.jpg")
    capsys.readouterr()
    assert main(index) == 0
    assert "(1 new, 0 changed, 0 removed, 24 unchanged)" in capsys.readouterr().out
    _still_there(mine)
    with FaissStore.open(out) as store:
        assert str(photos / "new_photo.jpg") in store.meta.live_stamps()


def test_an_out_holding_only_hidden_user_files_is_not_empty(
    trained_model: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "idx12"
    (out / ".old-drafts").mkdir(parents=True)
    (out / ".old-drafts" / "ch1.txt").write_text("chapter one")
    (out / "desktop.ini").write_text("[.ShellClassInfo]")
    before = snapshot(out)
    code, err = _cli(capsys, "index", "--model", str(trained_model), "--images", str(photos), "--out", str(out))
    assert code == OutputError.exit_code and "did not write (.old-drafts)" in err
    assert snapshot(out) == before
    (out / ".old-drafts" / "ch1.txt").unlink()
    (out / ".old-drafts").rmdir()  # only the litter Windows leaves: the folder counts as empty, the litter stays
    assert (
        main(["index", "--model", str(trained_model), "--images", str(photos), "--out", str(out), "--workers", "0"])
        == 0
    )
    assert (out / "desktop.ini").read_text() == "[.ShellClassInfo]" and (out / "manifest.json").is_file()


def test_merge_and_convert_again_keep_the_users_files(trained_model: Path, tmp_path: Path, capsys) -> None:
    mg0, oc1 = tmp_path / "mg0", tmp_path / "oc1"
    merge = ["-q", "merge", "--base", str(trained_model), "--finetuned", str(trained_model), "--out", str(mg0)]
    convert = ["-q", "convert", "--to", "open_clip", "--model", str(trained_model), "--out", str(oc1)]
    for command, out in ((merge, mg0), (convert, oc1)):
        assert main(command) == 0, capsys.readouterr().err
        mine = _user_files(out)
        assert main(command) == 0, capsys.readouterr().err
        _still_there(mine)
        assert not (out / ".finderpartner-staging").exists()


def test_checkpoint_rotation_after_skipping_a_truncated_newest_keeps_the_usable_one(
    small_data: Path, tmp_path: Path, capsys
) -> None:
    config = _config(tmp_path, small_data, epochs=1, checkpoint_every=4, keep_checkpoints=2)
    assert main(["-q", "train", "--config", str(config), "--set", "train.max_steps=8"]) == 0
    checkpoints = tmp_path / "outputs" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004", "step_000008"]
    with open(checkpoints / "step_000008" / "model.safetensors", "r+b") as f:
        f.truncate(1000)  # the newest checkpoint is damaged (a disk problem, a copy cut short)
    # resumed from step 4, with one checkpoint kept and checkpoints every 2 steps: step 6 is written ...
    resume = ["-q", "train", "--config", str(config), "--resume", "auto", "--set", "train.keep_checkpoints=1"]
    assert main([*resume, "--set", "train.checkpoint_every=2", "--set", "train.max_steps=6"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "deleting damaged checkpoint" in err
    # ... and kept: the damaged step 8 is what rotation deletes, so the next resume finds step 6
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000006"]
    assert main([*resume, "--set", "train.max_steps=8"]) == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000008"]


def test_out_dot_in_an_empty_folder_works_for_every_writer(
    trained_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`--out .` (and `./`) has an empty name: it used to end in "ValueError ... has an empty name", exit 70."""
    commands = {
        "export": ["export", "--model", str(trained_model)],
        "index": ["index", "--model", str(trained_model), "--images", str(photos), "--workers", "0"],
        "merge": ["merge", "--base", str(trained_model), "--finetuned", str(trained_model)],
        "convert": ["convert", "--to", "open_clip", "--model", str(trained_model)],
    }
    for name, command in commands.items():
        here = tmp_path / f"out_{name}"
        here.mkdir()
        monkeypatch.chdir(here)
        for out in (".", "./"):  # a second time: its own output, rewritten in place
            code, err = _cli(capsys, "-q", *command, "--out", out)
            assert code == 0, f"{name} --out {out}: {err}"
        assert (here / ".finderpartner.json").is_file() and not (here / ".finderpartner-staging").exists()
    monkeypatch.chdir(tmp_path / "out_index")
    code, err = _cli(capsys, "export", "--model", str(trained_model), "--out", ".")
    assert code == OutputError.exit_code and "--out . is a gallery index, not an ONNX export folder" in err


@pytest.mark.parametrize("command", ["index", "export"])
def test_a_full_disk_during_a_rewrite_keeps_the_previous_version_and_no_staging(
    command: str, trained_model: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    """The disk holds the output, not a second version staged beside it. (Found by the careless-user pass: the
    export's weights writer reported ENOSPC without an errno, exit 70; and the staging folder, whose proof file
    the full disk left empty, stayed and refused every later run.)"""
    with tmpfs(tmp_path / "disk", "size=20m") as disk:
        out = disk / "out"
        args = {
            "index": ["index", "--model", str(trained_model), "--images", str(photos), "--workers", "0"],
            "export": ["export", "--model", str(trained_model), "--int8"],
        }[command] + ["--out", str(out)]
        assert main(["-q", *args]) == 0
        before = snapshot(out)
        used = shutil.disk_usage(disk).used  # in the file system's blocks
        subprocess.run(["mount", "-o", f"remount,size={used + 16384}", str(disk)], check=True)
        for i in range(300):  # index: a new version needs more room; export: a second copy does not fit
            shutil.copy(next(photos.glob("*.jpg")), photos / f"new_{i}.jpg")
        capsys.readouterr()
        code, err = _cli(capsys, *args)
        assert code == StorageError.exit_code and "Traceback" not in err, err
        if command == "index":  # the store appends: what it held is intact, the parts embedded so far are kept
            assert "disk full while writing" in err or "could not write" in err, err
            ours = {k: v for k, v in snapshot(out).items() if "parts" not in str(k)}
            ours = {k: v for k, v in ours.items() if not str(k).endswith(("-wal", "-shm"))}  # SQLite's journal
            assert ours == before
        else:
            assert "disk full while writing" in err and "the previous version is intact" in err
            assert snapshot(out) == before and not (out / ".finderpartner-staging").exists()
        subprocess.run(["mount", "-o", "remount,size=60m", str(disk)], check=True)
        assert main(["-q", *args]) == 0  # space freed: the next run is not blocked by anything left behind
