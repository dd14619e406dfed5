"""Shared helpers of the benchmark scripts: data sets, the two model definitions, subprocess runs with
process-tree memory monitoring, log parsing, machine peaks, FLOP counting, tables and JSON output.

Every comparison with open_clip goes through this module so that both trainers see the same architecture,
data and tokenizer. Nothing here downloads anything: HF_HUB_OFFLINE=1 is forced for every child process.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere in this process
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
TINY_CONFIG = REPO / "configs" / "clip_tiny.yaml"
# Data sets are cached between runs (make_sample_data reuses a finished set with the same arguments).
CACHE_DIR = Path(tempfile.gettempdir()) / "finderpartner-bench"

# The tiny spec of issue 6 (the defaults of configs/clip_tiny.yaml); image_size is a per-run argument.
TINY_SPEC: dict[str, int] = {
    "image_size": 64,
    "patch_size": 8,
    "vision_width": 192,
    "vision_layers": 4,
    "vision_heads": 3,
    "text_width": 128,
    "text_layers": 4,
    "text_heads": 2,
    "context_length": 32,
    "embed_dim": 128,
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------------------
# Environment


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every trainer subprocess: offline, unbuffered, src/ importable, benchmarks/ importable."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.update(extra or {})
    return env


def machine_info() -> dict[str, Any]:
    import torch

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    flags = next((line for line in lines if line.startswith("flags")), "")
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx2": " avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "native_precisions": native_precisions(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def native_precisions() -> list[str]:
    """The precisions this machine computes natively: fp32, plus bf16 with AVX512-BF16/AMX or a CUDA GPU.

    Emulated bf16 (a CPU without those) is slower than fp32 and measuring it takes minutes: it is left out.
    """
    import torch

    from finderpartner.env import cpu_supports_bf16

    return ["fp32", "bf16"] if cpu_supports_bf16() or torch.cuda.is_available() else ["fp32"]


def machine_line() -> str:
    """One line for every report: the CPU, its relevant flags and what precision auto therefore trains in."""
    m = machine_info()
    yn = {True: "yes", False: "no"}
    flags = ", ".join(f"{k} {yn[m[k]]}" for k in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    auto = "bf16" if "bf16" in m["native_precisions"] else "fp32"
    return f"machine: {m['cpu']}, {m['cores']} cores; {flags}: precision auto = {auto}"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("finderpartner", "open_clip_torch", "torch", "transformers", "pillow", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data


def sample_data(root: str | Path | None, *, image_size: int, train_images: int, val_images: int) -> Path:
    """A finished sample data set: ``root`` as given, or one made (once) in the benchmark cache."""
    if root is not None:
        return Path(root)
    from finderpartner.data.sample import make_sample_data

    out = CACHE_DIR / f"data-{image_size}px-{train_images}-{val_images}"
    return Path(make_sample_data(out, train_images=train_images, val_images=val_images, image_size=image_size).root)


def read_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    with open(root / f"captions_{split}.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return [(r[0], r[1]) for r in rows[1:]]


def write_open_clip_csv(root: Path, split: str, out: Path, rows: int | None = None, seed: int = 0) -> Path:
    """open_clip's CsvDataset wants absolute image paths; tab-separated because captions contain commas."""
    import random

    pairs = read_pairs(root, split)
    if rows is not None:  # a random subset of ``rows`` rows (repeated if the split is smaller)
        rng = random.Random(seed)
        pairs = (
            [pairs[i % len(pairs)] for i in rng.sample(range(max(rows, len(pairs))), rows)]
            if rows > len(pairs)
            else rng.sample(pairs, rows)
        )
    image_dir = (root / "images" / split).resolve()
    with open(out, "w", encoding="utf-8", newline="") as f:
        f.write("filepath\ttitle\n")
        f.writelines(f"{image_dir / name}\t{caption}\n" for name, caption in pairs)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The two models


