"""What a model trained on the sample data has learnt, attribute by attribute.

    python scripts/attribute_accuracy.py --model outputs/clip_tiny/best_model [--data data/sample]

Each val image is matched to the best of all distinct first-form captions ("a <size> <colour> <shape> <position>");
the script prints how often that caption's size, colour, shape and position are the image's own (top-1).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing
from finderpartner.embedding import Searcher  # noqa: E402
from finderpartner.env import resolve_device, resolve_precision  # noqa: E402
from finderpartner.model import load_model, set_attention  # noqa: E402


def attributes(caption: str) -> dict[str, str]:
    words = caption.split()  # "a large red circle on the left"
    return {"size": words[1], "colour": words[2], "shape": words[3], "position": " ".join(words[4:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", default=Path("data/sample"), type=Path)
    args = p.parse_args()
    with open(args.data / "captions_val.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    truth: dict[str, str] = {}
    for name, caption in rows:
        if caption.startswith("a "):
            truth.setdefault(name, caption)
    files, captions = sorted(truth), sorted(set(truth.values()))
    device = resolve_device("auto")
    encoder = load_model(args.model)
    set_attention(encoder.model, "auto", device)
    searcher = Searcher(encoder, device=device, precision=resolve_precision("auto", device))
    images, failed = searcher.embed_paths([args.data / "images" / "val" / f for f in files])
    if failed:
        raise SystemExit(f"unreadable val images: {failed[:3]}")
    best = (torch.from_numpy(images) @ torch.from_numpy(searcher.embed_texts(captions)).T).argmax(1)
    hits = {k: 0 for k in ("size", "colour", "shape", "position", "all")}
    for i, name in enumerate(files):
        ours, theirs = attributes(truth[name]), attributes(captions[best[i]])
        for k in ours:
            hits[k] += ours[k] == theirs[k]
        hits["all"] += ours == theirs
    print(f"{len(files)} val images, {len(captions)} distinct captions; top-1 accuracy per attribute:")
    for k, v in hits.items():
        print(f"  {k:<9} {v / len(files):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
