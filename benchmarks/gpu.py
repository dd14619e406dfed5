"""The GPU check (issue 27): one CUDA card, under 8 minutes, one table and JSON.

On the card, under a memory cap (default 12 GiB: an RTX 3060, emulated with set_per_process_memory_fraction):

* our trial (``finderpartner trial``: the trainer's own step) of ViT-B/32 at 224 px, random weights, synthetic
  batches, contrastive batch 256 with the micro-batch the probe picks: in bf16 and in fp16 (the GradScaler path;
  only fp16 on cards without native bf16);
* the largest contrastive batch without the gradient cache (micro-batch = batch) and with it (at the probed
  micro-batch), by real steps at doubling sizes until the cap (``memory.py``'s measurement);
* open_clip's ViT-B-32 (``open_clip.create_model``, random init, quick-GELU as ours) with its own training step as
  ``open_clip_train`` runs it (autocast, ``open_clip.loss.ClipLoss``, AdamW, the logit-scale clamp) at its best
  settings for one card (bf16 autocast, fused AdamW, TF32 on), on the same batch (halved until it fits the cap:
  it has no gradient cache): samples/s of both, and the MFU of both against the card's datasheet peak;
* an out-of-memory error injected into a step (a real failed allocation) and the recovery.

    python benchmarks/gpu.py                  # on a CUDA machine (~6 min on an RTX 3060-class card)
    python benchmarks/gpu.py --cap-gib 8      # an 8 GB card
    python benchmarks/gpu.py --dry-run        # everything but CUDA, on the CPU: tiny shapes, seconds (CI)

Both models get the same synthetic batch: uint8 pixels in pinned memory, moved and normalised on the device each
step, full-length captions. Nothing downloads (HF_HUB_OFFLINE=1). The JSON goes to --out (default
benchmarks/results/gpu.json).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)
import memory as memory_bench  # noqa: E402
import torch  # noqa: E402

from finderpartner.config import config_from_dict  # noqa: E402
from finderpartner.env import configure_cuda_allocator, cuda_bf16_native, enable_tf32  # noqa: E402
from finderpartner.model import CLIP_MEAN, CLIP_STD  # noqa: E402
from finderpartner.train.trial import run_trial  # noqa: E402
from finderpartner.train.trial_report import gpu_peak_flops  # noqa: E402

GiB = 2**30
# --dry-run: the issue-6 tiny spec (benchmarks/common.py), small batches, a few seconds each
DRY = {"batch": 16, "seconds": 4.0, "max_micro": 16, "max_batch": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="run everything but CUDA on the CPU, tiny shapes (CI)")
    p.add_argument("--cap-gib", type=float, default=12.0, help="memory cap in GiB (12: an RTX 3060)")
    p.add_argument("--batch", type=int, default=256, help="contrastive batch of the trials and of open_clip")
    p.add_argument("--seconds", type=float, default=45.0, help="length of each trial, setup included")
    p.add_argument("--max-micro", type=int, default=512, help="largest batch tried without the gradient cache")
    p.add_argument("--max-batch", type=int, default=16384, help="largest batch tried with the gradient cache")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/gpu.json)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch, args.seconds, args.max_micro, args.max_batch = (
            DRY["batch"],
            DRY["seconds"],
            DRY["max_micro"],
            DRY["max_batch"],
        )
    return args


# ---------------------------------------------------------------------------------------------------------------
# The setups


def our_config(args: argparse.Namespace, precision: str, tmp: Path) -> Any:
    """ViT-B/32 (or, dry, the tiny spec) at contrastive batch --batch, synthetic data (data.root is empty)."""
    model: dict[str, Any] = {"name": "arch:ViT-B-32"}
    if args.dry_run:
        model = {"name": "tiny", "tiny": {**common.TINY_SPEC, "vocab_size": 1024}}
    return config_from_dict(
        {
            "output_dir": str(tmp / "outputs"),  # never written: the trial writes nothing
            "model": model,
            "data": {"root": str(tmp / "no-data"), "num_workers": 0},
            "train": {"batch_size": args.batch, "precision": precision, "device": "cpu" if args.dry_run else "cuda"},
        },
        source="benchmarks/gpu.py",
    )


def precisions(device: torch.device) -> list[str]:
    if device.type == "cpu":
        return ["fp32"]  # fp16 needs CUDA; the dry run checks the plumbing
    return ["bf16", "fp16"] if cuda_bf16_native(torch.cuda.get_device_capability(device)) else ["fp16"]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# open_clip's step


def open_clip_model(args: argparse.Namespace, device: torch.device, tmp: Path) -> tuple[Any, int, int]:
    """(model, image size, context length): ViT-B-32 quick-GELU, random init; dry: the tiny spec."""
    import logging

    import open_clip

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": expected
    try:
        if args.dry_run:  # the tiny spec, as ours (benchmarks/common.py: the same model in both)
            from finderpartner.data.sample import COMBOS, TEMPLATES
            from finderpartner.tokenizer import build_caption_tokenizer

            spec = common.tiny_spec()
            captions = [template(*combo) for combo in COMBOS for template in TEMPLATES]
            tokenizer = build_caption_tokenizer(captions, vocab_size=1024, context_length=spec.context_length)
            model = open_clip.create_model(f"local-dir:{common.open_clip_model_dir(spec, tokenizer, tmp / 'oc')}")
            return model.to(device), spec.image_size, spec.context_length
        model = open_clip.create_model("ViT-B-32", force_quick_gelu=True, device=device)
        return model, 224, 77
    finally:
        logging.getLogger().setLevel(level)


def open_clip_run(args: argparse.Namespace, precision: str, device: torch.device, tmp: Path) -> dict[str, Any]:
    """open_clip_train's step on synthetic batches for --seconds: samples/s, peak memory, FLOPs per pair."""
    from open_clip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, size, context = open_clip_model(args, device, tmp)
    model.train()
    enable_tf32(device, "fp32")  # its best setting for any fp32 matmul left (ours turns it on for fp32 only)
    loss_fn = ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-5,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1) * 255
    vocab = int(model.vocab_size)
    eos = getattr(model, "text_eos_id", None)
    eos = vocab - 1 if eos is None else int(eos)  # OpenAI's BPE: the largest id (open_clip's argmax pooling)

    def batch_of(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        texts = torch.randint(3, vocab - 1, (n, context), generator=g)
        texts[texts == eos] = 3
        texts[:, -1] = eos  # full length, ending with end-of-text, where its text tower pools (as ours)
        if device.type == "cuda":
            pixels = pixels.pin_memory()
        return pixels, texts

    def step(pixels: torch.Tensor, texts: torch.Tensor) -> None:
        images = (pixels.to(device, non_blocking=True).float() - mean) / std
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            image_features, text_features, logit_scale = model(images, texts.to(device, non_blocking=True))
            loss = loss_fn(image_features, text_features, logit_scale)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    counter = FlopCounterMode(display=False)
    with counter:  # one pair, forward and backward: model FLOPs
        pixels, texts = batch_of(1)
        images = (pixels.to(device).float() - mean) / std
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            i, t, s = model(images, texts.to(device))
            (i.float() @ t.float().T * s).sum().backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    batch, note = args.batch, ""
    while True:  # no gradient cache: the whole batch must fit the cap
        try:
            pixels, texts = batch_of(batch)
            step(pixels, texts)
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            free(device)
            batch //= 2
            note = f"batch {args.batch} does not fit the cap without a gradient cache: measured at {batch}"
            if batch < 2:
                return {"error": "not even 2 pairs fit the cap"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, deadline = [], time.perf_counter() + args.seconds / 2
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        step(pixels, texts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    measured = times[1:]
    out = {
        "batch": batch,
        "samples_per_s": batch * len(measured) / sum(measured),
        "steps": len(times),
        "flops_per_pair": flops,
        "note": note,
    }
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running it all


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_cuda_allocator()  # as training sets it, before CUDA starts
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --dry-run to check everything but CUDA on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    cap = int(args.cap_gib * GiB)
    print(f"{name}: cap {args.cap_gib:g} GiB, contrastive batch {args.batch}, {args.seconds:g} s per trial", flush=True)
    start = time.perf_counter()
    results: dict[str, Any] = {"device": name, "cap_gib": args.cap_gib, "dry_run": args.dry_run, "trials": {}}
    with tempfile.TemporaryDirectory(prefix="finderpartner-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        for precision in precisions(device):
            report = run_trial(our_config(args, precision, tmp), seconds=args.seconds, memory_cap=cap, progress=False)
            results["trials"][precision] = report
            print(f"  trial {precision}: {report['measurement']['samples_per_s']:.1f} pairs/s", flush=True)
            free(device)
        first = precisions(device)[0]
        oom = run_trial(
            our_config(args, first, tmp), seconds=args.seconds / 2, memory_cap=cap, inject_oom=True, progress=False
        )
        results["injected_oom"] = oom["oom"]
        print(f"  injected OOM: {oom['oom']}", flush=True)
        free(device)
        sizes = [2**i for i in range(20) if 2**i <= args.max_micro]
        results["largest_batch"] = memory_bench.measure(
            "tiny" if args.dry_run else "vitb32", sizes, args.cap_gib, device, first, args.max_batch
        )
        free(device)
        results["open_clip"] = open_clip_run(args, first, device, tmp)
        leftovers = [str(p) for p in (tmp / "outputs").rglob("*")]
        free(device)
    results["seconds"] = time.perf_counter() - start
    results["wrote_under_output_dir"] = leftovers
    print()
    print(summary_table(results, device, first))
    common.save_results("gpu", args, results)
    return 0


def summary_table(results: dict[str, Any], device: torch.device, first: str) -> str:
    name = results["device"]
    rows = []
    for precision, r in results["trials"].items():
        b, m, f, peak = r["batch"], r["measurement"], r["flops"], r["peak_memory"]
        memory = (
            f"{peak['allocated_bytes'] / GiB:.2f} / {peak['reserved_bytes'] / GiB:.2f}"
            if "allocated_bytes" in peak
            else f"{peak['rss_bytes'] / GiB:.2f} RSS"
        )
        rows.append(
            [
                f"ours {precision}",
                f"{b['measured_contrastive']} / {b['measured_micro']}",
                m["samples_per_s"],
                memory,
                f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "-",
            ]
        )
    oc = results["open_clip"]
    if "error" not in oc:
        peak = gpu_peak_flops(name, first, tf32=True) if device.type == "cuda" else None
        peak = peak or results["trials"][first]["flops"]["peak"]
        rows.append(
            [
                f"open_clip {first}",
                f"{oc['batch']} / {oc['batch']}",
                oc["samples_per_s"],
                f"{oc['peak_allocated_gib']:.2f} / {oc['peak_reserved_gib']:.2f}"
                if "peak_allocated_gib" in oc
                else "-",
                f"{100 * oc['samples_per_s'] * oc['flops_per_pair'] / peak:.1f}%" if peak else "-",
            ]
        )
    lines = [
        common.table(["run", "batch / micro", "pairs/s", "peak GiB (alloc / reserved)", "MFU"], rows),
        "",
    ]
    ours = results["trials"][first]["measurement"]["samples_per_s"]
    if "error" not in oc:
        lines.append(
            f"ours / open_clip ({first}): {ours / oc['samples_per_s']:.2f}x"
            + (f" ({oc['note']})" if oc["note"] else "")
        )
    lb = results["largest_batch"]
    lines.append(
        f"largest contrastive batch under {results['cap_gib']:g} GiB ({first}): {lb['largest_batch_without_cache']} "
        f"without the gradient cache ({lb['without_cache_limited_by']}), {lb['largest_batch_with_cache']} with it "
        f"({lb['with_cache_limited_by']})"
    )
    o = results["injected_oom"] or {}
    lines.append(
        f"injected OOM ({o.get('how', '-')}): "
        + (
            f"recovered, micro-batch {o['micro_batch_before']} -> {o['micro_batch_after']}"
            if o.get("recovered")
            else f"not recovered: {o}"
        )
    )
    lines.append(
        f"total {results['seconds']:.0f} s; written under output_dir: {results['wrote_under_output_dir'] or 'nothing'}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
