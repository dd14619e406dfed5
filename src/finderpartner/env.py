"""The machine we run on: device and precision resolution, and the environment report (check-env)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

try:
    import torch
except ImportError:  # check-env must still run without torch, and say how to install it
    torch = None  # type: ignore[assignment]

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


@cache
def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU", set()
    name = (
        next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
        or platform.processor()
    )
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return name or "unknown CPU", set(flags)


def cpu_kind() -> dict[str, Any]:
    """Which kind of CPU this is for training, and what to expect from it (check-env)."""
    name, flags = _cpu_flags()
    avx512 = "avx512f" in flags
    if cpu_supports_bf16():
        kind = "native bf16 (AVX512-BF16/AMX)"
        expect = "training runs in bf16 (precision auto): the tiny preset at about 5.6 steps/s on 2 cores"
    elif avx512:
        kind = "AVX512 without bf16"
        expect = (
            "no native bf16: training runs in fp32 (precision auto), about 2x slower than on CPUs with "
            "AVX512-BF16; train.time_budget trains fewer steps in the same time"
        )
    elif "avx2" in flags:
        kind = "AVX2, no AVX512"
        expect = (
            "no native bf16: training runs in fp32 (precision auto), about 3x slower than on CPUs with "
            "AVX512-BF16 (the tiny preset: ~1.5-2 steps/s on 2 cores instead of ~5.6); the tiny preset's "
            "train.time_budget keeps `make run` near 5 minutes by training fewer steps"
        )
    else:
        kind = "no AVX2/AVX512" if flags else "unknown (no /proc/cpuinfo)"
        expect = (
            "no native bf16: training runs in fp32 (precision auto); expect it several times slower than on "
            "CPUs with AVX512-BF16; train.time_budget bounds the run's duration"
        )
    return {"name": name, "kind": kind, "avx512": avx512, "amx": "amx_bf16" in flags, "expect": expect}


def resolve_precision(setting: str, device: torch.device) -> str:
    """'fp32', 'bf16' or 'fp16' for this device.

    ``auto`` takes the fastest that trains reliably: on CUDA bf16 from Ampere on (same range as fp32, no loss
    scaling) else fp16 with a GradScaler; on a CPU bf16 where it has native bf16 instructions, else fp32 (emulated
    bf16 is slower than fp32). An explicit choice the device cannot do is a ConfigError, not a silent fallback.
    """
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if setting == "auto":
            return "bf16" if cuda_bf16_native(capability) else "fp16"
        if setting == "bf16" and not cuda_bf16_native(capability):
            raise ConfigError(
                f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no "
                "native bf16: that needs compute 8.0 (Ampere) or newer; below it bf16 is emulated and cuDNN has no "
                "bf16 convolution (the patch embedding). Use precision fp16 or auto"
            )
        return setting
    if setting == "fp16":
        raise ConfigError("precision fp16 needs a CUDA GPU; on CPU use bf16 (if supported), fp32 or auto")
    if setting == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return setting


def cuda_bf16_native(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability computes bf16 natively (Ampere, 8.0, and newer).

    Not ``torch.cuda.is_bf16_supported()``: by default (``including_emulation=True``) it says yes on T4, RTX 20xx
    and V100 too, where bf16 is emulated.
    """
    return capability[0] >= 8


def use_tf32(device_type: str, capability: tuple[int, int] | None, precision: str) -> bool:
    """Whether fp32 training should let matmuls and convolutions use TF32 tensor cores: on CUDA from Ampere (8.0) on.

    PyTorch leaves TF32 matmuls off by default; for training (not for checking numbers bit for bit) the 10-bit
    mantissa of their inputs is plenty (accumulation stays fp32), and it is several times faster.
    """
    return device_type == "cuda" and precision == "fp32" and capability is not None and capability[0] >= 8


def enable_tf32(device: torch.device, precision: str) -> bool:
    """Turn TF32 on for fp32 training on Ampere and newer GPUs (``use_tf32``); returns whether it did."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if not use_tf32(device.type, capability, precision):
        return False
    torch.set_float32_matmul_precision("high")  # matmuls in TF32
    torch.backends.cudnn.allow_tf32 = True  # convolutions (PyTorch's default already)
    return True


# The CUDA caching allocator's setting: segments that grow instead of new blocks per size, so that batch shapes that
# change every step (captions padded to the longest of each batch) do not fragment memory. Linux only (the
# allocator ignores it, with a warning, elsewhere).
ALLOCATOR_SETTING = "expandable_segments:True"


def allocator_setting(environ: Mapping[str, str], system: str) -> str | None:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` to set, or None: the user set one (either name), or not on Linux."""
    if system != "Linux" or "PYTORCH_CUDA_ALLOC_CONF" in environ or "PYTORCH_ALLOC_CONF" in environ:
        return None
    return ALLOCATOR_SETTING


