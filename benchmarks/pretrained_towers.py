"""A pretrained text tower against the from-scratch tiny preset, at the same wall-clock, on words never trained on.

    python benchmarks/pretrained_towers.py [--out /tmp/towers_bench] [--budget 2m] [--skip-train]

1. Data: the sample data (`make run`'s) plus a held-out `paraphrase` split: new images of the same generator whose
   captions use synonyms and other word orders that no training caption contains ("there is a tiny crimson box at
   the eastern edge" for "a small red square on the right").
2. Train `configs/clip_tiny.yaml` (tokenizer learnt from the captions, both towers from scratch) and
   `configs/minilm_tiny_vit.yaml` (the pretrained all-MiniLM-L6-v2 text tower, locked and cached, + the same ViT)
   for the same time budget, one after the other, in fresh processes.
3. Evaluate both on `val` (the training words) and `paraphrase`: text->image R@1/R@5 (caption-aware), and zero-shot
   top-1 of each attribute with the paraphrase words as class names ("crimson", "box", "huge", "at the eastern
   edge"; CLIP's prompt templates).
4. LiT throughput: training steps of the minilm preset's model with the text tower unlocked, locked, and locked
   with its outputs cached, in samples/s (steady state: after the cache has seen every caption).

Machines are shared and noisy: the quality comparison is at equal wall-clock, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine_line  # noqa: E402

from finderpartner.config import preset_config  # noqa: E402
from finderpartner.data.collate import Collator  # noqa: E402
from finderpartner.data.dataset import PairDataset, read_split  # noqa: E402
from finderpartner.data.sample import PARAPHRASE_WORDS, make_paraphrase_split, make_sample_data  # noqa: E402
from finderpartner.data.sources import EvalSet  # noqa: E402
from finderpartner.data.transforms import TrainTransform  # noqa: E402
from finderpartner.embedding import embed_images  # noqa: E402
from finderpartner.evaluate import evaluate_split  # noqa: E402
from finderpartner.loss import ClipLoss  # noqa: E402
from finderpartner.model import build_model, load_model, set_attention  # noqa: E402
from finderpartner.train import build_optimizer  # noqa: E402
from finderpartner.train.levers import TowerCache, apply_freezing  # noqa: E402
from finderpartner.train.step import contrastive_backward  # noqa: E402
from finderpartner.zeroshot import TEMPLATES, class_embeddings, score_zeroshot  # noqa: E402

PRESETS = {
    "from scratch (clip_tiny)": "configs/clip_tiny.yaml",
    "MiniLM text, locked (minilm)": "configs/minilm_tiny_vit.yaml",
}


def train(config: str, data: Path, out: Path, budget: str) -> tuple[Path, dict]:
    experiment = Path(config).stem
    command = [
        sys.executable, "-m", "finderpartner.cli", "-q", "train", "--config", str(ROOT / config),
        "--set", f"data.root={data}", "--set", f"output_dir={out}", "--set", f"train.time_budget={budget}",
        "--set", f"experiment={experiment}",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    run = out / experiment
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    state = json.loads((newest / "state.json").read_text())["trainer"]
    return run / "best_model", {"steps": state["global_step"], "seconds": time.perf_counter() - started}


def evaluate(model: Path, data: Path) -> dict[str, float]:
    encoder = load_model(model)
    set_attention(encoder.model, "auto", torch.device("cpu"))
    figures: dict[str, float] = {}
    for split in ("val", "paraphrase"):
        table, _ = read_split(data, split)
        result = evaluate_split(encoder, EvalSet.from_table(table), device=torch.device("cpu"))
        aware = result.metrics["text_to_image_caption_aware"]
        figures[f"{split} R@1"], figures[f"{split} R@5"] = aware["R@1"], aware["R@5"]
    with open(data / "attributes_paraphrase.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    images, failed = embed_images(encoder, [data / "images" / "paraphrase" / r["filename"] for r in rows])
    assert not failed, failed
    for attribute, words in PARAPHRASE_WORDS.items():
        canonical = list(words)
        class_emb = class_embeddings(encoder, list(words.values()), list(TEMPLATES))
        labels = [canonical.index(r[attribute]) for r in rows]
        result = score_zeroshot(attribute, images, class_emb, labels, list(words.values()), list(TEMPLATES))
        figures[f"zero-shot {attribute}"] = result.metrics["top1"]
    figures["zero-shot mean"] = sum(figures[f"zero-shot {a}"] for a in PARAPHRASE_WORDS) / len(PARAPHRASE_WORDS)
    return figures


def lit_throughput(data: Path, steps: int = 12, batch: int = 64) -> dict[str, float]:
    """Samples/s of training steps of the minilm preset's model: text tower unlocked, locked, locked + cached."""
    cfg = preset_config("minilm_tiny_vit")
    table, _ = read_split(data, "train")
    results = {}
    for name, locked, cached in (("unlocked", False, False), ("locked", True, False), ("locked + cached", True, True)):
        encoder = build_model(cfg.model, seed=0)
        set_attention(encoder.model, "auto", torch.device("cpu"), "fp32")
        apply_freezing(encoder.model, text_tower=locked)
        encoder.text_cache = TowerCache(encoder.model.text_model) if cached else None
        encoder.model.train()
        objective = ClipLoss(encoder.model.logit_scale)
        optimizer = build_optimizer(encoder.model, objective, cfg)
        dataset = PairDataset(table, TrainTransform(encoder.image_spec))
        collate = Collator(encoder.text_tokenizer())
        # The cache's steady state: every caption of the data seen once (the first epoch pays for them).
        if cached:
            with torch.no_grad():
                for start in range(0, len(table.captions), 256):
                    encoder.encode_texts(list(table.captions[start : start + 256]))
        batches = [collate([dataset[(i * batch + j, j)] for j in range(batch)]) for i in range(steps + 2)]
        times = []
        for b in batches:
            start = time.perf_counter()
            contrastive_backward(
                encoder,
                objective,
                b,
                micro_batch_size=batch,
                autocast=contextlib.nullcontext,
                backward=lambda x: x.backward(),
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        steady = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-up steps
        results[name] = batch / steady
        print(f"  {name}: {results[name]:.1f} samples/s (median step {steady:.3f} s)", flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/towers_bench"))
    p.add_argument("--budget", default="2m")
    p.add_argument("--skip-train", action="store_true", help="only the LiT throughput")
    args = p.parse_args()
    data = args.out / "data"
    make_sample_data(data)
    if not (data / "captions_paraphrase.csv").exists():
        make_paraphrase_split(data, images=300, image_size=96)
    print(machine_line())
    print("LiT: training steps of the minilm preset's model (batch 64, fp32):")
    lit = lit_throughput(data)
    print(f"  locked + cached / unlocked: {lit['locked + cached'] / lit['unlocked']:.2f}x")
    if args.skip_train:
        return 0
    rows = {}
    for name, config in PRESETS.items():
        model, run = train(config, data, args.out / "runs", args.budget)
        rows[name] = {**run, **evaluate(model, data)}
        print(name, json.dumps(rows[name]), flush=True)
    columns = ["steps", "val R@1", "val R@5", "paraphrase R@1", "paraphrase R@5"]
    columns += [*(f"zero-shot {a}" for a in PARAPHRASE_WORDS), "zero-shot mean"]
    print(f"\nsame wall-clock: time_budget {args.budget} each; paraphrase: 300 images, unseen words")
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, r in rows.items():
        print(
            f"| {name} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
