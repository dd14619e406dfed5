"""Never lose a user's files: one test per data-loss case. Each asserts the message, the exit code, and that every
file that existed before is byte-identical afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import micro_config
from safetensors.torch import load_file

from finderpartner.cli import main
from finderpartner.errors import CheckpointError, OutputError, StorageError


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with the SHA-256 of its bytes."""
    found = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
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
    (out / "index.json").write_text("{")  # damaged
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
    assert (out / "index.json").read_text() == "{"
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
