"""A measured two-stage run: train on one domain, fine-tune on a second, and see what WiSE-FT keeps of each.

    python scripts/two_stage.py --out runs/two_stage [--budget 2m] [--plot-to docs/wise_ft.png]

1. Writes the sample data (domain 1: coloured circles, squares, triangles and stars on gray, left/center/right)
   and the second domain (domain 2: hearts, crosses, rings and diamonds in other colours on striped or gradient
   backgrounds, top/middle/bottom; no attribute word in common) under OUT/data/.
2. Stage 1: ``finderpartner train`` with the minilm preset (the pretrained all-MiniLM-L6-v2 text tower, locked,
   and a tiny ViT from scratch) on domain 1, into OUT/runs/stage1/.
3. Stage 2: ``finderpartner train`` with ``--stage2-config`` (default: the finetune preset) and ``model.name`` =
   the stage-1 best model, on domain 2, into OUT/runs/<--stage2-name>/ (``--stage2-set key=value`` adds overrides:
   the recipe grid in README runs this with other learning rates and text-tower locks).
4. ``finderpartner eval --sweep-alpha`` between the two models on both domains' val splits (alpha 0 is the stage-1
   model, 1 the stage-2 one), into OUT/eval/<--stage2-name>/.

Prints each model on each domain (mean recall, text->image R@1), the stage-2 gain on domain 2, the forgetting on
domain 1, and the WiSE-FT table; writes OUT/two_stage_<name>.json. A stage that finished with the same arguments
is reused (the record in OUT/done/), so several stage-2 recipes can share one stage 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without installing
from finderpartner.data.sample import make_sample_data, make_second_domain  # noqa: E402

ALPHAS = ("0", "0.25", "0.5", "0.75", "1")


def _env() -> dict[str, str]:
    """The subprocesses import this checkout's package, whatever is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "finderpartner.cli", *args]


def train_stage(out: Path, name: str, config: Path, sets: list[str]) -> tuple[Path, float]:
    """Run (or reuse) one training stage; returns its best model folder and the seconds it took."""
    command = _cli("train", "--config", str(config), "--resume", "auto")
    for s in [f"output_dir={out / 'runs'}", f"experiment={name}", *sets]:
        command += ["--set", s]
    record_path = out / "done" / f"{name}.json"
    best = out / "runs" / name / "best_model"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record["command"][2:] == command[2:] and (best / "config.json").is_file():
            print(f"{name}: reusing the finished run in {best.parent} ({record['seconds']:.0f} s)", flush=True)
            return best, record["seconds"]
        sys.exit(f"{best.parent} was trained with other arguments ({record_path}); choose another --out or name")
    print(f"{name}: {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=_env())
    seconds = time.perf_counter() - start
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps({"command": command, "seconds": seconds}, indent=2) + "\n", encoding="utf-8")
    return best, seconds


