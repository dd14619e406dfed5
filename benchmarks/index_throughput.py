"""Indexing throughput: `finderpartner index` on 10k real images, PyTorch vs ONNX fp32 vs ONNX int8, 1 vs 2
processes (torchrun, gloo), and a run stopped at ~50 % (SIGTERM) and resumed compared with an uninterrupted one.

The images are the sample images (``finderpartner sample-data``) resized to 224 px JPEGs and repeated with
rotations and flips up to ``--images``; the model is the tiny spec (benchmarks/common.TINY_SPEC, random weights,
so throughput only: the 224 px decode and resize are the real pipeline's, the encoder is small), saved as a model
folder and exported with its int8 variant. Each configuration is one real `finderpartner index` command into a
fresh store (wall time from start to the store written, including the model load and the merge); with 2
processes each gets one thread (OMP_NUM_THREADS=1, torchrun's default), with 1 process both cores.

    nice -n 10 python benchmarks/index_throughput.py                 # 10k images, all six configurations
    python benchmarks/index_throughput.py --images 2000 --configs torch:1 onnx-int8:1
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

README_SECTION = "## Indexing throughput"
CONFIGS = ["torch:1", "torch:2", "onnx-fp32:1", "onnx-fp32:2", "onnx-int8:1", "onnx-int8:2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="backend:processes, from " + " ".join(CONFIGS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path(common.CACHE_DIR) / "index-throughput")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/...)")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--no-resume-check", action="store_true")
    return p.parse_args(argv)


def make_images(work: Path, n: int) -> Path:
    from PIL import Image, ImageOps

    folder = work / f"images-{n}"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = common.sample_data(None, image_size=96, train_images=0, val_images=128)
    sources = sorted((data / "images" / "val").glob("*.jpg"))
    for i in range(n):
        im = Image.open(sources[i % len(sources)]).convert("RGB").resize((224, 224), Image.BICUBIC)
        variant = (i // len(sources)) % 8
        im = im.rotate(90 * (variant % 4))
        if variant >= 4:
            im = ImageOps.mirror(im)
        im.save(folder / f"photo{i:05d}.jpg", quality=90)
    return folder


def make_model(work: Path) -> tuple[Path, Path]:
    """A tiny model folder and its ONNX export (fp32 + int8)."""
    from finderpartner.config import TinySpec
    from finderpartner.embedding import model_fingerprint
    from finderpartner.interop.export import export_onnx
    from finderpartner.model import build_tiny, save_model

    model, export = work / "model", work / "export"
    if (model / "config.json").is_file() and (export / "finderpartner_export.json").is_file():
        return model, export
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(export, ignore_errors=True)
    data = common.sample_data(None, image_size=96, train_images=0, val_images=128)
    captions = list(dict.fromkeys(c for _, c in common.read_pairs(data, "val")))
    encoder = build_tiny(TinySpec(**common.TINY_SPEC), captions, seed=0)
    save_model(encoder, model)
    export_onnx(encoder, export, fingerprint=model_fingerprint(encoder.model), int8=True, source=str(model))
    return model, export


def command(config: str, model: Path, export: Path, images: Path, out: Path, batch: int) -> tuple[list[str], dict]:
    backend, procs = config.split(":")
    args = ["index", "--images", str(images), "--out", str(out), "--workers", "0", "--batch-size", str(batch), "-q"]
    if backend == "torch":
        args += ["--model", str(model)]
    else:
        args += ["--model", str(export), "--backend", "onnx", "--onnx-variant", backend.split("-")[1]]
    if procs == "1":
        return [sys.executable, "-m", "finderpartner.cli", *args], {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    launch = [torchrun, "--standalone", "--nproc_per_node", procs, "-m", "finderpartner.cli"]
    return [*launch, *args], {"OMP_NUM_THREADS": "1"}


def env(extra: dict[str, str]) -> dict[str, str]:
    src = str(common.REPO / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def run(config: str, model: Path, export: Path, images: Path, out: Path, batch: int, n: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd, extra = command(config, model, export, images, out, batch)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env(extra), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{config} failed ({r.returncode}):\n{common.tail(r.stderr)}")
    return {"config": config, "images": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 1)}


def contents(store: Path) -> dict[str, tuple[int, np.ndarray]]:
    from finderpartner.search.faiss_store import FaissStore

    s = FaissStore.open(store)
    try:
        live = s.meta.live_stamps()
        ids = np.array(sorted(i for i, _, _ in live.values()), np.int64)
        by_id = dict(zip(ids.tolist(), s._vectors_of(ids)))
        return {p: (i, by_id[i]) for p, (i, _, _) in live.items()}
    finally:
        s.close()


def resume_check(model: Path, export: Path, images: Path, work: Path, batch: int, n: int) -> dict[str, Any]:
    """Stop a 1-process PyTorch run with SIGTERM once half the images are in parts, resume, compare."""
    whole, resumed = work / "store-torch-1", work / "store-resumed"
    if not (whole / "manifest.json").is_file():
        run("torch:1", model, export, images, whole, batch, n)
    shutil.rmtree(resumed, ignore_errors=True)
    cmd, extra = command("torch:1", model, export, images, resumed, batch)
    cmd.remove("-q")
    child = subprocess.Popen(cmd, env=env(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = resumed / "parts"
    chunk = 8 * batch
    while len(list(parts.glob("part-*.npz")) if parts.is_dir() else []) * chunk < n // 2:
        if child.poll() is not None:
            raise RuntimeError(f"the run ended before half: {common.tail(child.communicate()[1])}")
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate()
    kept = len(list(parts.glob("part-*.npz")))
    r = subprocess.run(cmd, env=env(extra), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"resume failed: {common.tail(r.stderr)}")
    a, b = contents(whole), contents(resumed)
    same_ids = {p: i for p, (i, _) in a.items()} == {p: i for p, (i, _) in b.items()}
    diff = max(float(np.abs(a[p][1] - b[p][1]).max()) for p in a) if a.keys() == b.keys() else float("inf")
    return {
        "stopped_exit_code": child.returncode,
        "stopped_after_images": kept * chunk,
        "resumed_line": r.stdout.strip().splitlines()[-1],
        "same_paths": a.keys() == b.keys(),
        "same_ids": same_ids,
        "max_abs_vector_diff": diff,
        "stop_message": err.strip().splitlines()[-1] if err.strip() else "",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = common.machine_info()  # now: its load average is the one at the start
    print(common.machine_line(), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    images = make_images(args.work, args.images)
    model, export = make_model(args.work)
    rows = []
    for config in args.configs:
        row = run(
            config, model, export, images, args.work / f"store-{config.replace(':', '-')}", args.batch_size, args.images
        )
        print(f"  {row}", flush=True)
        rows.append(row)
    results: dict[str, Any] = {"rows": rows}
    if not args.no_resume_check:
        results["resume"] = resume_check(model, export, images, args.work, args.batch_size, args.images)
        print(f"  resume: {results['resume']}", flush=True)
    common.save_results("index_throughput", args, results)
    text = markdown(results, args.images, machine)
    print(text)
    if not args.no_readme:
        write_section(text)
    return 0


def markdown(r: dict[str, Any], n: int, machine: dict[str, Any]) -> str:
    load = machine.get("load_avg_at_start") or [float("nan")]
    lines = [
        README_SECTION,
        "",
        f"benchmarks/index_throughput.py: `finderpartner index` on {n:,} 224 px JPEGs (the sample images, repeated), "
        "tiny-spec model (the decode/resize pipeline is real, the encoder small), --workers 0, batch 64. Wall time "
        f"of the whole command (model load and merge included), on {machine['cpu']} with {machine['cores']} cores, "
        f"torch in {'bf16' if 'bf16' in machine['native_precisions'] else 'fp32'} (precision auto; load average "
        f"{load[0]:.1f} at the start: figures are worth comparing only from a run alone). One process uses every "
        "core (its intra-op threads); 2 processes (torchrun, one thread each) decode in parallel but load the model "
        "twice and merge their parts, which pays only where one process leaves cores idle. Processes are for more "
        "cores and for GPUs (one rank each).",
        "",
        "| backend | processes | wall | images/s |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        backend, procs = row["config"].split(":")
        lines.append(f"| {backend} | {procs} | {row['wall_s']:.0f} s | {row['images_per_s']:.0f} |")
    if "resume" in r:
        res = r["resume"]
        lines += [
            "",
            f"Stopped by SIGTERM after {res['stopped_after_images']:,} images (exit {res['stopped_exit_code']}), then "
            f"resumed: `{res['resumed_line']}`. Against an uninterrupted run: same paths {res['same_paths']}, same ids "
            f"{res['same_ids']}, largest vector difference {res['max_abs_vector_diff']:.2g}.",
        ]
    lines += [
        "",
        "Rerun with `python benchmarks/index_throughput.py` (it rewrites this section). The stop-and-resume equality "
        "is also a test (tests/test_search_indexing.py: SIGTERM and SIGKILL, same ids, vectors equal to 1e-6).",
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    readme = common.BENCH_DIR / "README.md"
    content = readme.read_text(encoding="utf-8")
    start = content.find(README_SECTION)
    if start >= 0:
        end = content.find("\n## ", start + len(README_SECTION))
        content = content[:start] + text + (content[end + 1 :] if end >= 0 else "")
    else:
        content = content.rstrip("\n") + "\n\n" + text
    readme.write_text(content, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
