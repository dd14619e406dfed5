"""Peak memory per micro-batch, and the largest contrastive batch with and without the gradient cache.

For each architecture (the tiny spec, and ViT-B/32 built from transformers' default CLIPConfig — random init,
no download) this runs real forward+backward contrastive steps and records the peak memory:

* CPU: peak resident memory of this process (VmHWM, reset before each measurement), against ``--cap-gb``.
* CUDA: ``torch.cuda.max_memory_allocated`` with ``torch.cuda.set_per_process_memory_fraction`` set so that
  the process may use only ``--cap-gb`` (12 GB emulates an RTX 3060).

Without the gradient cache the contrastive batch is the micro-batch, so the largest batch is the largest
micro-batch that fits. With it, one micro-batch of activations is alive at a time and the batch only adds
its embeddings, their gradients and the B x B logits; the script measures real cached steps at growing
batches with the best micro-batch until the cap is reached.

    python benchmarks/memory.py                      # both architectures, cap 12 GB
    python benchmarks/memory.py --arch tiny --cap-gb 2
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from finderpartner.config import TinySpec  # noqa: E402
from finderpartner.env import autocast_factory, resolve_device, resolve_precision  # noqa: E402
from finderpartner.loss import ClipLoss  # noqa: E402
from finderpartner.memory import is_oom, peak_rss_bytes, reset_peak_rss  # noqa: E402
from finderpartner.model import CLIP_MEAN, CLIP_STD, DualEncoder, build_tiny  # noqa: E402
from finderpartner.train.probe import synthetic_batch  # noqa: E402
from finderpartner.train.step import contrastive_backward  # noqa: E402

GiB = 2**30


def build(arch: str) -> tuple[DualEncoder, int]:
    """(encoder, context length) for an architecture, randomly initialised."""
    if arch == "tiny":
        enc = build_tiny(TinySpec(), ["a large red circle on the left", "a small blue star in the center"] * 8)
        return enc, 32
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig())  # the defaults are ViT-B/32: 224 px, patch 32, 12+12 layers, embed 512
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return DualEncoder(model, None, processor), 77  # synthetic token batches: no tokenizer needed


class Meter:
    def __init__(self, device: torch.device, cap_bytes: int):
        self.device, self.cap = device, cap_bytes
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss_bytes()


def step(encoder, ctx, batch_size: int, micro: int, device, autocast) -> float:
    model = encoder.model
    batch = synthetic_batch(batch_size, encoder.image_spec.crop, ctx, int(model.config.text_config.vocab_size), device)
    batch.input_ids[:, -1] = int(model.config.text_config.eos_token_id)
    t0 = time.perf_counter()
    contrastive_backward(
        encoder,
        ClipLoss(model.logit_scale),
        batch,
        micro_batch_size=micro,
        autocast=autocast,
        backward=lambda x: x.backward(),
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measured(meter: Meter, *step_args: Any) -> tuple[float, int] | None:
    """(seconds, peak bytes) of ``step(*step_args)``; None when it ran out of memory."""
    meter.reset()
    try:
        seconds = step(*step_args)
    except Exception as e:
        if not is_oom(e):
            raise
        return None
    return seconds, meter.peak()


def measure(arch: str, sizes: list[int], cap_gb: float, device: torch.device, precision: str, max_batch: int) -> dict:
    encoder, ctx = build(arch)
    encoder.model.to(device).train()
    autocast = autocast_factory(device, precision)
    meter = Meter(device, int(cap_gb * GiB))
    rows, fits = [], 0
    for m in sizes:  # increasing: on CPU the resident set only shrinks lazily
        result = measured(meter, encoder, ctx, m, m, device, autocast)
        if result is None:
            rows.append({"micro_batch": m, "peak_gb": None, "oom": True})
            break
        seconds, peak = result
        rows.append({"micro_batch": m, "peak_gb": round(peak / GiB, 3), "pairs_per_s": round(m / seconds, 1)})
        print(f"  {arch} micro-batch {m:>5}: peak {peak / GiB:7.3f} GiB, {m / seconds:8.1f} pairs/s", flush=True)
        if peak > meter.cap:
            break
        fits = m
    # With the gradient cache: grow the contrastive batch at the best micro-batch until the cap says stop.
    micro = max(1, fits)
    cached, batch, with_cache = [], max(2 * micro, 2), fits
    while fits and batch <= max_batch:
        result = measured(meter, encoder, ctx, batch, micro, device, autocast)
        if result is None:
            break
        seconds, peak = result
        cached.append(
            {
                "batch": batch,
                "micro_batch": micro,
                "peak_gb": round(peak / GiB, 3),
                "pairs_per_s": round(batch / seconds, 1),
            }
        )
        print(
            f"  {arch} cached batch {batch:>6} (micro {micro}): peak {peak / GiB:7.3f} GiB, {batch / seconds:8.1f} pairs/s",
            flush=True,
        )
        if peak > meter.cap:
            break
        with_cache = batch
        batch *= 2
    return {
        "arch": arch,
        "device": str(device),
        "precision": precision,
        "cap_gb": cap_gb,
        "micro_batches": rows,
        "cached_batches": cached,
        "largest_batch_without_cache": fits,
        "largest_batch_with_cache": with_cache,
        "without_cache_limited_by": "cap" if fits < sizes[-1] else f"--max-micro {sizes[-1]}",
        "with_cache_limited_by": "cap" if with_cache < max_batch else f"--max-batch {max_batch}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["tiny", "vitb32", "both"], default="both")
    p.add_argument("--cap-gb", type=float, default=12.0, help="memory cap (12 emulates an RTX 3060)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument(
        "--max-micro",
        type=int,
        default=None,
        help="largest micro-batch tried (default: 512 tiny, 128 ViT-B/32 on CPU; 32 in fp32)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="largest cached batch tried (default: 16384 tiny, 1024 ViT-B/32 on CPU; in fp32 4096 and 128)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = p.parse_args()
    print(common.machine_line(), flush=True)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    results = []
    for arch in ["tiny", "vitb32"] if args.arch == "both" else [args.arch]:
        cpu_vit = device.type == "cpu" and arch == "vitb32"
        # fp32 on a CPU (no native bf16) is 3-4x slower: shorter default ranges keep the default run within minutes
        slow = device.type == "cpu" and precision == "fp32"
        max_micro = args.max_micro or ((32 if slow else 128) if cpu_vit else 512)
        max_batch = args.max_batch or ((128 if slow else 1024) if cpu_vit else (4096 if slow else 16384))
        if slow and not (args.max_micro and args.max_batch):
            print(
                f"  fp32 on the CPU: default ranges shortened to micro-batch {max_micro}, batch {max_batch} "
                "(--max-micro / --max-batch for more)",
                flush=True,
            )
        sizes = [2**i for i in range(0, 20) if 2**i <= max_micro]
        print(f"{arch} on {device} in {precision}, cap {args.cap_gb} GB", flush=True)
        results.append(measure(arch, sizes, args.cap_gb, device, precision, max_batch))
    print()
    print(f"{'arch':<8}{'device':<8}{'precision':<10}{'cap GB':>8}  {'largest batch, no cache':<30}with gradient cache")
    for r in results:
        print(
            f"{r['arch']:<8}{r['device']:<8}{r['precision']:<10}{r['cap_gb']:>8}  "
            f"{str(r['largest_batch_without_cache']) + ' (' + r['without_cache_limited_by'] + ')':<30}"
            f"{r['largest_batch_with_cache']} ({r['with_cache_limited_by']})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