def t2i_r1(summary: dict) -> tuple[float, str]:
    """Text->image R@1, caption-aware where the split has repeated captions (as mean recall is)."""
    retrieval = summary["retrieval"]
    if "text_to_image_caption_aware" in retrieval:
        return float(retrieval["text_to_image_caption_aware"]["R@1"]), "caption-aware"
    return float(retrieval["text_to_image"]["R@1"]), "plain"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder: data/, runs/, eval/, done/")
    parser.add_argument("--budget", default="2m", help="train.time_budget of each stage (default: 2m)")
    parser.add_argument("--stage1-config", type=Path, default=ROOT / "configs" / "minilm_tiny_vit.yaml")
    parser.add_argument("--stage2-config", type=Path, default=ROOT / "configs" / "finetune.yaml")
    parser.add_argument("--stage2-set", action="append", default=[], help="extra key=value for stage 2 (repeatable)")
    parser.add_argument("--stage2-name", default="stage2", help="stage 2's run and eval folder name")
    parser.add_argument("--alpha", nargs="+", default=list(ALPHAS), help="WiSE-FT alphas (default: 0 .. 1 by 0.25)")
    parser.add_argument("--plot-to", type=Path, help="also copy the WiSE-FT plot here (e.g. docs/wise_ft.png)")
    args = parser.parse_args()
    out = args.out.resolve()
    started = time.perf_counter()

    d1, d2 = out / "data" / "domain1", out / "data" / "domain2"
    make_sample_data(d1)
    make_second_domain(d2)
    common = [f"train.time_budget={args.budget}"]
    stage1, s1_seconds = train_stage(out, "stage1", args.stage1_config, [f"data.root={d1}", *common])
    stage2, s2_seconds = train_stage(
        out,
        args.stage2_name,
        args.stage2_config,
        [f"model.name={stage1}", f"data.root={d2}", *common, *args.stage2_set],
    )

    eval_dir = out / "eval" / args.stage2_name
    sweep = _cli("eval", "--sweep-alpha", "--base", str(stage1), "--finetuned", str(stage2))
    sweep += ["--data", str(d1), "--split", "val", "--data2", str(d2), "--split2", "val", "--out", str(eval_dir)]
    sweep += ["--alpha", *args.alpha, "--json"]
    print(f"sweep: {' '.join(sweep[2:])}", flush=True)
    record = json.loads(subprocess.run(sweep, check=True, env=_env(), capture_output=True, text=True).stdout)

    rows = []
    for row in record["rows"]:
        cells = []
        for s in row["sets"]:
            r1, kind = t2i_r1(s["summary"])
            cells.append({"mean_recall": s["mean_recall"], "t2i_r1": r1, "t2i_r1_kind": kind})
        rows.append({"alpha": row["alpha"], "domains": cells})
    by_alpha = {row["alpha"]: row["domains"] for row in rows}
    if 0.0 not in by_alpha or 1.0 not in by_alpha:
        sys.exit("the sweep needs alpha 0 (the stage-1 model) and 1 (the stage-2 model) among --alpha")
    s1, s2 = by_alpha[0.0], by_alpha[1.0]
    kind = s1[0]["t2i_r1_kind"]
    result = {
        "out": str(out),
        "budget": args.budget,
        "stage2_config": str(args.stage2_config),
        "stage2_set": args.stage2_set,
        "train_seconds": {"stage1": s1_seconds, "stage2": s2_seconds},
        "stage1": {"domain1": s1[0], "domain2": s1[1]},
        "stage2": {"domain1": s2[0], "domain2": s2[1]},
        "gain_domain2": {k: s2[1][k] - s1[1][k] for k in ("mean_recall", "t2i_r1")},
        "forgetting_domain1": {k: s1[0][k] - s2[0][k] for k in ("mean_recall", "t2i_r1")},
        "wise_ft": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }

    print(f"\nbudget {args.budget} per stage; text->image R@1 is {kind}")
    print(f"{'model':<16}{'domain 1 mean R':>16}{'domain 1 R@1':>14}{'domain 2 mean R':>17}{'domain 2 R@1':>14}")
    for name, cells in (("stage 1", s1), ("stage 2", s2)):
        print(
            f"{name:<16}{cells[0]['mean_recall']:>16.3f}{cells[0]['t2i_r1']:>14.3f}"
            f"{cells[1]['mean_recall']:>17.3f}{cells[1]['t2i_r1']:>14.3f}"
        )
    g, f = result["gain_domain2"], result["forgetting_domain1"]
    print(f"stage-2 gain on domain 2 (stage 2 - stage 1): mean recall {g['mean_recall']:+.3f}, R@1 {g['t2i_r1']:+.3f}")
    print(f"forgetting on domain 1 (stage 1 - stage 2):   mean recall {f['mean_recall']:+.3f}, R@1 {f['t2i_r1']:+.3f}")
    print(f"\nWiSE-FT{'':<3}{'domain 1 mean R':>16}{'domain 1 R@1':>14}{'domain 2 mean R':>17}{'domain 2 R@1':>14}")
    for row in rows:
        a, b = row["domains"]
        print(
            f"alpha {row['alpha']:<4g}{a['mean_recall']:>16.3f}{a['t2i_r1']:>14.3f}"
            f"{b['mean_recall']:>17.3f}{b['t2i_r1']:>14.3f}"
        )
    summary_path = out / f"two_stage_{args.stage2_name}.json"
    summary_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nreport: {summary_path}  sweep: {eval_dir / 'wise_ft.json'}  plot: {eval_dir / 'wise_ft.png'}")
    if args.plot_to is not None:
        args.plot_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(eval_dir / "wise_ft.png", args.plot_to)
        print(f"plot copied to {args.plot_to}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
