"""Encoder latency: PyTorch (eager, fp32) against the ONNX export in onnxruntime (fp32 and int8), per batch size.

The model is the tiny spec (image 64, patch 8, width 192, 4 layers, 3 heads; text width 128, 4 layers,
2 heads, context 32; embed 128), randomly initialised with a tokenizer learnt from the sample captions:
nothing is downloaded. Inputs are real: sample images through the model's preprocessing, sample captions
through its tokenizer. PyTorch and onnxruntime get the same number of threads (``--threads``, one row
block per value); medians and 95th percentiles of repeated runs after warm-up, alternating backends.

    python benchmarks/export_latency.py                          # threads 1 and all cores
    python benchmarks/export_latency.py --threads 2 --batches 1 8 32 128
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128], help="batch sizes")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and all cores)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per measurement (after 3 warm-up runs)")
    p.add_argument("--variants", nargs="+", default=["fp32", "int8"], choices=["fp32", "fp16", "int8"])
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"])
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default benchmarks/results/export_latency.json)"
    )
    return p.parse_args(argv)


def timings_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def build(tmp: Path, exporter: str, variants: list[str]) -> tuple[Any, Path, list[Path], list[str]]:
    """The tiny model, its export, and real inputs (sample images and captions)."""
    from finderpartner.config import TinySpec
    from finderpartner.embedding import model_fingerprint
    from finderpartner.interop.export import export_onnx
    from finderpartner.model import build_tiny

    data = common.sample_data(None, image_size=96, train_images=0, val_images=128)
    pairs = common.read_pairs(data, "val")
    captions = list(dict.fromkeys(c for _, c in pairs))
    images = [data / "images" / "val" / f for f in dict.fromkeys(f for f, _ in pairs)]
    encoder = build_tiny(TinySpec(**common.TINY_SPEC), captions, seed=0)
    export = tmp / "onnx"
    export_onnx(
        encoder,
        export,
        fingerprint=model_fingerprint(encoder.model),
        exporter=exporter,
        fp16="fp16" in variants,
        int8="int8" in variants,
    )
    return encoder, export, images, captions


def measure(
    encoder: Any,
    export: Path,
    images: list[Path],
    captions: list[str],
    batches: list[int],
    threads: int,
    variants: list[str],
    runs: int,
) -> list[dict[str, Any]]:
    import torch

    from finderpartner.interop.onnx_runtime import load_onnx_encoders
    from finderpartner.interop.verify import _repeat, preprocess_images
    from finderpartner.model import encode_image, encode_text

    torch.set_num_threads(threads)
    model = encoder.model.eval()
    sessions = {v: load_onnx_encoders(export, variant=v, threads=threads) for v in variants}
    pixels_all = preprocess_images(encoder, images)
    rows = []
    for batch in batches:
        pixels, texts = _repeat(pixels_all, batch), _repeat(captions, batch)
        tok = encoder.tokenize(texts)
        cases: dict[tuple[str, str], Callable[[], Any]] = {
            ("image", "torch"): functools.partial(encode_image, model, pixels),
            ("text", "torch"): functools.partial(encode_text, model, tok["input_ids"], tok["attention_mask"]),
        }
        for v, s in sessions.items():
            cases[("image", f"onnx {v}")] = functools.partial(s.encode_pixels, pixels.numpy())
            cases[("text", f"onnx {v}")] = functools.partial(s.text_session.run, None, s.tokenize(texts))
        times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
        for _ in range(3):  # alternate backends in rounds, so load changes on the machine hit all alike
            for key, fn in cases.items():
                with torch.inference_mode():
                    times[key] += timings_ms(fn, max(1, runs // 3))
        for (tower, backend), t in times.items():
            rows.append(
                {
                    "threads": threads,
                    "encoder": tower,
                    "batch": batch,
                    "backend": backend,
                    "p50_ms": float(np.median(t)),
                    "p95_ms": float(np.percentile(t, 95)),
                    "items_per_s": batch / (float(np.median(t)) / 1000),
                }
            )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """One line per (threads, encoder, batch): p50 (p95) per backend and the speed-up of onnxruntime over torch.

    The speed-up is that of fp32 when it was measured, otherwise of the first variant measured (``--variants``).
    """
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    onnx = [b for b in backends if b != "torch"]
    ref = "onnx fp32" if "onnx fp32" in onnx else (onnx[0] if onnx else None)
    keyed = {(r["threads"], r["encoder"], r["batch"], r["backend"]): r for r in rows}
    lines = []
    for threads, tower, batch in dict.fromkeys((r["threads"], r["encoder"], r["batch"]) for r in rows):
        cells = [
            f"{keyed[(threads, tower, batch, b)]['p50_ms']:.2f} ({keyed[(threads, tower, batch, b)]['p95_ms']:.2f})"
            for b in backends
        ]
        if ref is not None:
            speedup = keyed[(threads, tower, batch, "torch")]["p50_ms"] / keyed[(threads, tower, batch, ref)]["p50_ms"]
            cells.append(f"{speedup:.2f}x")
        lines.append([threads, tower, batch, *cells])
    headers = ["threads", "encoder", "batch", *(f"{b} ms p50 (p95)" for b in backends)]
    if ref is not None:
        headers.append(f"{ref} speed-up")
    return common.table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(common.machine_line(), flush=True)
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    with tempfile.TemporaryDirectory() as tmp:
        encoder, export, images, captions = build(Path(tmp), args.exporter, args.variants)
        rows = [
            r
            for n in threads
            for r in measure(encoder, export, images, captions, args.batches, n, args.variants, args.runs)
        ]
    print("encoder latency, tiny spec (image 64/8, width 192x4, text 128x4, ctx 32, embed 128), per batch:\n")
    print(render(rows))
    out = common.write_json(
        args.out or common.default_out("export_latency"),
        {"machine": common.machine_info(), "versions": common.package_versions(), "rows": rows},
    )
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
