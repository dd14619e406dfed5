"""Training throughput: our trainer vs open_clip's on the same model, data, batch, workers and machine.

Both trainers run as subprocesses, alternating (ours, open_clip, open_clip, ours, ...), each for the same number
of optimizer steps; the steady state excludes the first ``--warmup-steps``. Reported per trainer (median over
``--repeats`` runs): samples/s, data-wait share of step time, peak memory of the process tree, MFU against the
measured matmul peak of this machine, and the ratio ours / open_clip (median of the per-pair ratios).

    python benchmarks/train_throughput.py                      # quick: 3 x 2 runs of 40 steps
    python benchmarks/train_throughput.py --steps 100 --repeats 5
    python benchmarks/train_throughput.py --variant 'sdpa||model.attention=sdpa'  # + ours with a setting, a third contender
    python benchmarks/train_throughput.py --ours-patch unfused_adamw --compare-ours  # a variant vs plain ours
    python benchmarks/train_throughput.py --only ours --image-size 224 --data-image-size 256 \
        --steps 16 --warmup-steps 4 --log-every 2             # the 224 px data-wait check

Each run's "other load" (cores busy with other processes meanwhile) is recorded; see README.md on noise.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="existing sample-data folder (default: generated once into the cache)")
    p.add_argument("--data-image-size", type=int, default=96, help="JPEG size of generated data (default 96)")
    p.add_argument("--train-images", type=int, default=2000, help="images in generated data (2 captions each)")
    p.add_argument("--image-size", type=int, default=64, help="model input resolution (tiny spec: 64)")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default: the spec's)")
    p.add_argument(
        "--spec",
        choices=["issue6", "preset"],
        default="issue6",
        help="model for both trainers: the issue-6 tiny spec (patch 8, ViT width 192 x 4 layers; default) or "
        "configs/clip_tiny.yaml's (what `make run` trains: patch 16, width 256 x 3 layers)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the steady state")
    p.add_argument("--log-every", type=int, default=5, help="steps per logged window (both trainers)")
    p.add_argument("--repeats", type=int, default=3, help="runs per trainer, alternated")
    p.add_argument("--only", choices=["both", "ours", "open_clip"], default="both")
    p.add_argument("--ours-precision", default="auto", help="ours: train.precision (auto = bf16 here)")
    p.add_argument(
        "--open-clip-precision", default=None, help="open_clip --precision (default amp_bf16 where bf16 is native)"
    )
    p.add_argument("--ours-hflip", action="store_true", help="keep our horizontal flip (open_clip has none)")
    p.add_argument(
        "--ours-patch", default="", help="benchmarks/patches.py patches for ours, e.g. unfused_adamw,threads=1"
    )
    p.add_argument(
        "--compare-ours",
        action="store_true",
        help="with --ours-patch: alternate plain ours vs patched ours instead of open_clip",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'LABEL|PATCHES|SETS'",
        help="an extra contender: our trainer with patches (comma-separated) and --set overrides "
        "(comma-separated key=value), e.g. 'mb64||train.micro_batch_size=64' or "
        "'loop|unfused_adamw|train.micro_batch_size=32' (repeatable; alternated with the others)",
    )
    p.add_argument(
        "--ours-set", action="append", default=[], metavar="KEY=VALUE", help="extra --set for ours (repeatable)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default benchmarks/results/train_throughput.json)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders and print where they are")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Preparation: data, tokenizer, the open_clip model folder, parameter counts, machine peak, FLOPs


def prepare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = common.sample_data(args.data, image_size=args.data_image_size, train_images=args.train_images, val_images=16)
    spec = common.tiny_spec(args.image_size, args.patch_size, preset=args.spec == "preset")
    tokenizer = common.caption_tokenizer(data, tmp / "tokenizer")
    model_dir = common.open_clip_model_dir(spec, tokenizer, tmp / "open_clip_model")
    ours, theirs = common.build_both(spec, tokenizer, model_dir)
    counts = {"ours": common.n_params(ours), "open_clip": common.n_params(theirs)}
    counts["relative_difference"] = counts["open_clip"] / counts["ours"] - 1
    if abs(counts["relative_difference"]) > 0.02:
        raise SystemExit(f"parameter counts differ by more than 2%: {counts}")
    # open_clip runs exactly one epoch over a CSV of steps x batch rows; ours stops at train.max_steps.
    csv_path = common.write_open_clip_csv(data, "train", tmp / "train.tsv", rows=args.steps * args.batch)
    captions = [c for _, c in common.read_pairs(data, "train")]
    return {
        "data": data,
        "spec": spec,
        "tokenizer": tokenizer,
        "model_dir": model_dir,
        "params": counts,
        "csv": csv_path,
        "captions": captions,
    }


def machine_peak(before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measured matmul peak with this process's threads (= cores): the denominator of MFU.

    Measured before and after the runs; the higher best-of-7 counts (other load on a shared machine only
    ever lowers it).
    """
    now = {p: common.matmul_peak(p) for p in common.native_precisions()}  # emulated bf16 would take minutes
    if before is None:
        return now
    return {k: max(before[k], now[k], key=lambda m: m["best_flops"]) for k in now}


