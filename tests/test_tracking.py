"""Tracking: no training window is lost, TensorBoard gets hparams / config / histograms / the retrieval grid,
a resumed run continues its W&B run, and a tracker that is not installed is refused up front."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml
from helpers import HIDE_PACKAGES, launcher_env, micro_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from finderpartner.cli import main
from finderpartner.config import TrackerName, config_from_dict, load_config
from finderpartner.data.sources import EvalSet
from finderpartner.env import TRACKERS
from finderpartner.errors import ConfigError, FinderPartnerError
from finderpartner.evaluate import RetrievalExamples, retrieval_examples
from finderpartner.train import train
from finderpartner.train.retrieval_grid import HEADER, OTHER, OWN, PAD, SAME_CAPTION, TEXT_WIDTH, THUMB, grid_size
from finderpartner.train.retrieval_grid import retrieval_grid as draw_grid
from finderpartner.train.tracking import check_trackers, wandb_mode

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

ROOT = Path(__file__).resolve().parents[1]


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step run with log_every 10 (shorter than one log window) and TensorBoard on."""
    raw = micro_config(tmp_path_factory.mktemp("short"), small_data, max_steps=3, log_every=10)
    raw["tracking"] = {"tensorboard": True}
    return train(config_from_dict(raw)).run_dir


def test_a_run_shorter_than_one_log_window_logs_its_training_metrics(short_run: Path) -> None:
    train_lines = [r for r in _jsonl(short_run) if "train/loss" in r]
    assert [r["step"] for r in train_lines] == [3]
    assert math.isfinite(train_lines[0]["train/loss"]) and train_lines[0]["train/samples_per_s"] > 0
    loss = _events(short_run).Scalars("train/loss")
    assert [e.step for e in loss] == [3]
    assert loss[0].value == pytest.approx(train_lines[0]["train/loss"], rel=1e-6)


def test_the_steps_before_a_checkpoint_are_logged_before_it(small_data: Path, tmp_path: Path) -> None:
    # log_every 10 never comes; checkpoints at 2 and 4 and the end (5) each close a window: a resume from a
    # checkpoint starts after it, so steps logged only later would be lost if the run died in between
    raw = micro_config(tmp_path, small_data, max_steps=5, log_every=10, checkpoint_every=2)
    run_dir = train(config_from_dict(raw)).run_dir
    assert [r["step"] for r in _jsonl(run_dir) if "train/loss" in r] == [2, 4, 5]


def test_tensorboard_gets_hparams_config_histograms_and_the_retrieval_grid(short_run: Path) -> None:
    acc = _events(short_run)
    hparams = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["model.name"].string_value == "tiny"
    assert start.hparams["train.max_steps"].number_value == 3
    experiment = HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"val/mean_recall", "val/loss", "train/loss"}

    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode("utf-8")
    assert config_from_dict(yaml.safe_load(textwrap.dedent(text))) == load_config(short_run / "config.yaml")

    matching, non_matching = acc.Histograms("val/similarity/matching"), acc.Histograms("val/similarity/non_matching")
    assert [h.step for h in matching] == [h.step for h in non_matching] == [3]
    assert matching[0].histogram_value.num == 48  # 24 val images x 2 captions: every matching pair
    assert non_matching[0].histogram_value.num > 1000
    assert -1 <= matching[0].histogram_value.min <= matching[0].histogram_value.max <= 1

    (grid,) = acc.Images("val/retrievals")
    assert grid.step == 3 and (grid.width, grid.height) == grid_size(4, 5)
    picture = Image.open(io.BytesIO(grid.encoded_image_string))
    assert picture.size == grid_size(4, 5) and picture.mode == "RGB"
    assert len(list((short_run / "tensorboard").iterdir())) == 1  # one run: no hparams-only run beside it


