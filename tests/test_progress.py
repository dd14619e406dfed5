"""Progress: a bar on a terminal only, plain lines (no carriage returns) in a log, nothing under -q or TQDM_DISABLE.

The commands run for real as subprocesses with their output piped (as in CI, or `| cat`); the bar is drawn on a
real pseudo-terminal.
"""

from __future__ import annotations

import io
import logging
import os
import re
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import MICRO_SPEC, launcher_env, micro_config

from finderpartner import progress
from finderpartner.progress import Progress

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The progress log lines, with the package logging at INFO (as the CLI sets it) and stderr not a terminal."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    got: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: got.append(record.getMessage())  # type: ignore[method-assign]
    pkg, log = logging.getLogger("finderpartner"), progress.log
    level = pkg.level
    pkg.setLevel(logging.INFO)
    monkeypatch.setattr(log, "propagate", False)  # not to a handler an in-process CLI run left on the package logger
    log.addHandler(handler)
    try:
        yield got
    finally:
        log.removeHandler(handler)
        pkg.setLevel(level)
        assert stderr.getvalue() == ""  # nothing but log lines, and those go through logging


def test_a_log_gets_a_line_per_tenth_with_rate_and_time_left(lines: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "MIN_GAP", 0.0)
    with Progress(total=20, desc="checking", unit="img") as bar:
        assert bar.mode == progress.LINES
        for _ in range(20):
            time.sleep(0.002)
            bar.update()
    assert [re.match(r"checking: img (\d+)/20 \((\d+)%\)", line).groups() for line in lines] == [  # type: ignore[union-attr]
        (str(n), str(5 * n)) for n in range(2, 21, 2)
    ]
    assert all(re.search(r", [\d.]+ (img/s|s/img), [\d.]+ (s|min) elapsed, ETA [\d.]+ (s|min)$", x) for x in lines[:-1])
    assert "ETA" not in lines[-1]


def test_a_loop_done_within_a_second_logs_one_line(lines: list[str]) -> None:
    for _ in Progress(range(50), desc="decoding images", unit="img"):
        pass
    assert len(lines) == 1 and lines[0].startswith("decoding images: img 50/50 (100%), ")


def test_a_loop_of_unknown_length_logs_every_few_seconds(lines: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "SECONDS", 0.2)
    bar = Progress(desc="training", unit="step")
    bar.set_postfix(loss="0.512")
    for _ in range(6):
        time.sleep(0.1)
        bar.update()
    bar.close()
    assert len(lines) >= 3, lines  # at least at 0.2 and 0.4 s, and the last stretch
    assert all(re.match(r"training: step \d+, .* elapsed; loss=0.512$", x) for x in lines), lines
    assert lines[-1].startswith("training: step 6, ")


