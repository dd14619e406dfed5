"""Where our trainer's time goes, and what the candidate speed-ups of issue 6 would give.

1. ``profile``: py-spy samples a real ``finderpartner train`` run (tiny spec, ``--batch``) at 64 px and at 224 px;
   the main thread's steady-state samples (inside the training loop) are bucketed into forward (vision/text),
   backward, optimizer, gradient clipping, waiting for data, logging and the rest.
2. ``micro``: in-process timings of one optimizer step's parts on a real batch, each variant alternated with
   its baseline: micro-batch split (gradient cache), eager vs SDPA attention, AdamW fused (ours) vs for-loop vs
   foreach, gradient clipping, the per-step host syncs, torch threads, channels-last, torch.compile; plus
   torch.profiler's top operators. The model uses the attention our trainer picks on the CPU
   (``model.attention: auto``: eager for sequences of at most ``EAGER_MAX_TOKENS`` tokens, SDPA above).
3. ``ab`` (opt-in, ``--candidates``): end-to-end runs of plain ours vs ours with a patch from patches.py,
   alternated (train_throughput.py --compare-ours), for the candidates worth confirming.

    python benchmarks/profile_ours.py                                    # profile + micro, a few minutes
    python benchmarks/profile_ours.py --sections micro --micro-sizes 64 224
    python benchmarks/profile_ours.py --sections ab --candidates unfused_adamw threads=1

py-spy: ``pip install py-spy`` (any environment; give its path with --py-spy when it is not on PATH).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

JPEG_FOR = {64: 96, 224: 256}

# Buckets for py-spy stacks, checked from the innermost frame outwards: the first match names the sample.
BUCKETS: list[tuple[str, re.Pattern[str]]] = [
    ("data wait", re.compile(r"(^|\.)(_next_data|__next__) \(torch/utils/data/dataloader\.py")),
    ("backward", re.compile(r"(^|\.)(_engine_run_backward|backward) \(torch/(autograd/(graph|__init__)|_tensor)\.py")),
    (
        "optimizer step",
        re.compile(r"((^|\.)step|_single_tensor_adamw?|_multi_tensor_adamw?|_fused_adamw?) \(torch/optim/"),
    ),
    ("grad clipping", re.compile(r"(^|\.)clip_grad_norm_ \(torch/nn/utils/clip_grad\.py")),
    ("zero_grad", re.compile(r"(^|\.)zero_grad \(torch/")),
    ("forward: vision", re.compile(r"^(CLIPVisionTransformer\.forward|image_features) \(")),
    ("forward: text", re.compile(r"^(CLIPTextTransformer\.forward|text_features) \(")),
    ("loss", re.compile(r"^((Objective|ClipLoss)\.(forward|loss)|clip_loss|global_batch) \(finderpartner/")),
    ("normalise pixels", re.compile(r"^normalize \(finderpartner/data/transforms\.py")),
    (
        "logging / progress bar",
        re.compile(
            r"(^|\.)(flush|log|set_postfix|update|refresh|display) \((finderpartner/(train|tracking|progress)|tqdm/)"
        ),
    ),
    ("checkpoint / save", re.compile(r"^(_save_checkpoint|_save_best|save_checkpoint|save_model) \(")),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["profile", "micro"], choices=["profile", "micro", "ab"])
    p.add_argument(
        "--image-sizes",
        type=int,
        nargs="+",
        default=None,
        choices=sorted(JPEG_FOR),
        help="profiled image sizes (default 64 224; only 64 where bf16 is not native: fp32 at 224 px takes minutes)",
    )
    p.add_argument("--steps", type=int, default=30, help="profiled steps at 64 px (224 px: a third, at least 8)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--py-spy", default=None, help="py-spy executable (default: on PATH or next to this Python)")
    p.add_argument("--micro-repeats", type=int, default=7, help="alternated timings per micro-benchmark variant")
    p.add_argument(
        "--micro-sizes",
        type=int,
        nargs="+",
        default=[64],
        choices=sorted(JPEG_FOR),
        help="image sizes of the micro-benchmarks (224 adds ~5 minutes)",
    )
    p.add_argument("--candidates", nargs="+", default=[], help="ab: patches.py patches to confirm end to end")
    p.add_argument("--ab-steps", type=int, default=40)
    p.add_argument("--ab-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/profile_ours.json)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# 1. py-spy profile of a real run


def find_py_spy(given: str | None) -> str | None:
    for candidate in (given, shutil.which("py-spy"), str(Path(sys.executable).with_name("py-spy"))):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def profile_run(py_spy: str, size: int, steps: int, batch: int, workers: int, tmp: Path) -> dict[str, Any]:
    data = common.sample_data(
        None, image_size=JPEG_FOR[size], train_images=max(1280, steps * batch // 2), val_images=16
    )
    overrides = {
        "output_dir": tmp,
        "experiment": f"profile_{size}",
        "data.root": data,
        "data.val_split": "",
        "data.num_workers": workers,
        "train.batch_size": batch,
        "train.max_steps": steps,
        "train.log_every": 5,
        "train.checkpoint_every": 10**9,
        "model.tiny.image_size": size,
        "tracking.tensorboard": False,
    }
    raw = tmp / f"profile_{size}.txt"
    # --idle keeps samples where the main thread waits (for data); --threads tags each stack with its thread.
    cmd = [
        py_spy,
        "record",
        "--idle",
        "--threads",
        "--rate",
        "50",
        "--format",
        "raw",
        "--output",
        str(raw),
        "--",
        *common.ours_command(overrides),
    ]
    env = common.child_env({"FINDERPARTNER_CACHE": str(tmp / "cache")})
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not raw.exists():
        raise SystemExit(f"py-spy run failed ({proc.returncode}):\n{common.tail(proc.stdout + proc.stderr)}")
    buckets = bucket_samples(raw)
    metrics = tmp / f"profile_{size}" / "metrics.jsonl"
    windows = common.ours_windows(metrics, batch)
    steady = common.steady_state(windows, 5)
    return {
        "image_size": size,
        "jpeg_size": JPEG_FOR[size],
        "steps": steps,
        "batch": batch,
        "seconds": time.perf_counter() - start,
        "buckets": buckets,
        "steady": steady,
        "micro_batch": common.ours_micro_batch(metrics),
    }


def bucket_samples(raw: Path) -> dict[str, Any]:
    """Main-thread samples inside ``_loop``, bucketed; also the top self-time frames."""
    counts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        if not any(f.startswith("_loop (finderpartner/train/recipe.py") for f in frames):
            continue  # setup, validation at the end, other threads (they never enter _loop)
        counts[_bucket(frames)] += int(n)
        leaves[frames[-1]] += int(n)
    total = sum(counts.values()) or 1
    return {
        "samples": total,
        "share": {k: v / total for k, v in counts.most_common()},
        "top_leaves": {k: v / total for k, v in leaves.most_common(12)},
    }


def _short(frame: str) -> str:
    """'fn (/long/path/site-packages/torch/x.py:12)' -> 'fn (torch/x.py)'."""
    m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    path = re.sub(r"^.*?(site-packages|src)/", "", m.group(2))
    return f"{m.group(1)} ({path})"


def _bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in BUCKETS:
            if pattern.search(frame):
                return name
    return "other (train loop)"


# ---------------------------------------------------------------------------------------------------------------
# 2. In-process micro-benchmarks on a real batch


def real_batch(size: int, batch: int) -> tuple[Any, Any]:
    """(DualEncoder, Batch) of the tiny spec at ``size`` px, from our own loader."""
    import torch
    from torch.utils.data import DataLoader

    from finderpartner.config import AugmentConfig
    from finderpartner.data.collate import Collator
    from finderpartner.data.dataset import ContrastiveBatchSampler, PairDataset, read_split
    from finderpartner.data.transforms import TrainTransform
    from finderpartner.model import build_tiny

    data = common.sample_data(None, image_size=JPEG_FOR[size], train_images=1280, val_images=16)
    table, _ = read_split(data, "train")
    encoder = build_tiny(common.tiny_spec(size), table.captions, seed=0)
    aug = AugmentConfig(crop_scale=(0.9, 1.0))
    transform = TrainTransform(encoder.image_spec, tuple(aug.crop_scale), aug.hflip, aug.color_jitter)
    loader = DataLoader(
        PairDataset(table, transform),
        batch_sampler=ContrastiveBatchSampler(len(table), batch, 0),
        collate_fn=Collator(encoder.text_tokenizer()),
    )
    torch.manual_seed(0)
    return encoder, next(iter(loader))


def _time(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def alternated(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median seconds per call of each variant; variants interleave call by call so that noise hits all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name] += _time(fn, 1)
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)} for k, v in times.items()}


def micro(size: int, batch: int, repeats: int) -> dict[str, Any]:
    import torch

    from finderpartner.env import autocast_factory, resolve_precision
    from finderpartner.loss import ClipLoss
    from finderpartner.model import set_attention
    from finderpartner.train.step import contrastive_backward

    encoder, b = real_batch(size, batch)
    model, spec = encoder.model, encoder.image_spec
    precision = resolve_precision("auto", torch.device("cpu"))  # what the trainer uses: bf16 only where native
    attention = set_attention(
        model, "auto", torch.device("cpu"), precision
    )  # what the trainer uses (model.attention: auto)
    autocast = autocast_factory(torch.device("cpu"), precision)
    model.train()

    def fwd_bwd(m: Any = model, micro_batch: int = batch, batch_: Any = b) -> Any:
        m.zero_grad(set_to_none=True)
        return contrastive_backward(
            dataclasses.replace(encoder, model=m),
            ClipLoss(m.logit_scale),
            batch_,
            micro_batch_size=micro_batch,
            autocast=autocast,
            backward=lambda loss: loss.backward(),
        )

    out: dict[str, Any] = {
        "image_size": size,
        "batch": batch,
        "text_tokens": int(b.input_ids.shape[1]),
        "attention_impl": attention,
        "precision": precision,
    }
    out["fwd_bwd_micro_batch"] = alternated(
        {f"micro-batch {m}": (lambda m=m: fwd_bwd(micro_batch=m)) for m in (batch, batch // 4)}, repeats
    )
    fwd_bwd()
    out["optimizer"] = _optimizer_variants(model, repeats)
    out["grad_clip"] = alternated(
        {
            "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None], 1.0
            )
        },
        repeats,
    )
    out["host_sync"] = _host_sync_cost()
    out["attention"] = _attention(model, fwd_bwd, repeats)
    out["ops"] = _top_ops(model, fwd_bwd)
    out["threads"] = _threads(fwd_bwd, repeats)
    out["channels_last"] = _channels_last(model, b, fwd_bwd, repeats)
    out["compile"] = _compile(encoder, b, spec, autocast, repeats)
    return out


def _optimizer_variants(model: Any, repeats: int) -> dict[str, Any]:
    """AdamW step time: fused (what ours uses), for-loop, foreach; same param groups."""
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]

    def make(**flags: bool) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
            lr=1e-9,
            betas=(0.9, 0.98),
            eps=1e-6,
            **flags,
        )

    opts = {"fused=True (ours)": make(fused=True), "for-loop": make(foreach=False), "foreach=True": make(foreach=True)}
    return alternated({k: o.step for k, o in opts.items()}, repeats * 3)


def _attention(model: Any, fwd_bwd: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """fwd+bwd with HF's eager attention (matmul, softmax, matmul) vs PyTorch SDPA (its CPU flash kernel).

    The variant our trainer uses on the CPU (``set_attention(..., "auto")``) is labelled "ours"; when it mixes
    the two (eager text, SDPA vision at high resolution) it is timed as a third variant.
    """
    import torch

    from finderpartner.env import resolve_precision
    from finderpartner.model import set_attention

    towers = ("vision_config", "text_config")
    ours = {t: getattr(model.config, t)._attn_implementation for t in towers}  # as set by micro()

    def with_impl(choice: dict[str, str]) -> Callable[[], Any]:
        def run() -> Any:
            model.set_attn_implementation(choice)
            return fwd_bwd()

        return run

    variants = {}
    for impl in ("eager", "sdpa"):
        uniform = dict.fromkeys(towers, impl)
        variants[f"{impl} (ours on CPU)" if uniform == ours else impl] = with_impl(uniform)
    if len(set(ours.values())) > 1:
        variants[f"ours on CPU (vision {ours['vision_config']}, text {ours['text_config']})"] = with_impl(ours)
    try:
        return alternated(variants, repeats)
    finally:
        set_attention(model, "auto", torch.device("cpu"), resolve_precision("auto", torch.device("cpu")))


def _top_ops(model: Any, fwd_bwd: Callable[[], Any], steps: int = 3) -> dict[str, list[tuple[str, float]]]:
    """torch.profiler: the operators with the most self CPU time in fwd+bwd, with ours' attention."""
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fwd_bwd()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return {"ours": [(e.key, e.self_cpu_time_total / total) for e in events[:8]]}