def test_a_resume_hides_what_was_logged_after_its_checkpoint(small_data: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    raw = micro_config(tmp_path, small_data, max_steps=6, log_every=1, checkpoint_every=2)
    raw["tracking"] = {"tensorboard": True}
    run_dir = train(config_from_dict(raw)).run_dir
    train(config_from_dict(raw), resume=str(run_dir / "checkpoints" / "step_000004"))  # steps 5 and 6 again
    first, second = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    starts = [e.step for e in EventFileLoader(str(second)).Load() if e.session_log.status == SessionLog.START]
    assert starts == [5]  # TensorBoard drops the first file's events from step 5 on
    assert [e.step for e in _events(run_dir).Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _jsonl(run_dir) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_retrieval_examples_are_each_captions_top_images_and_own_rank() -> None:
    images = torch.eye(6)
    # caption j is most like image j+1, then its own image j
    texts = torch.nn.functional.normalize(torch.roll(torch.eye(6), 1, dims=1) + 0.5 * torch.eye(6), dim=1)
    ex = retrieval_examples(images, texts, torch.arange(6))
    assert ex.rows == [0, 2, 3, 5]  # evenly spread over the 6 captions
    assert [t[:2] for t in ex.top] == [[(r + 1) % 6, r] for r in ex.rows] and all(len(t) == 5 for t in ex.top)
    assert ex.rank == [2, 2, 2, 2]
    assert ex.scores[0][0] == pytest.approx(1 / math.sqrt(1.25)) and ex.scores[0][1] == pytest.approx(
        0.5 / math.sqrt(1.25)
    )


def test_the_grid_marks_the_own_image_and_other_images_with_the_same_caption(tmp_path: Path) -> None:
    colours = [(200, 0, 0), (0, 0, 200), (250, 200, 0), (0, 200, 200), (120, 0, 120), (60, 60, 60)]
    images: list = [Image.new("RGB", (40, 30), c) for c in colours]
    images[4] = tmp_path / "missing.png"  # unreadable: a grey tile, not an error
    captions = ["a red square", "a red square", "yellow", "cyan", "purple", "grey"]
    data = EvalSet("val", images, captions, [0, 1, 2, 3, 4, 5])
    # caption 0 (image 0): image 1 first (same caption, another image), its own image second, then others
    ex = RetrievalExamples(rows=[0], top=[[1, 0, 2, 4, 5]], scores=[[0.9, 0.8, 0.7, 0.6, 0.5]], rank=[2])
    grid = draw_grid(ex, data)
    assert (grid.shape[1], grid.shape[0]) == grid_size(1, 5) and grid.dtype.name == "uint8"

    def border(column: int) -> tuple[int, ...]:
        return tuple(grid[HEADER + THUMB // 2, PAD + TEXT_WIDTH + column * (THUMB + PAD) - 1])

    def centre(column: int) -> tuple[int, ...]:
        return tuple(grid[HEADER + THUMB // 2, PAD + TEXT_WIDTH + column * (THUMB + PAD) + THUMB // 2])

    assert [border(k) for k in range(5)] == [SAME_CAPTION, OWN, OTHER, OTHER, OTHER]
    assert [centre(k) for k in (0, 1, 2, 4)] == [colours[1], colours[0], colours[2], colours[5]]
    assert tuple(grid[HEADER + 8, PAD + TEXT_WIDTH + 3 * (THUMB + PAD) + 8]) == (235, 235, 235)  # unreadable
    own_x = PAD + TEXT_WIDTH + 5 * (THUMB + PAD) + 2 * PAD  # the last column: the caption's own image
    assert tuple(grid[HEADER + THUMB // 2, own_x - 1]) == OWN
    assert tuple(grid[HEADER + THUMB // 2, own_x + THUMB // 2]) == colours[0]


# --------------------------------------------------------------------------------------------------------------
# W&B


def _wandb_records(path: Path):
    """The records of a W&B ``.wandb`` file: LevelDB's log format (32 KiB blocks, 7-byte record headers) after
    W&B's own 7-byte header; each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B data file"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def _wandb_part(folder: Path) -> dict:
    """What one offline W&B run folder holds: run ids, config keys, and per history step the keys logged."""
    (data,) = folder.glob("run-*.wandb")
    part: dict = {"ids": [], "config": set(), "history": {}}
    for record in _wandb_records(data):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            part["ids"].append(record.run.run_id)
        elif kind == "config":
            part["config"] |= {u.key or ".".join(u.nested_key) for u in record.config.update}
        elif kind == "history":
            keys = {i.key or "/".join(i.nested_key) for i in record.history.item}
            part["history"].setdefault(record.history.step.num, set()).update(keys)
    return part


def test_a_resumed_run_continues_its_wandb_run(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    caplog.set_level(logging.INFO, logger="finderpartner.train.tracking")
    raw = micro_config(tmp_path, small_data, max_steps=4)  # logs every 2 steps, a checkpoint at 4
    raw["tracking"] = {"tensorboard": False, "wandb": True}
    run_dir = train(config_from_dict(raw)).run_dir
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb_run_id"]
    raw["train"]["max_steps"] = 8
    train(config_from_dict(raw), resume="auto")  # continues from the checkpoint at step 4

    assert json.loads((run_dir / "tracking.json").read_text())["wandb_run_id"] == run_id
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in parts] == [run_id, run_id]  # `wandb sync` joins them: one run
    first, second = (_wandb_part(p) for p in parts)
    assert first["ids"] == second["ids"] == [run_id]
    assert {step for step, keys in first["history"].items() if "train/loss" in keys} == {2, 4}
    assert {step for step, keys in second["history"].items() if "train/loss" in keys} == {6, 8}
    for part, step in ((first, 4), (second, 8)):  # each validation: figures, histograms and the grid
        assert {"val/mean_recall", "val/similarity/matching/_type", "val/retrievals/_type"} <= part["history"][step]
    assert {"train.lr", "model.name", "tracking.wandb"} <= first["config"]
    said = [r.getMessage() for r in caplog.records if "W&B run" in r.getMessage()]
    assert len(said) == 2 and all("offline: WANDB_MODE=offline is set in the environment" in m for m in said)


def test_wandb_mode_says_why_it_is_offline(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login user password secret\n", encoding="utf-8")
    by_user = wandb_mode({"WANDB_MODE": "offline", "NETRC": str(netrc)})
    assert by_user.mode is None and by_user.effective == "offline"
    assert by_user.reason == "WANDB_MODE=offline is set in the environment"
    no_key = wandb_mode({"NETRC": str(netrc)})
    assert no_key.mode == "offline" and "no W&B API key was found" in no_key.reason and "api.wandb.ai" in no_key.reason
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n", encoding="utf-8")
    assert wandb_mode({"NETRC": str(netrc)}) == (None, "online", f"an API key for api.wandb.ai is in {netrc}")
    assert wandb_mode({"WANDB_API_KEY": "x", "NETRC": str(tmp_path / "none")}).effective == "online"


def test_tracker_names_are_checked_by_the_config() -> None:
    assert set(TRACKERS) == set(get_args(TrackerName))  # every name the config takes has a package to check
    with pytest.raises(ConfigError, match="tracking.log_with"):
        config_from_dict({"tracking": {"log_with": ["neptune"]}})
    tracking = config_from_dict({"tracking": {"wandb": True, "log_with": ["wandb", "mlflow", "tensorboard"]}}).tracking
    assert tracking.trackers == ["tensorboard", "wandb", "mlflow"]  # the keys and log_with, each once


def test_wandb_not_installed_is_refused_before_the_run_folder_and_by_check_env(
    small_data: Path, tmp_path: Path
) -> None:
    raw = micro_config(tmp_path, small_data)
    raw["tracking"] = {"wandb": True}
    config = tmp_path / "wandb.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    (tmp_path / "sitecustomize.py").write_text(HIDE_PACKAGES, encoding="utf-8")
    env = launcher_env(FP_HIDE="wandb", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT / 'src'}")

    def hidden(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "finderpartner.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    trained = hidden("train", "--config", str(config))
    assert trained.returncode == 1, trained.stderr[-2000:]
    assert "tracking.wandb: true needs the wandb package" in trained.stderr
    assert "pip install 'finderpartner[wandb]'" in trained.stderr and "Traceback" not in trained.stderr
    assert not (tmp_path / "outputs").exists()  # refused before the run folder was made

    checked = hidden("check-env", "--config", str(config))
    assert checked.returncode == 1, checked.stdout[-2000:]
    assert "requirements not met" in checked.stdout and "environment OK" not in checked.stdout
    assert "tracking.wandb: true needs the wandb package" in checked.stdout


def test_hidden_wandb_in_process_fails_the_same_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = config_from_dict({"tracking": {"log_with": ["wandb"]}, "output_dir": str(tmp_path)})
    with pytest.raises(FinderPartnerError, match=r"tracking.log_with: \[wandb\] needs the wandb package"):
        check_trackers(cfg.tracking)
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path}\nmodel:\n  name: tiny\ntracking:\n  wandb: true\n", encoding="utf-8")
    assert main(["check-env", "--json", "--config", str(config)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and any("pip install 'finderpartner[wandb]'" in p for p in report["problems"])
