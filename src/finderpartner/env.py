"""The machine we run on: device and precision resolution, and the environment report (check-env)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(setting: str = "auto") -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def cpu_cores() -> int:
    """Cores this process may use (respects affinity masks and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str, device: torch.device) -> str:
    """'fp32', 'bf16' or 'fp16' for this device (DESIGN.md: precision auto)."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if setting == "auto":
            return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 and bf16_ok else "fp16"
        if setting == "bf16" and not bf16_ok:
            raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use precision fp16 or auto")
        return setting
    if setting == "fp16":
        raise ConfigError("precision fp16 needs a CUDA GPU; on CPU use bf16 (if supported), fp32 or auto")
    if setting == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return setting


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A zero-argument context-manager factory running the forward pass in ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Environment report (check-env)

# distribution name -> (import name, minimum version, what it is for)
REQUIRED = {
    "torch": ("torch", "2.2", "training and inference"),
    "torchvision": ("torchvision", "0.17", "image ops"),
    "transformers": ("transformers", "4.41", "CLIP models, tokenizers, processors"),
    "accelerate": ("accelerate", "0.26", "devices and multi-process launch"),
    "safetensors": ("safetensors", "0.4", "weights and checkpoints"),
    "tokenizers": ("tokenizers", "0.19", "the tiny model's tokenizer"),
    "pydantic": ("pydantic", "2.0", "config validation"),
    "pyyaml": ("yaml", "6.0", "config files"),
    "pillow": ("PIL", "9.1", "image decoding"),
    "numpy": ("numpy", "1.24", "metrics"),
    "tqdm": ("tqdm", "4.60", "progress bars"),
    "matplotlib": ("matplotlib", "3.5", "evaluation plots"),
}
OPTIONAL = {
    "tensorboard": ("tensorboard", "2.10", "TensorBoard logging (tracking.tensorboard)"),
    "faiss-cpu": ("faiss", "1.7", "gallery index and search (extra: index)"),
    "onnx": ("onnx", "1.14", "ONNX export (extra: onnx)"),
    "onnxruntime": ("onnxruntime", "1.16", "ONNX verification and --backend onnx (extra: onnx)"),
    "gradio": ("gradio", "4.0", "web demo (extra: demo)"),
    "wandb": ("wandb", "0.15", "Weights & Biases logging (extra: wandb)"),
    "peft": ("peft", "0.10", "LoRA (extra: lora)"),
    "webdataset": ("webdataset", "0.2", "tar-shard data sets (extra: shards)"),
}


def _package_status(dist: str, minimum: str, purpose: str) -> dict[str, Any]:
    from importlib import metadata

    from packaging.version import Version

    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return {"name": dist, "version": None, "minimum": minimum, "ok": False, "purpose": purpose}
    ok = Version(version.split("+")[0]) >= Version(minimum)
    return {"name": dist, "version": version, "minimum": minimum, "ok": ok, "purpose": purpose}


def _gpu_report() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"available": False}
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    return {
        "available": True,
        "count": torch.cuda.device_count(),
        "name": props.name,
        "memory_gb": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "bf16": bool(torch.cuda.is_bf16_supported()),
        "cuda_version": torch.version.cuda,
    }


def _recommendation(gpu: dict[str, Any]) -> dict[str, Any]:
    if gpu["available"]:
        precision = resolve_precision("auto", torch.device("cuda", torch.cuda.current_device()))
        mem = gpu["memory_gb"]
        # Measured orders of magnitude for ViT-B/32 at 224 px with the gradient cache (see README, "Memory").
        micro = 256 if mem >= 20 else 128 if mem >= 10 else 64 if mem >= 7 else 32
        return {
            "device": "cuda",
            "precision": precision,
            "micro_batch_size_base": micro,
            "note": f"{gpu['name']} with {mem} GB: the rtx3060 preset fits; micro_batch_size auto probes the exact size",
        }
    cores = cpu_cores()
    precision = "bf16" if cpu_supports_bf16() else "fp32"
    return {
        "device": "cpu",
        "precision": precision,
        "micro_batch_size_base": 32,
        "note": (
            f"no GPU: {cores} CPU core(s), {precision}. The tiny preset trains in minutes; fine-tuning ViT-B/32 on a CPU "
            "manages a few pairs per second per core — use a GPU for real data sets."
        ),
    }


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _model_status(name: str) -> dict[str, Any]:
    from .config import TINY

    if name == TINY:
        return {"name": name, "source": "built from the config (no download)", "ok": True}
    if Path(name).expanduser().is_dir():
        ok = (Path(name).expanduser() / "config.json").is_file()
        return {"name": name, "source": "local folder", "ok": ok}
    from .model import _in_hf_cache

    if _in_hf_cache(name):
        return {"name": name, "source": "Hugging Face cache", "ok": True}
    reachable = _hub_reachable()
    return {"name": name, "source": "hub (not cached)" if reachable else "not cached, hub unreachable", "ok": reachable}


def environment_report(config_path: str | Path | None = None) -> dict[str, Any]:
    """Everything check-env shows, as plain data; ``ok`` is False when a requirement is not met."""
    import shutil
    import sys

    required = [_package_status(d, m, p) for d, (_, m, p) in REQUIRED.items()]
    optional = [_package_status(d, m, p) for d, (_, m, p) in OPTIONAL.items()]
    gpu = _gpu_report()
    report: dict[str, Any] = {
        "python": {"version": platform.python_version(), "ok": sys.version_info >= (3, 10)},
        "platform": f"{platform.system()} {platform.machine()}",
        "required": required,
        "optional": optional,
        "gpu": gpu,
        "cpu": {"cores": cpu_cores(), "bf16_native": cpu_supports_bf16()},
        "recommendation": _recommendation(gpu),
    }
    output_dir = Path("outputs")
    if config_path is not None:
        from .config import load_config

        cfg = load_config(config_path)
        output_dir = cfg.output_dir
        report["model"] = _model_status(cfg.model.name)
    probe = output_dir if output_dir.exists() else Path.cwd()
    report["disk"] = {"path": str(output_dir), "free_gb": round(shutil.disk_usage(probe).free / 2**30, 1)}
    missing = [p for p in required if not p["ok"]]
    report["ok"] = report["python"]["ok"] and not missing and report.get("model", {}).get("ok", True)
    report["install"] = (
        "pip install " + " ".join(f"'{p['name']}>={p['minimum']}'" for p in missing) if missing else None
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    mark = lambda ok: "ok " if ok else "!! "  # noqa: E731
    lines = [f"Python {report['python']['version']} on {report['platform']}", "", "required packages:"]
    for p in report["required"]:
        lines.append(f"  {mark(p['ok'])}{p['name']:<14} {p['version'] or 'missing':<16} (>= {p['minimum']}) {p['purpose']}")
    lines.append("optional packages:")
    for p in report["optional"]:
        state = p["version"] or "not installed"
        lines.append(f"  {'ok ' if p['ok'] else '-- '}{p['name']:<14} {state:<16} {p['purpose']}")
    gpu = report["gpu"]
    lines.append("")
    if gpu["available"]:
        lines.append(f"GPU: {gpu['name']} ({gpu['memory_gb']} GB, compute {gpu['compute_capability']}, "
                     f"bf16 {'yes' if gpu['bf16'] else 'no'}, CUDA {gpu['cuda_version']}, {gpu['count']} device(s))")  # fmt: skip
    else:
        lines.append(f"GPU: none (CPU: {report['cpu']['cores']} cores, native bf16 {'yes' if report['cpu']['bf16_native'] else 'no'})")
    rec = report["recommendation"]
    lines.append(f"recommended: device {rec['device']}, precision {rec['precision']}, "
                 f"micro-batch ~{rec['micro_batch_size_base']} for the rtx3060 preset")  # fmt: skip
    lines.append(f"  {rec['note']}")
    if "model" in report:
        m = report["model"]
        lines.append(f"model {m['name']}: {m['source']}" + ("" if m["ok"] else "  <- cannot be loaded here"))
    lines.append(f"free disk at {report['disk']['path']}: {report['disk']['free_gb']} GB")
    lines.append("")
    lines.append("environment OK" if report["ok"] else f"requirements not met. {report['install'] or ''}".strip())
    return "\n".join(lines)