def _host_sync_cost() -> dict[str, float]:
    """What ``float(loss)`` + ``float(grad_norm)`` cost per step on the CPU (no device queue to drain here)."""
    import torch

    t = torch.tensor(1.0, requires_grad=False)
    n = 10000
    start = time.perf_counter()
    for _ in range(n):
        float(t), float(t)
    return {"us_per_step": 1e6 * (time.perf_counter() - start) / n}


def _threads(fwd_bwd: Callable[[], Any], repeats: int) -> dict[str, Any]:
    import torch

    before = torch.get_num_threads()
    out = {}
    try:
        for n in sorted({1, before}):
            torch.set_num_threads(n)
            out[f"{n} threads"] = alternated({"fwd+bwd": fwd_bwd}, repeats)["fwd+bwd"]
    finally:
        torch.set_num_threads(before)
    return out


def _channels_last(model: Any, b: Any, fwd_bwd: Callable[..., Any], repeats: int) -> dict[str, Any]:
    import copy

    import torch

    from finderpartner.data.collate import Batch

    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl_batch = Batch(
        b.index, b.pixel_values.contiguous(memory_format=torch.channels_last), b.input_ids, b.attention_mask
    )
    return alternated(
        {"contiguous": lambda: fwd_bwd(), "channels_last": lambda: fwd_bwd(cl_model, batch_=cl_batch)}, repeats
    )