def configure_cuda_allocator() -> None:
    """Set ``ALLOCATOR_SETTING`` unless the user chose otherwise. Read when CUDA first allocates: call it early."""
    setting = allocator_setting(os.environ, platform.system())
    if setting is not None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = setting


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
    "torch": ("torch", "2.5", "training and inference"),
    "torchvision": ("torchvision", "0.20", "image ops"),
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
    "onnxscript": ("onnxscript", "0.1", "the torch.export-based ONNX exporter (extra: onnx)"),
    "gradio": ("gradio", "4.0", "web demo (extra: demo)"),
    "wandb": ("wandb", "0.15", "Weights & Biases logging (extra: wandb)"),
    "peft": ("peft", "0.10", "LoRA (extra: lora)"),
    "webdataset": ("webdataset", "0.2", "tar-shard data sets (extra: shards)"),
    "open_clip_torch": ("open_clip", "3.1", "finderpartner convert (extra: open_clip)"),
}

# The trackers a config can ask for (config.TrackerName): the module each needs and how to install it.
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'finderpartner[wandb]'"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "comet_ml": ("comet_ml", "pip install comet_ml"),
    "aim": ("aim", "pip install aim"),
    "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"),
}

MIN_PYTHON = (3, 10)
LOW_DISK_GB = 5.0  # a run folder with checkpoints of the base model needs a few GB


def _package_status(dist: str, module: str, minimum: str, purpose: str) -> dict[str, Any]:
    """Installed version against the minimum, and whether the module can be found at all."""
    import importlib.util
    from importlib import metadata

    from packaging.version import InvalidVersion, Version

    status: dict[str, Any] = {
        "name": dist,
        "version": None,
        "minimum": minimum,
        "ok": False,
        "purpose": purpose,
        "problem": None,
    }
    try:
        status["version"] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        status["problem"] = "not installed"
        return status
    try:
        importable = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        importable = False
    try:
        new_enough = Version(status["version"].split("+")[0]) >= Version(minimum)
    except InvalidVersion:
        new_enough = True  # a local build with an odd version string: trust it
    status["ok"] = importable and new_enough
    status["problem"] = (
        None if status["ok"] else ("older than " + minimum if importable else "installed but not importable")
    )
    return status


def tracker_problems(tracking: Any) -> list[str]:
    """One line per tracker a config asks for (``TrackingConfig.trackers``) that cannot start here: the key that
    asked, what is wrong and what to install. Accelerate would silently drop such a tracker; training refuses it."""
    problems = []
    for name in tracking.trackers:
        module, install = TRACKERS[name]
        status = _package_status(module, module, OPTIONAL.get(module, (module, "0", ""))[1], "")
        if not status["ok"]:
            key = f"tracking.{name}: true" if getattr(tracking, name, False) else f"tracking.log_with: [{name}]"
            problems.append(
                f"{key} needs the {module} package ({status['problem']}): {install} (or turn it off in the config)"
            )
    return problems


