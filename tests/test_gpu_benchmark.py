"""benchmarks/gpu.py --dry-run: the GPU check runs end to end on the CPU (everything but CUDA), in CI-sized time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import launcher_env

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

REPO = Path(__file__).parents[1]


def test_the_gpu_benchmark_dry_run_runs_everything_but_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
        env=launcher_env(FINDERPARTNER_CACHE=str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print("\n" + result.stdout[-1500:])
    data = json.loads(out.read_text())["results"]
    assert data["dry_run"] and list(data["trials"]) == ["fp32"]  # fp16 needs CUDA
    trial = data["trials"]["fp32"]
    assert trial["measurement"]["samples_per_s"] > 0 and trial["flops"]["mfu"] > 0
    assert trial["batch"]["measured_contrastive"] == 16  # the batch compared with open_clip's
    assert data["injected_oom"]["injected"] and data["injected_oom"]["recovered"]
    assert data["open_clip"]["batch"] == 16 and data["open_clip"]["samples_per_s"] > 0
    assert data["open_clip"]["flops_per_pair"] > 0
    assert data["largest_batch"]["largest_batch_with_cache"] == 64  # the dry run's --max-batch: no cap on a CPU
    assert data["wrote_under_output_dir"] == [] and not (tmp_path / "cache").exists()
    assert "ours / open_clip (fp32)" in result.stdout and "injected OOM" in result.stdout
