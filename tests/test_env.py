"""check-env: the JSON report's schema, the readable report, and a non-zero exit when a requirement is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HIDE_PACKAGES

from finderpartner.cli import main
from finderpartner.env import REQUIRED, environment_report, format_report

ROOT = Path(__file__).resolve().parents[1]

KEY_TYPES = {
    "python": dict,
    "platform": str,
    "required": list,
    "optional": list,
    "gpu": dict,
    "cpu": dict,
    "recommendation": dict,
    "disk": dict,
    "model": (dict, type(None)),
    "problems": list,
    "ok": bool,
    "install": (str, type(None)),
}
PACKAGE_TYPES = {
    "name": str,
    "version": (str, type(None)),
    "minimum": str,
    "ok": bool,
    "purpose": str,
    "problem": (str, type(None)),
}
GPU_TYPES = {
    "available": bool,
    "count": int,
    "name": (str, type(None)),
    "memory_gb": (float, type(None)),
    "compute_capability": (str, type(None)),
    "bf16": bool,
    "cuda_version": (str, type(None)),
    "devices": list,
}


def _check_types(obj: dict, schema: dict, where: str) -> None:
    assert set(obj) == set(schema), f"{where}: keys {sorted(obj)} != {sorted(schema)}"
    for key, types in schema.items():
        assert isinstance(obj[key], types), f"{where}.{key} = {obj[key]!r} is not {types}"


def _run_hidden(tmp_path: Path, hide: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(HIDE_PACKAGES, encoding="utf-8")
    env = {**os.environ, "FP_HIDE": hide, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_env.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


def test_check_env_json_has_the_documented_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check-env", "--json"])
    report = json.loads(capsys.readouterr().out)
    _check_types(report, KEY_TYPES, "report")
    assert code == (0 if report["ok"] else 1)
    _check_types(report["python"], {"version": str, "minimum": str, "ok": bool, "executable": str}, "python")
    for p in report["required"] + report["optional"]:
        _check_types(p, PACKAGE_TYPES, p["name"])
    assert [p["name"] for p in report["required"]] == list(REQUIRED)
    assert {"torch", "transformers", "accelerate", "torchvision"} <= {p["name"] for p in report["required"]}
    assert {"onnxruntime", "gradio", "faiss-cpu"} <= {p["name"] for p in report["optional"]}
    _check_types(report["gpu"], GPU_TYPES, "gpu")
    _check_types(
        report["cpu"],
        {"cores": int, "bf16_native": bool, "name": str, "kind": str, "avx512": bool, "amx": bool, "expect": str},
        "cpu",
    )
    # what to expect from this CPU kind: fp32 (and how much slower) unless bf16 is native
    assert ("bf16" in report["cpu"]["expect"]) if report["cpu"]["bf16_native"] else ("fp32" in report["cpu"]["expect"])
    assert report["cpu"]["cores"] >= 1
    rec = report["recommendation"]
    assert rec["device"] in ("cpu", "cuda") and rec["precision"] in ("fp32", "bf16", "fp16")
    assert isinstance(rec["micro_batch_size_base"], int) and isinstance(rec["note"], str)
    _check_types(report["disk"], {"path": str, "free_gb": float, "ok": bool}, "disk")
    assert report["model"]["name"] and isinstance(report["model"]["ok"], bool) and report["model"]["required"] is False
    # this environment has everything: the test suite itself needs the required packages
    assert report["ok"] and report["problems"] == [] and report["install"] is None


def test_check_env_with_a_config_checks_its_model_and_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'runs'}\nmodel:\n  name: tiny\n", encoding="utf-8")
    assert main(["check-env", "--json", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == {
        "name": "tiny",
        "required": True,
        "source": "built from the config (no download)",
        "ok": True,
    }
    assert report["disk"]["path"] == str(tmp_path / "runs") and report["disk"]["free_gb"] > 0
    # a hub model that is not cached, with the hub unreachable (tests are offline): a requirement not met
    config.write_text("model:\n  name: finderpartner-tests/not-cached\n", encoding="utf-8")
    assert main(["check-env", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "not cached, hub unreachable" in out and "requirements not met" in out


@pytest.mark.slow  # a subprocess imports the package with a module hidden
@pytest.mark.parametrize("hidden", ["accelerate", "torch"])
def test_missing_required_package_exits_non_zero_and_says_what_to_install(tmp_path: Path, hidden: str) -> None:
    run = _run_hidden(tmp_path, hidden, "--json")
    assert run.returncode == 1, run.stderr[-2000:]
    report = json.loads(run.stdout)
    status = {p["name"]: p for p in report["required"]}
    assert status[hidden]["version"] is None and status[hidden]["problem"] == "not installed"
    assert [p["name"] for p in report["required"] if not p["ok"]] == [hidden]
    minimum = REQUIRED[hidden][1]
    assert report["install"] == f"pip install '{hidden}>={minimum}'"
    text = _run_hidden(tmp_path, hidden)  # the readable report
    assert text.returncode == 1 and "Traceback" not in text.stderr
    assert f"!! {hidden}" in text.stdout and "requirements not met" in text.stdout
    assert f"install: pip install '{hidden}>={minimum}'" in text.stdout


def test_format_report_describes_a_gpu_and_problems() -> None:
    report = environment_report()
    report["gpu"] = {
        "available": True,
        "count": 2,
        "name": "NVIDIA GeForce RTX 3060",
        "memory_gb": 12.0,
        "compute_capability": "8.6",
        "bf16": True,
        "cuda_version": "12.4",
        "devices": [],
    }
    report["disk"] = {"path": "outputs", "free_gb": 1.5, "ok": False}
    report["ok"], report["problems"], report["install"] = (
        False,
        ["accelerate: not installed"],
        "pip install 'accelerate>=0.26'",
    )
    text = format_report(report)
    assert "GPU: NVIDIA GeForce RTX 3060 (12.0 GB, compute 8.6, bf16 yes, CUDA 12.4, 2 device(s))" in text
    assert "free disk at outputs: 1.5 GB  <- low" in text
    assert text.endswith(
        "requirements not met:\n  - accelerate: not installed\ninstall: pip install 'accelerate>=0.26'"
    )


def test_check_env_says_which_cpu_kind_this_is_and_what_to_expect() -> None:
    from finderpartner.env import cpu_kind, cpu_supports_bf16

    kind = cpu_kind()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if cpu_supports_bf16():
        assert kind["kind"].startswith("native bf16") and "runs in bf16" in kind["expect"]
    elif "avx2" in flags and "avx512f" not in flags:  # e.g. the 2-core AMD EPYC without AVX512
        assert kind["kind"] == "AVX2, no AVX512" and not kind["avx512"]
        assert (
            kind["expect"].startswith("no native bf16: training runs in fp32") and "about 3x slower" in kind["expect"]
        )
    else:
        assert "fp32" in kind["expect"]
    report = environment_report()
    if not report["gpu"]["available"]:
        text = format_report(report)
        assert f"; {kind['kind']})\n  {kind['expect']}" in text
