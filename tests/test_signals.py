"""SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C), sent to real processes: train finishes its step, writes a
checkpoint, says how to continue and exits 12, and the resumed run ends bitwise equal to an uninterrupted one;
index keeps what it embedded; demo stops; any other command is interrupted cleanly; a second signal kills at once.
(The multi-process case, one rank signalled, is in test_distributed.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import launcher_env, micro_config
from safetensors.torch import load_file

from finderpartner.config import config_from_dict
from finderpartner.errors import INTERRUPTED, Stopped
from finderpartner.train import train

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

RUN = dict(epochs=3, checkpoint_every=1000, log_every=1)  # 24 steps; no periodic checkpoint on the way


def _cli(*args: str, group: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "finderpartner.cli", *args],
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,  # its own process group: a signal to the group reaches its DataLoader workers too
    )


def _wait_for(condition, proc: subprocess.Popen[str], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.is_file() else 0


@pytest.fixture(scope="module")
def reference(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run's final checkpoint."""
    tmp = tmp_path_factory.mktemp("reference")
    result = train(config_from_dict(micro_config(tmp, small_data, **RUN)))
    return result.run_dir / "checkpoints" / "step_000024"


@pytest.mark.parametrize(
    ("sig", "workers"), [(signal.SIGTERM, 0), (signal.SIGINT, 2)], ids=["sigterm", "sigint-to-the-group-with-workers"]
)
def test_a_signal_during_training_checkpoints_the_step_and_the_resume_is_bitwise_exact(
    sig: int, workers: int, small_data: Path, tmp_path: Path, reference: Path
) -> None:
    raw = micro_config(tmp_path, small_data, **RUN)
    raw["data"]["num_workers"] = workers
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "outputs" / "run"
    proc = _cli("train", "--config", str(config), "--set", "train.lr=1e-3", group=workers > 0)
    _wait_for(lambda: _steps_logged(run_dir) >= 3, proc, "3 training steps")
    if workers:
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does: the main process and its DataLoader workers
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    name = signal.Signals(sig).name
    assert proc.returncode == Stopped.exit_code == 12, err[-3000:]
    assert f"{name} received: finishing the current step and writing a checkpoint, then stopping" in err
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and "Traceback" not in err, err[-3000:]
    step = int(saved[0].name.split("_")[1])
    assert 3 <= step < 24
    assert (
        f"stopped: {name}: stopped after step {step} of 24 and saved checkpoint {saved[0]}; continue with "
        f"--resume auto: finderpartner train --config {config} --set train.lr=1e-3 --resume auto"
    ) in err
    resumed = subprocess.run(
        [sys.executable, "-m", "finderpartner.cli", "-q", "train", "--config", str(config), "--resume", "auto"],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, theirs = (
        load_file(run_dir / "checkpoints" / "step_000024" / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "not bitwise equal to the uninterrupted run"
    print(f"\n{name} after step {step}: checkpointed, resumed, bitwise equal")


def test_a_second_signal_kills_at_once(small_data: Path, tmp_path: Path) -> None:
    raw = micro_config(tmp_path, small_data, **RUN)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = _cli("train", "--config", str(config))
    _wait_for(lambda: _steps_logged(tmp_path / "outputs" / "run") >= 2, proc, "2 training steps")
    proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: "SIGTERM received" in proc.stderr.readline(), proc, "the first signal handled")
    proc.send_signal(signal.SIGTERM)  # while it finishes its step and writes the checkpoint
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # ended by the signal itself, at once


def _index(model: Path, images: Path, out: Path) -> list[str]:
    return ["index", "--model", str(model), "--images", str(images), "--out", str(out), "--workers", "0"]


def test_sigterm_during_index_keeps_the_images_embedded_so_far(
    trained_model: Path, small_data: Path, tmp_path: Path
) -> None:
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    images = sorted((small_data / "images").rglob("*.jpg"))
    for i in range(1200):  # long enough to be stopped halfway
        shutil.copy(images[i % len(images)], gallery / f"{i:05d}.jpg")
    total = 1200
    out = tmp_path / "idx"
    proc = _cli(*_index(trained_model, gallery, out), "--batch-size", "2")  # the work is kept every 16 images
    lines: list[str] = []

    def embedded_some() -> bool:  # a progress line: "embedding images: image 120/1200 (10%), ..."
        lines.append(proc.stderr.readline())
        return f"/{total} (" in lines[-1] and int(lines[-1].split("image ")[-1].split("/")[0]) >= 16

    _wait_for(embedded_some, proc, "16 images embedded")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = "".join(lines) + err
    assert proc.returncode == Stopped.exit_code == 12, err[-3000:]
    kept = sum(len(np.load(f)["paths"]) for f in (out / "parts").glob("part-*.npz"))  # saved as parts
    assert kept % 16 == 0 and 16 <= kept < total, kept
    assert (
        f"stopped: SIGTERM: stopped after embedding {kept} of {total} new or changed images; those {kept} are saved "
        f"in the index {out} (as parts), so running the same command again embeds only the other {total - kept}"
    ) in err
    again = subprocess.run(
        [sys.executable, "-m", "finderpartner.cli", *_index(trained_model, gallery, out)],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"{total} images ({total} new, 0 changed, 0 removed, 0 unchanged, {kept} from an interrupted run's parts)"
        in (again.stdout)
    )


def test_sigterm_interrupts_any_other_command_cleanly(trained_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    proc = _cli("export", "--model", str(trained_model), "--out", str(out))
    _wait_for(lambda: (out / ".finderpartner-staging").is_dir(), proc, "the export's staging folder")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED == 130, err[-3000:]
    assert "interrupted by SIGTERM: nothing half-written was kept" in err and "Traceback" not in err
    assert not out.exists()  # the folder it made is gone with its staging folder


def _serving(port: int) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        return True
    except OSError:
        time.sleep(0.5)
        return False


def test_sigterm_and_sigint_stop_the_demo(trained_model: Path, small_data: Path) -> None:
    for sig, port in ((signal.SIGTERM, 7881), (signal.SIGINT, 7882)):
        args = ["demo", "--model", str(trained_model), "--images", str(small_data / "images" / "val")]
        proc = _cli(*args, "--port", str(port), "--workers", "0")

        _wait_for(lambda port=port: _serving(port), proc, "the demo serving", timeout=240)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)  # a hang here is the failure
        name = signal.Signals(sig).name
        assert proc.returncode == INTERRUPTED, err[-3000:]
        assert f"demo stopped by {name}" in err and "Traceback" not in err


def test_a_signal_during_an_import_is_handled_after_it(tmp_path: Path) -> None:
    """The first seconds of every command import torch and transformers: a KeyboardInterrupt raised inside an import
    leaves the library half-initialised, and some swallow it (the careless-user pass saw Ctrl-C ignored, exit 0)."""
    (tmp_path / "slow_library.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.3)\nWHOLE = True\n"
    )
    script = (
        "import sys, time\nfrom finderpartner import signals\nsignals.interrupt_on_signals()\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "try:\n    import slow_library\n    time.sleep(10)\n    print('not interrupted')\n"
        "except KeyboardInterrupt:\n    print('interrupted after the import:', getattr(sys.modules.get('slow_library'), 'WHOLE', False))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "interrupted after the import: True", run.stdout + run.stderr


def _raised_in(filename: str, error: BaseException) -> tuple[type[BaseException], BaseException, Any]:
    try:
        exec(compile("raise error", filename, "exec"), {"error": error})
    except BaseException as e:  # noqa: BLE001 - the exception is the point
        return type(e), e, e.__traceback__
    raise AssertionError("not raised")


def test_a_dead_workers_error_in_the_resource_sharer_thread_prints_no_traceback(capsys) -> None:
    """Ctrl-C to a process group can end a DataLoader worker while multiprocessing's resource-sharer thread is
    handing it a file descriptor; that thread calls sys.excepthook itself. Only that case is kept quiet."""
    from finderpartner import signals

    signals._quiet_dead_peer(*_raised_in("/usr/lib/python3/multiprocessing/resource_sharer.py", ConnectionResetError()))
    assert capsys.readouterr().err == ""
    signals._quiet_dead_peer(*_raised_in("/somewhere/else.py", ConnectionResetError("other")))
    assert "ConnectionResetError: other" in capsys.readouterr().err
    signals._quiet_dead_peer(*_raised_in("/x/multiprocessing/resource_sharer.py", ValueError("a bug")))
    assert "ValueError: a bug" in capsys.readouterr().err
