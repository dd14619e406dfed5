"""The trial's numbers and words: the devices' datasheet peaks (for MFU), memory sizes as typed (--memory-cap 10GiB),
and the report ``finderpartner trial`` prints."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import torch

from ..errors import UsageError
from ..progress import format_duration

GiB = 2**30

# Device peaks: NVIDIA's datasheet figures, dense (no sparsity), TFLOP/s. bf16/fp16: tensor cores with fp32
# accumulation (what autocast uses; GeForce cards run it at half their fp16-accumulate rate); tf32: fp32 training
# from Ampere on (TF32 is turned on then); fp32: plain fp32 before Ampere. Names are matched in this order.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    ("H200", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    ("H100 NVL", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    ("H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    ("H100", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),  # SXM
    ("A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    ("L40S", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
    ("A10", {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2}),
    ("L4", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3}),
    ("RTX 4090", {"bf16": 165, "fp16": 165, "tf32": 82.6, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71, "fp16": 71, "tf32": 35.6, "fp32": 35.6}),
    ("RTX 3060", {"bf16": 25.4, "fp16": 25.4, "tf32": 12.7, "fp32": 12.7}),
    ("V100S", {"fp16": 130, "fp32": 16.4}),
    ("V100-PCIE", {"fp16": 112, "fp32": 14}),
    ("V100", {"fp16": 125, "fp32": 15.7}),  # SXM2
    ("T4", {"fp16": 65, "fp32": 8.1}),
]


def gpu_peak_flops(name: str, precision: str, tf32: bool) -> float | None:
    """The datasheet peak FLOP/s of the GPU called ``name`` in ``precision`` (fp32: TF32's rate when ``tf32``);
    None for a GPU not in ``GPU_PEAK_TFLOPS``."""
    for fragment, peaks in GPU_PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            rate = "tf32" if precision == "fp32" and tf32 and "tf32" in peaks else precision
            return peaks[rate] * 1e12 if rate in peaks else None
    return None


def cpu_peak_flops(precision: str, n: int = 1024, repeats: int = 5) -> float:
    """This CPU's matmul rate in ``precision`` with torch's threads, measured: the best of ``repeats`` n^3 products
    (an estimate of its peak, lower when other processes share the cores)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(gib|gb|g|mib|mb|m|kib|kb|k|b)?\s*", re.IGNORECASE)


_UNITS = {"gib": 2**30, "g": 2**30, "gb": 1e9, "mib": 2**20, "m": 2**20, "mb": 1e6, "kib": 2**10, "k": 2**10}


def parse_size(text: str) -> int:
    """Bytes in '12GiB', '12G' (binary), '12GB' (decimal), '500MiB', ...; UsageError otherwise."""
    match = _SIZE.fullmatch(text)
    if not match or match.group(2) is None or float(match.group(1)) <= 0:
        raise UsageError(f"--memory-cap {text!r}: give a size with its unit, e.g. 12GiB, 8GB or 6000MiB")
    return int(float(match.group(1)) * _UNITS.get(match.group(2).lower(), 1))


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    """The report for a terminal."""
    dev = r["device"]
    where = (
        f"{dev['name']} ({dev['memory_bytes'] / GiB:.1f} GiB, compute {dev['compute_capability']})"
        if dev["type"] == "cuda"
        else f"CPU {dev['name']} ({dev['cores']} cores, {dev['threads']} threads)"
    )
    m, b, meas, f, p = r["model"], r["batch"], r["measurement"], r["flops"], r["projection"]
    lines = [
        f"trial of {r['config'] or 'the config'}" + (" (interrupted)" if r["interrupted"] else ""),
        f"  device      {where}, {r['precision']}",
        f"  model       {m['name']}: {m['built']}; {m['parameters'] / 1e6:.1f}M parameters "
        f"({m['trainable'] / 1e6:.1f}M trained), {m['image_size']} px, {m['context_length']} tokens",
        f"  data        {r['data']['source']}"
        + (f", {r['data']['pairs_per_epoch']} pairs per epoch" if r["data"]["pairs_per_epoch"] else ""),
        f"  batch       contrastive {b['contrastive']}, micro-batch {b['micro']} ({b['probe']})",
    ]
    if (b["measured_contrastive"], b["measured_micro"]) != (b["contrastive"], b["micro"]):
        lines.append(f"  measured at contrastive {b['measured_contrastive']}, micro-batch {b['measured_micro']}")
    rate = meas["samples_per_s"]
    lines.append(
        f"  speed       {rate:.1f} pairs/s, {meas['step_s']:.3g} s per step ({meas['measured_steps']} steps measured "
        f"of {meas['steps']}; setup {meas['setup_s']:.0f} s)"
        if rate
        else "  speed       no step was measured"
    )
    peak = r["peak_memory"]
    lines.append(
        f"  memory      peak {_gib(peak['allocated_bytes'])} allocated, {_gib(peak['reserved_bytes'])} reserved"
        if "allocated_bytes" in peak
        else f"  memory      peak {_gib(peak['rss_bytes'])} resident (this process)"
    )
    if r["memory_cap_bytes"]:
        lines.append(f"  memory cap  {_gib(r['memory_cap_bytes'])}")
    if f["per_pair"]:
        mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "unknown"
        peak_text = f"{f['peak'] / 1e12:.3g} TFLOP/s" if f["peak"] else "-"
        lines.append(
            f"  MFU         {mfu}: {f['per_pair'] / 1e9:.3g} GFLOP per pair, "
            f"{(f['achieved'] or 0) / 1e12:.3g} TFLOP/s of {peak_text} ({f['peak_source']})"
        )
    if p:
        lines.append(f"  10k pairs   {format_duration(p['per_10k_pairs_s'])}")
        if "epoch_s" in p:
            lines.append(f"  one epoch   {format_duration(p['epoch_s'])} ({p['steps_per_epoch']} steps, training only)")
            what = {"time_budget": "train.time_budget", "max_steps": "train.max_steps", "epochs": "train.epochs"}
            lines.append(
                f"  schedule    {format_duration(p['schedule_s'])}: {p['schedule_steps']} steps, "
                f"{p['schedule_epochs']:.2f} epochs ({what[p['schedule']]}; validation and checkpoints come on top)"
            )
    oom = r["oom"]
    if oom:
        lines.append(
            f"  OOM         injected at step {oom['at_step']} {oom['where']} ({oom['how']}): "
            + (
                f"recovered, micro-batch {oom['micro_batch_before']} -> {oom['micro_batch_after']}, the step redone "
                f"in {oom['step_s']:.2f} s"
                if oom.get("recovered")
                else "NOT recovered"
            )
            if oom.get("injected")
            else f"  OOM         not injected: {oom['why']}"
        )
    lines += [f"  note        {note}" for note in r["notes"]]
    return "\n".join(lines)