def tiny_spec(image_size: int = 64, patch_size: int | None = None, *, preset: bool = False) -> Any:
    """The issue-6 tiny spec (or, with ``preset``, configs/clip_tiny.yaml's) at ``image_size`` / ``patch_size``."""
    from finderpartner.config import TinySpec, load_config

    base = load_config(TINY_CONFIG).model.tiny.model_dump() if preset else TINY_SPEC
    fields = {k: base[k] for k in TINY_SPEC}
    return TinySpec(**{**fields, "image_size": image_size, "patch_size": patch_size or fields["patch_size"]})


def caption_tokenizer(root: Path, out_dir: Path) -> Any:
    """Our caption BPE, learnt from the training captions exactly as our trainer learns it, saved to ``out_dir``."""
    from finderpartner.config import TinySpec
    from finderpartner.tokenizer import build_caption_tokenizer

    vocab = TinySpec().vocab_size
    tok = build_caption_tokenizer(
        [c for _, c in read_pairs(root, "train")], vocab_size=vocab, context_length=TINY_SPEC["context_length"]
    )
    tok.save_pretrained(out_dir)
    return tok


def open_clip_model_dir(spec: Any, tokenizer: Any, out_dir: Path) -> Path:
    """An open_clip ``local-dir:`` model folder: ``open_clip_config.json`` plus our saved tokenizer.

    Matching choices (see README): ``quick_gelu`` (transformers' CLIPConfig default activation); the text tower
    pools at the first eos token (``pool_type: eos``) because our BPE's eos id (1) is not the largest id, which
    open_clip's default ``argmax`` pooling assumes; ``vocab_size`` is our tokenizer's length, so the token
    embedding has the same shape as ours (open_clip's default 49408 would add ~6M parameters); and
    ``hf_tokenizer_name`` makes open_clip load the tokenizer from this folder, so both see the same token ids.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    config = {
        "model_cfg": {
            "embed_dim": spec.embed_dim,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": spec.image_size,
                "patch_size": spec.patch_size,
                "width": spec.vision_width,
                "layers": spec.vision_layers,
                "head_width": spec.vision_width // spec.vision_heads,
                "mlp_ratio": 4.0,
            },
            "text_cfg": {
                "context_length": spec.context_length,
                "vocab_size": len(tokenizer),
                "width": spec.text_width,
                "heads": spec.text_heads,
                "layers": spec.text_layers,
                "mlp_ratio": 4.0,
                "hf_tokenizer_name": str(out_dir),
                "pool_type": "eos",
                "eos_id": tokenizer.eos_token_id,
                "pad_id": tokenizer.pad_token_id,
            },
        },
        "preprocess_cfg": {
            "size": spec.image_size,
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir


def build_both(spec: Any, tokenizer: Any, model_dir: Path) -> tuple[Any, Any]:
    """(our transformers CLIPModel, open_clip CLIP) of the same spec, randomly initialised."""
    import logging

    import open_clip

    from finderpartner.model import build_tiny

    ours = build_tiny(spec, [], tokenizer=tokenizer).model
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that a local-dir model has no weights: expected
    try:
        theirs = open_clip.create_model(f"local-dir:{model_dir}")
    finally:
        logging.getLogger().setLevel(level)
    return ours, theirs


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Machine peak and model FLOPs


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 7, max_seconds: float = 30.0) -> dict[str, float]:
    """FLOP/s of an n x n x n matmul with the current torch thread count: best (the peak) and median.

    ``n`` shrinks (to a multiple of 256, at least 256) when the repeats would take longer than ``max_seconds``
    (emulated bf16 is ~50x slower than fp32: a 2048^3 product took minutes on a CPU without AVX512).
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    probe = torch.randn(256, 256).to(dtype)
    probe @ probe
    t = time.perf_counter()
    probe @ probe
    per_flop = (time.perf_counter() - t) / (2 * 256**3)
    fitting = (max_seconds / (repeats + 2) / per_flop / 2) ** (1 / 3)
    n = max(256, min(n, int(fitting) // 256 * 256))
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    flops = 2 * n**3
    return {
        "best_flops": flops / min(times),
        "median_flops": flops / statistics.median(times),
        "n": n,
        "threads": torch.get_num_threads(),
    }


def count_flops(step: Callable[[], None]) -> int:
    """Total FLOPs that torch's FlopCounterMode sees in ``step`` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def model_flops_per_sample(
    spec: Any, tokenizer: Any, model_dir: Path, captions: Sequence[str], batch: int = 64
) -> dict[str, float]:
    """FLOPs of one forward+backward per pair for both models, on real captions (bf16 autocast where native).

    Ours pads captions to the longest in the batch; open_clip pads every caption to the context length, so its
    text tower does more work per sample. Both numbers are each trainer's real work.
    """
    import torch
    import torch.nn.functional as F

    from finderpartner.model import image_features, text_features

    ours, theirs = build_both(spec, tokenizer, model_dir)
    caps = list(captions[:batch])
    pixels = torch.randn(len(caps), 3, spec.image_size, spec.image_size)
    enc = tokenizer(caps, padding="longest", truncation=True, max_length=spec.context_length, return_tensors="pt")
    padded = tokenizer(caps, padding="max_length", truncation=True, max_length=spec.context_length, return_tensors="pt")

    bf16 = "bf16" in native_precisions()  # the counts do not depend on it; emulated bf16 is only slower

    def ours_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            i = F.normalize(image_features(ours, pixels).float(), dim=-1)
            t = F.normalize(text_features(ours, enc["input_ids"], enc["attention_mask"]).float(), dim=-1)
        (i @ t.T).logsumexp(1).sum().backward()

    def theirs_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            i, t = theirs.encode_image(pixels, normalize=True), theirs.encode_text(padded["input_ids"], normalize=True)
        (i.float() @ t.float().T).logsumexp(1).sum().backward()

    return {
        "ours": count_flops(ours_step) / len(caps),
        "open_clip": count_flops(theirs_step) / len(caps),
        "ours_text_tokens_mean": float(enc["attention_mask"].sum(1).float().mean()),
        "open_clip_text_tokens": float(spec.context_length),
    }


# ---------------------------------------------------------------------------------------------------------------
# Subprocess runs with memory monitoring


@dataclass
class RunResult:
    returncode: int
    seconds: float
    peak_rss_bytes: int  # peak of the summed RSS of the process tree (shared pages counted once per process)
    peak_pss_bytes: int  # peak of the summed PSS (shared pages split between processes: the honest total)
    peak_main_rss_bytes: int
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # user+system CPU time: main process, children
    foreign_load: float = math.nan  # average cores busy with other processes meanwhile (the noise on a shared box)
    log: str = ""


class TreeMonitor(threading.Thread):
    """Polls a process and its descendants: peak summed RSS/PSS, and the CPU time each one used.

    RSS is cheap to read (every ``interval``); PSS needs /proc/PID/smaps_rollup (~13 ms per torch process, which
    would steal ~8% of a core at 2 Hz), so it is read only when the summed RSS reaches a new high (+1%) or
    every 10 s. The PSS peak is therefore a close lower bound.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.peak_main_rss = 0
        self.cpu: dict[int, tuple[bool, float]] = {}  # pid -> (is_main, cpu seconds so far)
        self._halt = threading.Event()
        self._last_full = (0, 0.0)  # (summed RSS, time) of the last PSS reading

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            self._sample(root, psutil)
            self._halt.wait(self.interval)

    def _sample(self, root: Any, psutil: Any) -> None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for p in procs:
            try:
                mem, times = p.memory_info(), p.cpu_times()
            except psutil.Error:
                continue
            rss += mem.rss
            if p.pid == self.pid:
                self.peak_main_rss = max(self.peak_main_rss, mem.rss)
            self.cpu[p.pid] = (p.pid == self.pid, times.user + times.system)
        self.peak_rss = max(self.peak_rss, rss)
        last_rss, last_time = self._last_full
        if rss > 1.01 * last_rss or time.monotonic() - last_time > 10:
            self.peak_pss = max(self.peak_pss, self._pss(procs, psutil))
            self._last_full = (max(rss, last_rss), time.monotonic())

    @staticmethod
    def _pss(procs: list[Any], psutil: Any) -> int:
        total = 0
        for p in procs:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            total += getattr(info, "pss", info.rss)
        return total

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def cpu_split(self) -> dict[str, float]:
        main = sum(t for is_main, t in self.cpu.values() if is_main)
        return {"main": round(main, 2), "children": round(sum(t for is_main, t in self.cpu.values() if not is_main), 2)}


def run_monitored(
    cmd: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800.0,
    on_poll: Callable[[subprocess.Popen], bool] | None = None,
) -> RunResult:
    """Run ``cmd`` with stdout+stderr to ``log_path`` while a monitor records memory and CPU time.

    ``on_poll`` (called about twice a second) may return True to stop the run early (the whole process group
    is terminated; the return code is then reported as 0 when the stop was requested).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    busy_start, children_start = busy_cpu_seconds(), _children_cpu_seconds()
    stopped = False
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        monitor = TreeMonitor(proc.pid)
        monitor.start()
        try:
            while proc.poll() is None:
                if time.perf_counter() - start > timeout:
                    _kill_group(proc)
                    break
                if on_poll is not None and on_poll(proc):
                    stopped = True
                    _kill_group(proc)
                    break
                time.sleep(0.5)
            proc.wait()
        finally:
            monitor.stop()
            if proc.poll() is None:
                _kill_group(proc)
    seconds = time.perf_counter() - start
    ours = _children_cpu_seconds() - children_start  # exact: the trainer and its reaped workers
    foreign = (busy_cpu_seconds() - busy_start - ours) / seconds if seconds > 0 else math.nan
    text = log_path.read_text(encoding="utf-8", errors="replace")
    code = 0 if stopped else proc.returncode
    return RunResult(
        code,
        seconds,
        monitor.peak_rss,
        monitor.peak_pss,
        monitor.peak_main_rss,
        monitor.cpu_split(),
        max(0.0, foreign),
        text,
    )


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have been busy (user+nice+system+irq+softirq+steal) since boot."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the process group we started (the trainer and its DataLoader workers), nothing else."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------
# Trainer command lines and their logs


# What open_clip_command gives open_clip (``--aug-cfg``); ours gets the same unless a caller overrides it.
OPEN_CLIP_AUGMENT = {"data.augment.crop_scale": [0.9, 1.0], "data.augment.color_jitter": 0.1}


def spec_overrides(spec: Any) -> dict[str, Any]:
    """``--set`` overrides that make our trainer build exactly ``spec`` (whatever configs/clip_tiny.yaml says)."""
    return {f"model.tiny.{k}": getattr(spec, k) for k in TINY_SPEC}


def ours_command(overrides: dict[str, Any], patches: Sequence[str] = ()) -> list[str]:
    """``finderpartner train`` with ``--set`` overrides; through benchmarks/patches.py when patches are asked for.

    The model is the issue-6 tiny spec and the augmentation open_clip's unless ``overrides`` say otherwise: the
    preset in configs/clip_tiny.yaml may change (issue 15 gave it 16-pixel patches) without changing what the
    benchmarks compare.
    """
    overrides = {**spec_overrides(tiny_spec()), **OPEN_CLIP_AUGMENT, **overrides}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={_yaml_value(v)}")]
    args = ["train", "--config", str(TINY_CONFIG), *sets]
    if patches:
        return [sys.executable, str(BENCH_DIR / "patches.py"), "--patch", ",".join(patches), "--", *args]
    return [sys.executable, "-m", "finderpartner.cli", *args]


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v == "":
        return "''"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


def open_clip_command(
    model_dir: Path,
    train_csv: Path,
    logs: Path,
    name: str,
    *,
    batch: int,
    workers: int,
    epochs: int,
    lr: float,
    warmup: int,
    precision: str,
    log_every: int,
    save_frequency: int = 0,
    seed: int = 0,
    extra: Sequence[str] = (),
) -> list[str]:
    """``python -m open_clip_train.main`` with our CSV, our model folder, and ours' optimiser settings.

    Augmentation as close to ours as open_clip allows: RandomResizedCrop scale (0.9, 1) and brightness/
    contrast/saturation jitter 0.1 on every image (ours: the same crop range, PIL enhancers with the same
    strength). open_clip has no horizontal flip (ours swaps left/right in the caption when it flips).
    """
    return [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--model",
        f"local-dir:{model_dir}",
        "--train-data",
        str(train_csv),
        "--dataset-type",
        "csv",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--csv-separator",
        "\t",
        "--batch-size",
        str(batch),
        "--workers",
        str(workers),
        "--epochs",
        str(epochs),
        "--lr",
        str(lr),
        "--warmup",
        str(warmup),
        "--wd",
        "0.1",
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--grad-clip-norm",
        "1.0",
        "--precision",
        precision,
        "--device",
        "cpu",
        "--seed",
        str(seed),
        "--logs",
        str(logs),
        "--name",
        name,
        "--log-every-n-steps",
        str(log_every),
        "--save-frequency",
        str(save_frequency),
        "--report-to",
        "",
        "--zeroshot-frequency",
        "0",
        "--aug-cfg",
        "scale=(0.9,1.0)",
        "color_jitter=(0.1,0.1,0.1,0.0)",
        "color_jitter_prob=1.0",
        *extra,
    ]


@dataclass
class Window:
    """A logged stretch of training: its last step, pairs, seconds, and seconds spent waiting for data."""

    end_step: int
    steps: int
    samples: int
    seconds: float
    data_seconds: float


def ours_windows(metrics_jsonl: Path, batch: int) -> list[Window]:
    """Training windows from our metrics.jsonl (one record per ``train.log_every`` steps)."""
    out: list[Window] = []
    last_step = 0
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "train/samples_per_s" not in rec:
            continue
        steps = rec["step"] - last_step
        samples = steps * batch
        seconds = samples / rec["train/samples_per_s"] if rec["train/samples_per_s"] > 0 else math.nan
        out.append(Window(rec["step"], steps, samples, seconds, seconds * rec["train/data_wait_fraction"]))
        last_step = rec["step"]
    return out


def ours_micro_batch(metrics_jsonl: Path) -> int | None:
    """The micro-batch our trainer used (the gradient cache splits the batch when it is smaller than it)."""
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "train/micro_batch_size" in rec:
            return int(rec["train/micro_batch_size"])
    return None


_OC_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")


def open_clip_windows(log_text: str, batch: int) -> list[Window]:
    """Training windows from open_clip's log lines (its meters average over the steps since the last line)."""
    out: list[Window] = []
    seen = 0  # pairs counted so far over all epochs
    last_in_epoch = 0
    for m in _OC_LINE.finditer(log_text):
        done = int(m.group(2))
        if done < last_in_epoch:  # a new epoch started
            last_in_epoch = 0
        samples = done - last_in_epoch
        steps = samples // batch
        last_in_epoch = done
        seen += samples
        out.append(Window(seen // batch, steps, samples, steps * float(m.group(5)), steps * float(m.group(4))))
    return out


def steady_state(windows: Iterable[Window], warmup_steps: int) -> dict[str, float]:
    """Samples/s and data-wait share over the windows that start after ``warmup_steps``."""
    kept = [w for w in windows if w.end_step - w.steps >= warmup_steps and math.isfinite(w.seconds)]
    seconds = sum(w.seconds for w in kept)
    samples = sum(w.samples for w in kept)
    if not kept or seconds <= 0:
        return {"samples_per_s": math.nan, "data_wait_fraction": math.nan, "steps": 0}
    return {
        "samples_per_s": samples / seconds,
        "data_wait_fraction": sum(w.data_seconds for w in kept) / seconds,
        "steps": sum(w.steps for w in kept),
    }


# ---------------------------------------------------------------------------------------------------------------
# Statistics, tables, JSON


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min, max and relative range (max-min)/median: how noisy the repeated runs were."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "rel_range": math.nan, "n": 0}
    med = statistics.median(vals)
    return {
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "rel_range": (max(vals) - min(vals)) / med if med else math.nan,
        "n": len(vals),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"
    return str(v)


def gib(n: float) -> float:
    return n / 2**30


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def save_results(name: str, args: Any, results: Any) -> Path:
    """Write a benchmark's JSON (its arguments, the machine, package versions, results) to --out and say where."""
    payload = {
        "benchmark": name,
        "args": vars(args),
        "machine": machine_info(),
        "versions": package_versions(),
        "results": results,
    }
    path = write_json(args.out or default_out(name), payload)
    print(f"results: {path}")
    return path
