"""Retrieval quality of the CLIP loss against the SigLIP loss (``train.loss: siglip``) at equal steps.

Trains the tiny preset (configs/clip_tiny.yaml) four times on the sample data, loss clip / siglip x contrastive
batch 16 / 64, each for the same number of optimizer steps (no time budget: quality at equal steps does not depend
on how fast or how loaded the machine is), and prints the final validation's text->image R@1 / R@5 (caption-aware)
and mean recall. Everything else is the preset's (lr 5e-4, 50 warm-up steps, cosine decay); SigLIP starts from
the paper's t' = log 10, b = -10.

    python benchmarks/siglip_vs_clip.py                   # 300 steps per run
    python benchmarks/siglip_vs_clip.py --steps 100 --data data/sample
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

LOSSES = ("clip", "siglip")
BATCHES = (16, 64)
T2I = "val/retrieval/text_to_image_caption_aware"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    p.add_argument("--data", type=Path, default=None, help="a sample-data folder (default: one made in a temp folder)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), help="train.loss values to run")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="contrastive batch sizes to run")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default benchmarks/results/siglip_vs_clip.json)"
    )
    return p.parse_args(argv)


def run_one(data: Path, tmp: Path, loss: str, batch: int, steps: int, seed: int) -> dict[str, Any]:
    tag = f"{loss}_b{batch}"
    overrides = {
        "output_dir": tmp,
        "experiment": tag,
        "data.root": data.resolve(),
        "train.loss": loss,
        "train.batch_size": batch,
        "train.time_budget": "null",
        "train.max_steps": steps,
        "train.epochs": 1000,  # max_steps decides
        "seed": seed,
    }
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "finderpartner.cli", "train", "--config", str(common.TINY_CONFIG), *sets]
    env = common.child_env({"FINDERPARTNER_CACHE": str(tmp / f"{tag}_cache")})
    start = time.time()
    result = common.run_monitored(cmd, tmp / f"{tag}.log", env=env)
    if result.returncode != 0:
        raise SystemExit(f"{tag} failed ({result.returncode}):\n{common.tail(result.log)}")
    records = [json.loads(line) for line in (tmp / tag / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    val = [r for r in records if f"{T2I}/R@1" in r]
    last = val[-1]  # the final validation, at the last step
    train = [r for r in records if "train/sigmoid_bias" in r or "train/logit_scale" in r]
    config = json.loads((tmp / tag / "best_model" / "config.json").read_text(encoding="utf-8"))
    return {
        "loss": loss,
        "batch": batch,
        "step": last["step"],
        "t2i_R@1": last[f"{T2I}/R@1"],
        "t2i_R@5": last[f"{T2I}/R@5"],
        "mean_recall": last["val/mean_recall"],
        "val_loss": last.get("val/loss"),
        "validations": len(val),
        "final_train_values": {k: v for k, v in (train[-1] if train else {}).items() if k.startswith("train/")},
        "saved_objective": config.get("finderpartner_objective"),
        "seconds": time.time() - start,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(common.machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="siglip-vs-clip-") as tmp_name:
        tmp = Path(tmp_name)
        data = args.data
        if data is None:
            from finderpartner.data.sample import make_sample_data

            data = Path(make_sample_data(tmp / "data").root)  # what `finderpartner sample-data` writes
        rows = []
        for batch in args.batches:
            for loss in args.losses:
                print(f"training {loss} at batch {batch} for {args.steps} steps ...", flush=True)
                rows.append(run_one(data, tmp, loss, batch, args.steps, args.seed))
                r = rows[-1]
                print(
                    f"  R@1 {r['t2i_R@1']:.3f}  R@5 {r['t2i_R@5']:.3f}  mean recall {r['mean_recall']:.3f}"
                    f"  ({r['seconds']:.0f} s)",
                    flush=True,
                )
    headers = ["loss", "batch", "steps", "t2i R@1 (c-a)", "t2i R@5 (c-a)", "mean recall", "train min"]
    table = [
        [r["loss"], r["batch"], r["step"], r["t2i_R@1"], r["t2i_R@5"], r["mean_recall"], r["seconds"] / 60]
        for r in rows
    ]
    print()
    print(common.table(headers, table))
    common.save_results("siglip_vs_clip", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