def _compile(encoder: Any, b: Any, spec: Any, autocast: Any, repeats: int) -> dict[str, Any]:
    """Plain vs torch.compile'd towers (torch.compile's default mode); compile time reported separately."""
    import copy

    import torch

    from finderpartner.loss import ClipLoss
    from finderpartner.train.step import contrastive_backward

    model = copy.deepcopy(encoder.model)
    for tower in (model.vision_model, model.text_model):
        tower.forward = torch.compile(tower.forward)

    def step(m: Any) -> Any:
        m.zero_grad(set_to_none=True)
        return contrastive_backward(
            dataclasses.replace(encoder, model=m),
            ClipLoss(m.logit_scale),
            b,
            micro_batch_size=len(b),
            autocast=autocast,
            backward=lambda loss: loss.backward(),
        )

    try:
        start = time.perf_counter()
        step(model)
        compile_s = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001  # an inductor/toolchain problem is a finding, not a crash of the profile
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    timings = alternated({"not compiled": lambda: step(encoder.model), "compiled": lambda: step(model)}, repeats)
    return {"first_step_s": compile_s, **timings}


# ---------------------------------------------------------------------------------------------------------------
# 3. End-to-end A/B through train_throughput.py


def ab(candidates: list[str], steps: int, repeats: int, batch: int, workers: int, tmp: Path) -> dict[str, Any]:
    import train_throughput

    out = {}
    for cand in candidates:
        path = tmp / f"ab_{re.sub(r'[^A-Za-z0-9]+', '_', cand)}.json"
        # The micro-batch is pinned to the batch so that the probe's (noisy) choice does not differ between A and B.
        train_throughput.main(
            [
                "--compare-ours",
                "--ours-patch",
                cand,
                "--steps",
                str(steps),
                "--repeats",
                str(repeats),
                "--batch",
                str(batch),
                "--workers",
                str(workers),
                "--out",
                str(path),
                "--ours-set",
                f"train.micro_batch_size={batch}",
            ]
        )
        import json

        out[cand] = json.loads(path.read_text())["summary"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report


def report(results: dict[str, Any]) -> str:
    lines = []
    for prof in results.get("profile", []):
        s = prof["steady"]
        lines.append(
            f"py-spy, tiny spec at {prof['image_size']} px ({prof['jpeg_size']} px JPEGs), batch {prof['batch']}, micro-batch "
            f"{prof['micro_batch']}: {s['samples_per_s']:.1f} samples/s, data wait {100 * s['data_wait_fraction']:.1f}% "
            f"({prof['buckets']['samples']} main-thread samples in the loop)"
        )
        lines.append(
            common.table(["bucket", "share"], [[k, f"{100 * v:.1f}%"] for k, v in prof["buckets"]["share"].items()])
        )
        lines.append("")
    for m in results.get("micro", []):
        lines.append(
            f"micro-benchmarks at {m['image_size']} px, batch {m['batch']} ({m['text_tokens']} text tokens), "
            f"{m['precision']}, median ms:"
        )
        rows = []
        for group in ("fwd_bwd_micro_batch", "attention", "optimizer", "grad_clip", "channels_last"):
            for k, v in m[group].items():
                rows.append([group, k, v["median_ms"], v["min_ms"]])
        for k, v in m["threads"].items():
            rows.append(["threads (fwd+bwd)", k, v["median_ms"], v["min_ms"]])
        comp = m["compile"]
        if "error" in comp:
            rows.append(["compile", comp["error"], "-", "-"])
        else:
            rows += [["compile", k, comp[k]["median_ms"], comp[k]["min_ms"]] for k in ("not compiled", "compiled")]
            rows.append(["compile", "first step (compiling)", 1e3 * comp["first_step_s"], "-"])
        rows.append(["host syncs", "float(loss)+float(norm)", m["host_sync"]["us_per_step"] / 1e3, "-"])
        lines.append(common.table(["part", "variant", "median ms", "min ms"], rows))
        top = ", ".join(f"{name} {100 * share:.0f}%" for name, share in m["ops"]["ours"][:6])
        lines.append(f"top operators by self CPU time (fwd+bwd, ours' attention: {m['attention_impl']}): {top}")
        lines.append("")
    for cand, summary in results.get("ab", {}).items():
        r = summary.get("ratio", {})
        lines.append(
            f"A/B {r.get('of', cand)}: {r.get('median_of_pairs', float('nan')):.3f} "
            f"(pairs: {', '.join(f'{x:.3f}' for x in r.get('per_pair', []))})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(common.machine_line(), flush=True)
    if args.image_sizes is None:
        args.image_sizes = [64, 224] if "bf16" in common.native_precisions() else [64]
    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-profile-"))
    try:
        if "profile" in args.sections:
            py_spy = find_py_spy(args.py_spy)
            if py_spy is None:
                print("py-spy not found: pip install py-spy (or --py-spy PATH); skipping the profile", file=sys.stderr)
            else:
                results["profile"] = [
                    profile_run(
                        py_spy, s, args.steps if s == 64 else max(8, args.steps // 3), args.batch, args.workers, tmp
                    )
                    for s in args.image_sizes
                ]
        if "micro" in args.sections:
            results["micro"] = [micro(s, args.batch, args.micro_repeats) for s in args.micro_sizes]
        if "ab" in args.sections and args.candidates:
            results["ab"] = ab(args.candidates, args.ab_steps, args.ab_repeats, args.batch, args.workers, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + common.machine_line() + "\n" + report(results))
    common.save_results("profile_ours", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