def _gpu_report() -> dict[str, Any]:
    """CUDA devices as plain data; the same keys whether or not there is a GPU (null values when not)."""
    report: dict[str, Any] = {
        "available": False,
        "count": 0,
        "name": None,
        "memory_gb": None,
        "compute_capability": None,
        "bf16": False,
        "cuda_version": None,
        "devices": [],
    }
    if torch is None or not torch.cuda.is_available():
        return report
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        report["devices"].append(
            {
                "index": i,
                "name": props.name,
                "memory_gb": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    current = report["devices"][torch.cuda.current_device()]
    report.update(
        available=True,
        count=len(report["devices"]),
        name=current["name"],
        memory_gb=current["memory_gb"],
        compute_capability=current["compute_capability"],
        bf16=cuda_bf16_native(torch.cuda.get_device_capability(torch.cuda.current_device())),
        cuda_version=torch.version.cuda,
    )
    return report


def _recommendation(gpu: dict[str, Any]) -> dict[str, Any]:
    if torch is None:
        return {
            "device": None,
            "precision": None,
            "micro_batch_size_base": None,
            "note": "install PyTorch first (https://pytorch.org/get-started/locally/ for the CUDA build)",
        }
    if gpu["available"]:
        precision = resolve_precision("auto", torch.device("cuda", torch.cuda.current_device()))
        mem = gpu["memory_gb"]
        # Measured orders of magnitude for ViT-B/32 at 224 px with the gradient cache (see README, "Memory").
        micro = 256 if mem >= 20 else 128 if mem >= 10 else 64 if mem >= 7 else 32
        fits = "the clip_base preset fits" if mem >= 10 else "use the clip_base preset with a smaller micro-batch"
        return {
            "device": "cuda",
            "precision": precision,
            "micro_batch_size_base": micro,
            "note": f"{gpu['name']} with {mem} GB: {fits}; micro_batch_size auto probes the exact size",
        }
    cores = cpu_cores()
    precision = "bf16" if cpu_supports_bf16() else "fp32"
    return {
        "device": "cpu",
        "precision": precision,
        "micro_batch_size_base": 32,
        "note": (
            f"no GPU: {cores} CPU core(s), {precision}. The tiny preset (configs/clip_tiny.yaml) trains in minutes; "
            "fine-tuning ViT-B/32 on a CPU manages a few image-text pairs per second per core, so use a GPU for real "
            "data sets."
        ),
    }


def hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def in_hf_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds ``repo_id`` (its config.json): loadable without the hub.

    Raises ImportError when huggingface_hub is missing or broken: that is not the same as "not cached".
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # HFValidationError: an id that is not a valid repo name is simply "not cached"
        return False


def _model_status(name: str, required: bool, is_tiny: bool) -> dict[str, Any]:
    """Whether the model can be loaded here: tiny (built), a local folder, the HF cache, or the hub."""
    status: dict[str, Any] = {"name": name, "required": required}
    if is_tiny:
        return {**status, "source": "built from the config (no download)", "ok": True}
    if Path(name).expanduser().is_dir():
        ok = (Path(name).expanduser() / "config.json").is_file()
        return {**status, "source": "local folder" if ok else "local folder without config.json", "ok": ok}
    try:
        cached = in_hf_cache(name)
    except ImportError as e:  # a missing or broken huggingface_hub (reported above) cannot tell what is cached
        return {**status, "source": f"cannot check the Hugging Face cache: {e}", "ok": False}
    if cached:
        return {**status, "source": "Hugging Face cache", "ok": True}
    reachable = hub_reachable()
    return {
        **status,
        "source": "hub (not cached; downloads on first use)" if reachable else "not cached, hub unreachable",
        "ok": reachable,
    }


def _configured(config_path: str | Path | None) -> tuple[str | None, Path, bool, bool, list[str]]:
    """(model name, output folder, whether they are required, whether the model is the tiny preset, the
    configured trackers that cannot run here) from the config, else from the rtx3060 preset (no tracker checked)."""
    try:
        from .config import load_config, preset_config

        cfg = load_config(config_path) if config_path is not None else preset_config("rtx3060")
    except ImportError:  # pydantic or pyyaml missing: reported above
        return None, Path("outputs"), False, False, []
    trackers = tracker_problems(cfg.tracking) if config_path is not None else []
    built = cfg.model.is_tiny or cfg.model.arch is not None  # nothing to download
    return cfg.model.name, Path(cfg.output_dir), config_path is not None, built, trackers


def environment_report(config_path: str | Path | None = None) -> dict[str, Any]:
    """Everything check-env shows, as plain data; ``ok`` is False when a requirement is not met.

    Requirements: Python >= 3.10, every required package at its minimum version, and (with a config) its
    model loadable here and its trackers (tracking.wandb, tracking.log_with, ...) installed. Optional packages,
    the GPU and the disk are reported, not required.
    """
    import shutil
    import sys

    required = [_package_status(d, m, v, p) for d, (m, v, p) in REQUIRED.items()]
    optional = [_package_status(d, m, v, p) for d, (m, v, p) in OPTIONAL.items()]
    gpu = _gpu_report()
    model_name, output_dir, model_required, model_is_tiny, trackers = _configured(config_path)
    probe = next((p for p in (output_dir, *output_dir.parents) if p.exists()), Path.cwd())
    free_gb = round(shutil.disk_usage(probe).free / 2**30, 1)
    report: dict[str, Any] = {
        "python": {
            "version": platform.python_version(),
            "minimum": ".".join(map(str, MIN_PYTHON)),
            "ok": sys.version_info >= MIN_PYTHON,
            "executable": sys.executable,
        },
        "platform": f"{platform.system()} {platform.machine()}",
        "required": required,
        "optional": optional,
        "gpu": gpu,
        "cpu": {"cores": cpu_cores(), "bf16_native": cpu_supports_bf16(), **cpu_kind()},
        "recommendation": _recommendation(gpu),
        "disk": {"path": str(output_dir), "free_gb": free_gb, "ok": free_gb >= LOW_DISK_GB},
        "model": _model_status(model_name, model_required, model_is_tiny) if model_name else None,
    }
    missing = [p for p in required if not p["ok"]]
    problems = [f"{p['name']}: {p['problem']} (needs >= {p['minimum']}, for {p['purpose']})" for p in missing]
    if not report["python"]["ok"]:
        problems.insert(0, f"Python {report['python']['version']} is older than {report['python']['minimum']}")
    model = report["model"]
    if model and model["required"] and not model["ok"]:
        problems.append(f"model {model['name']}: {model['source']} (download it where there is internet, or use tiny)")
    problems += trackers  # a configured tracker that is not installed: training would refuse to start
    report["problems"] = problems
    report["ok"] = not problems
    report["install"] = (
        "pip install " + " ".join(f"'{p['name']}>={p['minimum']}'" for p in missing) if missing else None
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    py = report["python"]
    lines = [
        f"Python {py['version']} on {report['platform']}" + ("" if py["ok"] else f"  !! needs >= {py['minimum']}"),
        "",
        "required packages:",
    ]
    for p in report["required"]:
        state = p["version"] or "missing"
        note = "" if p["ok"] else f"  <- {p['problem']}"
        lines.append(
            f"  {'ok ' if p['ok'] else '!! '}{p['name']:<15} {state:<16} (>= {p['minimum']}) {p['purpose']}{note}"
        )
    lines.append("optional packages:")
    for p in report["optional"]:
        lines.append(
            f"  {'ok ' if p['ok'] else '-- '}{p['name']:<15} {p['version'] or 'not installed':<16} {p['purpose']}"
        )
    lines += ["", _format_gpu(report)]
    rec = report["recommendation"]
    if rec["device"] is not None:
        lines.append(
            f"recommended: device {rec['device']}, precision {rec['precision']}, "
            f"micro-batch ~{rec['micro_batch_size_base']} for the rtx3060 preset"
        )
    lines.append(f"  {rec['note']}")
    model = report["model"]
    if model:
        which = "configured model" if model["required"] else "rtx3060 preset model"
        lines.append(
            f"{which} {model['name']}: {model['source']}" + ("" if model["ok"] else "  <- cannot be loaded here")
        )
    disk = report["disk"]
    low = "" if disk["ok"] else "  <- low: checkpoints need a few GB"
    lines.append(f"free disk at {disk['path']}: {disk['free_gb']} GB{low}")
    lines.append("")
    if report["ok"]:
        lines.append("environment OK")
    else:
        lines.append("requirements not met:")
        lines += [f"  - {problem}" for problem in report["problems"]]
        if report["install"]:
            lines.append(f"install: {report['install']}")
    return "\n".join(lines)


def _format_gpu(report: dict[str, Any]) -> str:
    gpu = report["gpu"]
    if not gpu["available"]:
        cpu = report["cpu"]
        return (
            f"GPU: none (CPU: {cpu['name']}, {cpu['cores']} cores, native bf16 {'yes' if cpu['bf16_native'] else 'no'}, "
            f"AVX512 {'yes' if cpu['avx512'] else 'no'}; {cpu['kind']})\n  {cpu['expect']}"
        )
    return (
        f"GPU: {gpu['name']} ({gpu['memory_gb']} GB, compute {gpu['compute_capability']}, "
        f"bf16 {'yes' if gpu['bf16'] else 'no'}, CUDA {gpu['cuda_version']}, {gpu['count']} device(s))"
    )
