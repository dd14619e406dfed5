"""finderpartner trial (issue 27): real training steps on the CPU, the report's fields, the injected OOM and its
recovery, nothing written, a clear error when not one pair fits, SIGTERM; the offline architectures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import launcher_env, micro_config

from finderpartner import cli
from finderpartner.config import ARCHITECTURES, config_from_dict
from finderpartner.errors import ModelError, UsageError
from finderpartner.train.trial import build_encoder, run_trial
from finderpartner.train.trial_report import gpu_peak_flops, parse_size

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder: the trial must leave it empty (no micro-batch cache)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FINDERPARTNER_CACHE", str(cache))
    return cache


def _config(tmp_path: Path, data: Path, **train: object) -> dict:
    raw = micro_config(tmp_path, data, **train)
    raw["data"]["num_workers"] = 0
    return raw


def _written(tmp_path: Path, cache: Path) -> list[str]:
    return [str(p) for p in (tmp_path / "outputs").rglob("*")] + [str(p) for p in cache.iterdir()]


def test_the_trial_measures_real_steps_and_reports_every_figure_writing_nothing(
    small_data: Path, tmp_path: Path, private_cache: Path
) -> None:
    cfg = config_from_dict(_config(tmp_path, small_data, epochs=3))
    report = run_trial(cfg, seconds=6, progress=False, config_name="micro.yaml")
    print("\n" + json.dumps({k: report[k] for k in ("batch", "measurement", "flops", "projection")}, indent=1))
    assert not (tmp_path / "outputs").exists() and _written(tmp_path, private_cache) == []  # nothing written
    assert report["device"]["type"] == "cpu" and report["precision"] == "fp32"
    assert report["model"]["parameters"] == report["model"]["trainable"] > 0
    assert (report["model"]["image_size"], report["model"]["context_length"]) == (32, 16)
    assert report["data"] == {"source": f"{small_data} (train)", "pairs_per_epoch": 128}
    batch = report["batch"]
    assert batch["contrastive"] == batch["measured_contrastive"] == 16 and batch["micro"] == 16  # full batch on CPU
    assert "within free memory" in batch["probe"]
    m = report["measurement"]
    assert m["steps"] >= 2 and m["measured_steps"] == m["steps"] - 1 and m["samples_per_s"] > 0
    assert m["step_s"] > 0 and m["total_s"] < 60
    assert report["peak_memory"]["rss_bytes"] > 100 * 2**20
    f = report["flops"]
    assert f["per_pair"] > 1e6 and f["peak"] > 1e9 and 0 < f["mfu"] < 1
    assert f["achieved"] == pytest.approx(m["samples_per_s"] * f["per_pair"])
    p = report["projection"]
    assert p["steps_per_epoch"] == 8 and p["epoch_s"] == pytest.approx(128 / m["samples_per_s"])
    assert (p["schedule"], p["schedule_steps"]) == ("epochs", 24)
    assert p["schedule_s"] == pytest.approx(3 * p["epoch_s"])
    assert report["oom"] is None and report["interrupted"] is False


def test_without_the_data_it_runs_synthetic_batches_and_projects_per_10k_pairs(
    small_data: Path, tmp_path: Path, private_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _config(tmp_path, tmp_path / "no-data-here")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["trial", "--config", str(path), "--seconds", "5", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["source"] == "synthetic" and "is not there: synthetic batches" in report["notes"][0]
    assert report["model"]["context_length"] == 16  # full-length captions of the tokenizer learnt from templates
    assert set(report["projection"]) == {"per_10k_pairs_s"}
    assert report["projection"]["per_10k_pairs_s"] == pytest.approx(10_000 / report["measurement"]["samples_per_s"])
    assert _written(tmp_path, private_cache) == []


def test_an_injected_oom_mid_step_is_recovered_by_halving_the_micro_batch(
    small_data: Path, tmp_path: Path, private_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _config(tmp_path, small_data, micro_batch_size=8)  # the gradient cache: 2 micro-batches per step
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["trial", "--config", str(path), "--seconds", "6", "--inject-oom"]) == 0
    out = capsys.readouterr()
    assert "OOM         injected at step 1 in pass 2 of the gradient cache" in out.out
    assert "recovered, micro-batch 8 -> 4" in out.out
    assert "out of memory at step 2: micro-batch halved to 4, redoing the step" in out.err  # the trainer's own retry
    report = run_trial(config_from_dict(raw), seconds=5, inject_oom=True, progress=False)
    oom = report["oom"]
    assert oom["injected"] and oom["recovered"] and (oom["micro_batch_before"], oom["micro_batch_after"]) == (8, 4)
    assert oom["how"] == "a raised torch.OutOfMemoryError"
    assert report["measurement"]["micro_batch_at_end"] == 4 and report["measurement"]["steps"] >= 3
    assert _written(tmp_path, private_cache) == []


def test_a_config_that_cannot_fit_one_pair_under_the_cap_is_a_clear_error(
    small_data: Path, tmp_path: Path, private_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, small_data)))
    assert cli.main(["trial", "--config", str(path), "--memory-cap", "100MiB"]) == 7  # TrainingError
    err = capsys.readouterr().err
    assert "error: even a micro-batch of 1 does not fit under the memory cap of 0.10 GiB" in err
    assert "Traceback" not in err and _written(tmp_path, private_cache) == []
    assert cli.main(["trial", "--config", str(path), "--memory-cap", "12"]) == 2  # a size needs its unit
    assert "--memory-cap '12': give a size with its unit" in capsys.readouterr().err


def test_sigterm_stops_the_trial_and_reports_what_it_measured(small_data: Path, tmp_path: Path) -> None:
    """As a scheduler preempts a job: SIGTERM to the whole process group, the DataLoader worker included."""
    raw = _config(tmp_path, small_data)
    raw["data"]["num_workers"] = 1
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "finderpartner.cli", "trial", "--config", str(path), "--seconds", "300", "--json"],
        env=launcher_env(FINDERPARTNER_CACHE=str(tmp_path / "cache")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait for the measurement to start
            if "measuring training steps" in line:
                break
        time.sleep(3)  # a few micro steps
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: reporting the" in err
    report = json.loads(out)
    assert report["interrupted"] is True and report["measurement"]["steps"] >= 1
    assert report["measurement"]["total_s"] < 120
    assert not (tmp_path / "outputs").exists()


def test_a_hub_clip_without_its_weights_is_measured_as_its_architecture(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE=1 (conftest): not cached, the hub not reachable; built on the meta device (shapes only)
    cfg = config_from_dict({"model": {"name": "openai/clip-vit-base-patch32"}})
    with torch.device("meta"):
        encoder, built = build_encoder(cfg, None)
    assert built.startswith("its architecture arch:ViT-B-32 with random weights: the weights cannot be fetched")
    assert sum(p.numel() for p in encoder.model.parameters()) == 151_277_313  # OpenAI's ViT-B/32
    unknown = config_from_dict({"model": {"name": "someone/not-a-public-shape"}})
    with pytest.raises(ModelError, match=r"use --set model.name=arch:ViT-B-32"):
        build_encoder(unknown, None)


@pytest.mark.parametrize(
    "name,params", [("ViT-B-32", 151_277_313), ("ViT-B-16", 149_620_737), ("ViT-L-14", 427_616_513)]
)
def test_the_named_architectures_have_the_public_sizes(name: str, params: int) -> None:
    cfg = config_from_dict({"model": {"name": f"arch:{name}"}})
    with torch.device("meta"):
        encoder, built = build_encoder(cfg, None)
    assert built == "built from the config, random weights" and encoder.kind == "architecture"
    assert sum(p.numel() for p in encoder.model.parameters()) == params  # open_clip's model table
    shape = ARCHITECTURES[name]
    assert encoder.image_spec.crop == shape["image_size"] and encoder.context_length == 77
    assert encoder.tokenize(["a dog"])["input_ids"].tolist() == [[49406, 320, 1929, 49407]]  # OpenAI's BPE


def test_an_unknown_architecture_is_a_config_error() -> None:
    with pytest.raises(Exception, match=r"model.name: unknown architecture 'arch:ViT-H-14'; known: arch:ViT-B-32"):
        config_from_dict({"model": {"name": "arch:ViT-H-14"}})


def test_device_peaks_and_sizes() -> None:
    assert gpu_peak_flops("NVIDIA GeForce RTX 3060", "bf16", tf32=False) == pytest.approx(25.4e12)
    assert gpu_peak_flops("NVIDIA GeForce RTX 3060", "fp32", tf32=True) == pytest.approx(12.7e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16", tf32=False) == pytest.approx(756e12)
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16", tf32=False) == pytest.approx(989e12)
    assert gpu_peak_flops("NVIDIA H200", "fp16", tf32=False) == pytest.approx(989e12)
    assert gpu_peak_flops("Tesla T4", "fp16", tf32=False) == pytest.approx(65e12)
    assert gpu_peak_flops("Tesla T4", "fp32", tf32=True) == pytest.approx(8.1e12)  # no TF32 there: fp32
    assert gpu_peak_flops("Tesla V100-PCIE-32GB", "fp16", tf32=False) == pytest.approx(112e12)
    assert gpu_peak_flops("Some Future GPU", "bf16", tf32=False) is None
    assert parse_size("12GiB") == parse_size("12G") == 12 * 2**30
    assert parse_size("8GB") == 8 * 10**9 and parse_size("6000MiB") == 6000 * 2**20
    for bad in ("12", "-1GiB", "twelve", "0GiB"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_the_trial_command_is_documented() -> None:
    assert "trial" in cli.build_parser().format_help()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "finderpartner trial --config" in readme
    assert os.path.isfile(Path(__file__).parents[1] / "docs" / "trial.md")