def test_a_total_known_later_counts_from_there(lines: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A time budget decides the step count after the first steps: tenths are counted from then on."""
    monkeypatch.setattr(progress, "MIN_GAP", 0.0)
    bar = Progress(desc="training", unit="step", initial=2)
    bar.update(3)
    assert lines == []
    bar.set_total(10)
    for _ in range(5):
        bar.update()
    bar.close()
    assert [x.split(",")[0] for x in lines] == [f"training: step {n}/10 ({10 * n}%)" for n in range(6, 11)]


def test_quiet_turned_off_or_tqdm_disable_show_nothing(lines: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "MIN_GAP", 0.0)
    for _ in Progress(range(10), desc="off", disable=True):
        pass
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for _ in Progress(range(10), desc="TQDM_DISABLE"):
        pass
    monkeypatch.setenv("TQDM_DISABLE", "0")  # tqdm's reading: 0 is false
    for _ in Progress(range(10), desc="shown"):
        pass
    logging.getLogger("finderpartner").setLevel(logging.WARNING)  # what -q sets
    for _ in Progress(range(10), desc="quiet"):
        pass
    assert {x.split(":")[0] for x in lines} == {"shown"}


def _terminal(monkeypatch: pytest.MonkeyPatch) -> tuple[int, io.TextIOWrapper]:
    """A real pseudo-terminal (100 columns) as stderr; returns its other end to read what was drawn."""
    import fcntl
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    stream = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    return master, stream


def _drawn(master: int, stream: io.TextIOWrapper) -> bytes:
    stream.flush()
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        out += os.read(master, 65536)
    return out


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal (POSIX)")
def test_a_terminal_gets_a_bar_unless_quiet_or_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    master, stream = _terminal(monkeypatch)
    pkg = logging.getLogger("finderpartner")
    level = pkg.level
    try:
        pkg.setLevel(logging.INFO)
        assert progress.display() == progress.BAR
        for _ in Progress(range(5), desc="on a terminal", unit="img"):
            pass
        drawn = _drawn(master, stream)
        assert b"\r" in drawn and b"on a terminal" in drawn and b"5/5" in drawn
        monkeypatch.setenv("TQDM_DISABLE", "1")
        for _ in Progress(range(5), desc="disabled"):
            pass
        monkeypatch.delenv("TQDM_DISABLE")
        pkg.setLevel(logging.WARNING)
        for _ in Progress(range(5), desc="quiet"):
            pass
        assert _drawn(master, stream) == b""
    finally:
        pkg.setLevel(level)
        stream.close()
        os.close(master)


# --------------------------------------------------------------------------------------------------------------
# The commands, piped


def _piped(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``finderpartner ARGS | cat``: stdout and stderr are pipes."""
    environment = {k: v for k, v in launcher_env(**env).items() if k != "TQDM_DISABLE"}
    return subprocess.run(
        [sys.executable, "-m", "finderpartner.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finderpartner.config import TinySpec
    from finderpartner.model import build_tiny, save_model

    captions = ["a large red circle on the left", "a small blue square on the right"] * 4
    return save_model(build_tiny(TinySpec(**MICRO_SPEC), captions, seed=0), tmp_path_factory.mktemp("m") / "model")


def test_piped_index_prints_no_bars_and_quiet_prints_no_progress(
    saved_model: Path, small_data: Path, tmp_path: Path
) -> None:
    images = small_data / "images" / "val"  # 24 images: 6 batches of 4, one chunk
    common = ["--model", str(saved_model), "--images", str(images), "--batch-size", "4", "--workers", "0"]
    quiet = _piped("-q", "index", *common, "--out", str(tmp_path / "quiet"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "\r" not in quiet.stdout + quiet.stderr
    assert "24 images (24 new" in quiet.stdout and "embedding images" not in quiet.stderr

    logged = _piped("index", *common, "--out", str(tmp_path / "logged"))
    assert logged.returncode == 0, logged.stderr[-3000:]
    assert "\r" not in logged.stdout + logged.stderr  # neither ours nor transformers' "Loading weights" bar
    # counted in images: index embeds in chunks of batches (the work done is kept if it is stopped), one bar for all
    found = re.findall(r"INFO +embedding images: image (\d+)/24 \(\d+%\), [\d.]+ (?:image/s|s/image), ", logged.stderr)
    assert found and found[-1] == "24", logged.stderr


def test_piped_training_logs_progress_lines(small_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro_config(tmp_path, small_data, epochs=10)), encoding="utf-8")
    run = _piped("train", "--config", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stdout + run.stderr
    steps = re.findall(r"training: step (\d+)/80 \(\d+%\), .*, ([\d.]+) (s|min) elapsed.*; loss=", run.stderr)
    assert steps and steps[-1][0] == "80", run.stderr[-3000:]
    elapsed = float(steps[-1][1]) * (60 if steps[-1][2] == "min" else 1)
    if elapsed >= 3 * progress.MIN_GAP:  # slow enough for tenths a second apart: lines on the way, not only the last
        assert len(steps) >= 2, run.stderr[-3000:]