# ---------------------------------------------------------------------------------------------------------------
# One run of each trainer


def run_ours(
    args: argparse.Namespace,
    prep: dict[str, Any],
    tmp: Path,
    tag: str,
    patches: str,
    sets: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec = prep["spec"]
    overrides: dict[str, Any] = {
        "output_dir": tmp,
        "experiment": tag,
        "data.root": prep["data"],
        "data.val_split": "",
        "data.num_workers": args.workers,
        "train.batch_size": args.batch,
        "train.max_steps": args.steps,
        "train.log_every": args.log_every,
        "train.checkpoint_every": 10**9,
        "train.precision": args.ours_precision,
        **common.spec_overrides(spec),
        "tracking.tensorboard": False,
        "data.augment.hflip": args.ours_hflip,
    }
    for item in args.ours_set:
        key, _, value = item.partition("=")
        overrides[key] = value
    overrides.update(sets or {})
    cmd = common.ours_command(overrides, [p for p in patches.split(",") if p])
    # Our trainer caches its micro-batch probe in ~/.cache/finderpartner; a private cache per run makes every
    # run decide afresh (as on a new machine) and leaves the user's cache alone.
    env = common.child_env({"FINDERPARTNER_CACHE": str(tmp / f"{tag}_cache")})
    result = common.run_monitored(cmd, tmp / f"{tag}.log", env=env)
    metrics = tmp / tag / "metrics.jsonl"
    if result.returncode != 0 or not metrics.exists():
        raise SystemExit(f"our trainer failed ({result.returncode}):\n{common.tail(result.log)}")
    windows = common.ours_windows(metrics, args.batch)
    return {**_summarise(result, windows, args), "micro_batch": common.ours_micro_batch(metrics)}


def run_open_clip(args: argparse.Namespace, prep: dict[str, Any], tmp: Path, tag: str) -> dict[str, Any]:
    cmd = common.open_clip_command(
        prep["model_dir"],
        prep["csv"],
        tmp / "open_clip_logs",
        tag,
        batch=args.batch,
        workers=args.workers,
        epochs=1,
        lr=1e-3,
        warmup=10,
        precision=args.open_clip_precision,
        log_every=args.log_every,
    )
    result = common.run_monitored(cmd, tmp / f"{tag}.log")
    windows = common.open_clip_windows(result.log, args.batch)
    if result.returncode != 0 or not windows:
        raise SystemExit(f"open_clip failed ({result.returncode}):\n{common.tail(result.log)}")
    return _summarise(result, windows, args)


def _summarise(result: common.RunResult, windows: list[common.Window], args: argparse.Namespace) -> dict[str, Any]:
    steady = common.steady_state(windows, args.warmup_steps)
    return {
        **steady,
        "peak_rss_gib": common.gib(result.peak_rss_bytes),
        "peak_pss_gib": common.gib(result.peak_pss_bytes),
        "peak_main_rss_gib": common.gib(result.peak_main_rss_bytes),
        "wall_s": result.seconds,
        "cpu_s": result.cpu_seconds,
        "foreign_load": result.foreign_load,
        "windows": [w.__dict__ for w in windows],
    }


# ---------------------------------------------------------------------------------------------------------------
# Alternation, summary, report


# A run counts as "quiet" when other processes kept at most this many cores busy on average meanwhile.
QUIET_LOAD = 0.25


def contenders(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The (name, runner) pairs to alternate."""
    if args.compare_ours:
        return [
            ("ours", lambda p, t, tag: run_ours(args, p, t, tag, "")),
            (f"ours+{args.ours_patch}", lambda p, t, tag: run_ours(args, p, t, tag, args.ours_patch)),
        ]
    out = []
    if args.only in ("both", "ours"):
        name = f"ours+{args.ours_patch}" if args.ours_patch else "ours"
        out.append((name, lambda p, t, tag: run_ours(args, p, t, tag, args.ours_patch)))
    for spec in args.variant:
        label, patches, sets = (spec.split("|") + ["", ""])[:3]
        overrides = dict(item.split("=", 1) for item in sets.split(",") if item)
        out.append((f"ours[{label}]", lambda p, t, tag, pa=patches, ov=overrides: run_ours(args, p, t, tag, pa, ov)))
    if args.only in ("both", "open_clip"):
        out.append(("open_clip", lambda p, t, tag: run_open_clip(args, p, t, tag)))
    return out


def alternate(args: argparse.Namespace, prep: dict[str, Any], tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """ABBA order: a slow stretch of the shared machine hits both trainers alike."""
    runs: dict[str, list[dict[str, Any]]] = {}
    pairs = contenders(args)
    for rep in range(args.repeats):
        order = pairs if rep % 2 == 0 else pairs[::-1]
        for name, runner in order:
            tag = f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}_{rep}"
            res = runner(prep, tmp, tag)
            runs.setdefault(name, []).append(res)
            print(
                f"  run {rep + 1}/{args.repeats} {name:>24s}: {res['samples_per_s']:7.1f} samples/s, "
                f"data wait {100 * res['data_wait_fraction']:4.1f}%, peak PSS {res['peak_pss_gib']:.2f} GiB, "
                f"other load {res['foreign_load']:.2f} cores"
                + (f", micro-batch {res['micro_batch']}" if "micro_batch" in res else ""),
                flush=True,
            )
    return runs


def summarise(
    runs: dict[str, list[dict[str, Any]]], flops: dict[str, float], peak: dict[str, Any], precisions: dict[str, str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, results in runs.items():
        fps = flops["open_clip"] if name == "open_clip" else flops["ours"]
        sps = common.spread(r["samples_per_s"] for r in results)
        out[name] = {
            "samples_per_s": sps,
            "data_wait_fraction": common.median(r["data_wait_fraction"] for r in results),
            "peak_rss_gib": common.median(r["peak_rss_gib"] for r in results),
            "peak_pss_gib": common.median(r["peak_pss_gib"] for r in results),
            "flops_per_sample": fps,
            "achieved_tflops": sps["median"] * fps / 1e12,
            "precision": precisions[name],
            "mfu": sps["median"] * fps / peak[precisions[name]]["best_flops"] if precisions[name] in peak else math.nan,
            "mfu_fp32_peak": sps["median"] * fps / peak["fp32"]["best_flops"],
            "worker_cpu_share": common.median(_worker_share(r) for r in results),
            "micro_batches": [r.get("micro_batch") for r in results],
            "foreign_load": [r["foreign_load"] for r in results],
        }
    names = list(runs)
    base = "open_clip" if "open_clip" in runs else names[0]
    ratios = {}
    for name in names:
        if name == base:
            continue
        pair_ratios = [x["samples_per_s"] / y["samples_per_s"] for x, y in zip(runs[name], runs[base])]
        quiet = [
            r
            for r, x, y in zip(pair_ratios, runs[name], runs[base])
            if max(x["foreign_load"], y["foreign_load"]) <= QUIET_LOAD
        ]
        ratios[name] = {
            "of": f"{name} / {base}",
            "per_pair": pair_ratios,
            "median_of_pairs": common.median(pair_ratios),
            "of_medians": out[name]["samples_per_s"]["median"] / out[base]["samples_per_s"]["median"],
            "quiet_pairs": quiet,
            "median_of_quiet_pairs": common.median(quiet),
        }
    if ratios:
        out["ratios"] = ratios
        out["ratio"] = next(iter(ratios.values()))  # the first contender against the baseline (the headline)
    return out


def _worker_share(run: dict[str, Any]) -> float:
    cpu = run["cpu_s"]
    total = cpu.get("main", 0) + cpu.get("children", 0)
    return cpu.get("children", 0) / total if total else math.nan


def report(summary: dict[str, Any], prep: dict[str, Any], peak: dict[str, Any], flops: dict[str, float]) -> str:
    rows = []
    for name, s in summary.items():
        if name in ("ratio", "ratios"):
            continue
        sps = s["samples_per_s"]
        micro = ",".join(str(m) for m in s["micro_batches"]) if any(s["micro_batches"]) else "-"
        rows.append(
            [
                name,
                s["precision"],
                sps["median"],
                f"{sps['min']:.0f}-{sps['max']:.0f}",
                f"{100 * sps['rel_range']:.0f}%",
                micro,
                f"{100 * s['data_wait_fraction']:.1f}%",
                f"{100 * s['worker_cpu_share']:.0f}%",
                f"{s['peak_pss_gib']:.2f} / {s['peak_rss_gib']:.2f}",
                f"{s['flops_per_sample'] / 1e9:.3f}",
                f"{100 * s['mfu']:.1f}%",
                ",".join(f"{x:.2f}" for x in s["foreign_load"]),
            ]
        )
    p = prep["params"]
    headers = [
        "trainer",
        "precision",
        "samples/s",
        "range",
        "spread",
        "micro-batch",
        "data wait",
        "worker CPU",
        "peak GiB PSS/RSS",
        "GFLOP/pair",
        "MFU",
        "other load (cores)",
    ]
    peaks = ", ".join(
        f"{k} {v['best_flops'] / 1e12:.2f} TFLOP/s ({v['n']}^3, median {v['median_flops'] / 1e12:.2f})"
        for k, v in peak.items()
    )
    lines = [
        common.machine_line(),
        f"parameters: ours {p['ours']:,}, open_clip {p['open_clip']:,} ({100 * p['relative_difference']:+.2f}%)",
        f"matmul peak ({next(iter(peak.values()))['threads']} threads, best of 7; native precisions only): {peaks}; "
        "MFU is against the peak of the precision each trainer ran",
        (
            f"fwd+bwd GFLOPs per pair: ours {flops['ours'] / 1e9:.3f} (text padded to the batch's longest caption, "
            f"mean {flops['ours_text_tokens_mean']:.1f} tokens), open_clip {flops['open_clip'] / 1e9:.3f} "
            f"(padded to {flops['open_clip_text_tokens']:.0f})"
        ),
        "",
        common.table(headers, rows),
    ]
    for r in summary.get("ratios", {}).values():
        lines.append(
            f"ratio {r['of']}: {r['median_of_pairs']:.2f} (median of per-pair ratios "
            f"{', '.join(f'{x:.2f}' for x in r['per_pair'])}; ratio of medians {r['of_medians']:.2f}; "
            f"quiet pairs (other load <= {QUIET_LOAD} cores): {len(r['quiet_pairs'])}, median "
            f"{r['median_of_quiet_pairs']:.2f})"
        )
    return "\n".join(lines)


def precisions_ran(args: argparse.Namespace) -> dict[str, str]:
    """The precision each contender trained in ('auto' resolved the way our trainer resolves it)."""
    import torch

    from finderpartner.env import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, str] = {}
    for name, _ in contenders(args):
        if name == "open_clip":
            out[name] = {"amp_bf16": "bf16", "amp": "fp16", "amp_bfloat16": "bf16"}.get(
                args.open_clip_precision, "fp32"
            )
        else:
            sets = dict(
                item.split("=", 1)
                for spec in args.variant
                if name == f"ours[{spec.split('|')[0]}]"
                for item in (spec.split("|") + ["", ""])[2].split(",")
                if item
            )
            out[name] = resolve_precision(sets.get("train.precision", args.ours_precision), device)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from finderpartner.env import cpu_supports_bf16

    bf16 = cpu_supports_bf16() or torch.cuda.is_available()
    args.open_clip_precision = args.open_clip_precision or ("amp_bf16" if bf16 else "fp32")
    out = args.out or common.default_out("train_throughput" + ("_ours_compare" if args.compare_ours else ""))
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-train-"))
    try:
        prep = prepare(args, tmp)
        peak = machine_peak()
        flops = common.model_flops_per_sample(
            prep["spec"], prep["tokenizer"], prep["model_dir"], prep["captions"], args.batch
        )
        print(common.machine_line(), flush=True)
        print(
            f"data {prep['data']}; {args.steps} steps of batch {args.batch}, {args.workers} workers, "
            f"warm-up {args.warmup_steps} steps excluded; precision "
            + ", ".join(f"{k} {v}" for k, v in precisions_ran(args).items()),
            flush=True,
        )
        runs = alternate(args, prep, tmp)
        peak = machine_peak(peak)
        summary = summarise(runs, flops, peak, precisions_ran(args))
        text = report(summary, prep, peak, flops)
        print("\n" + text)
    finally:
        if args.keep:
            print(f"\nrun folders kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    payload = {
        "benchmark": "train_throughput",
        "args": {k: v for k, v in vars(args).items()},
        "machine": common.machine_info(),
        "versions": common.package_versions(),
        "params": prep["params"],
        "matmul_peak": peak,
        "flops_per_sample": flops,
        "summary": summary,
        "runs": runs,
    }
    print(f"results: {common.write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
