"""Zero-shot classification of the sample data's attributes: colour, shape, size and position as class sets.

    python scripts/zeroshot_attributes.py --model outputs/clip_tiny/best_model [--data data/sample]

Each val image's classes are read from its first-form caption ("a <size> <colour> <shape> <position>"). Every
attribute is classified twice, with the class embedding of CLIP's recipe (the mean of normalised prompt
embeddings): with the built-in CLIP templates ("a photo of a {}." ...), and with caption-form templates, the
first caption form with every value of the three other attributes filled in and {} for this one (24, 48, 96 and
64 prompts per class: an ensemble that marginalises the other attributes). Positions are named as the captions
name them ("on the left", "in the center", "on the right").
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing
from finderpartner.data.sample import COLOURS, POSITIONS, SHAPES, SIZES  # noqa: E402
from finderpartner.embedding import embed_images  # noqa: E402
from finderpartner.env import autocast_factory, resolve_device, resolve_precision  # noqa: E402
from finderpartner.model import load_model, set_attention  # noqa: E402
from finderpartner.zeroshot import TEMPLATES, class_embeddings, score_zeroshot  # noqa: E402

PLACES = {p: "in the center" if p == "center" else f"on the {p}" for p in POSITIONS}  # as the captions say it
VALUES = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "position": list(PLACES.values())}


def attributes(caption: str) -> dict[str, str]:
    words = caption.split()  # "a large red circle on the left"
    return {"size": words[1], "colour": words[2], "shape": words[3], "position": " ".join(words[4:])}


def caption_templates(attribute: str) -> list[str]:
    """The first caption form with {} for ``attribute`` and every combination of the other three."""
    others = [a for a in ("size", "colour", "shape", "position") if a != attribute]
    templates = []
    for combo in itertools.product(*(VALUES[a] for a in others)):
        slots = dict(zip(others, combo), **{attribute: "{}"})
        templates.append(f"a {slots['size']} {slots['colour']} {slots['shape']} {slots['position']}")
    return templates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", default=Path("data/sample"), type=Path)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = p.parse_args()
    with open(args.data / "captions_val.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    truth: dict[str, dict[str, str]] = {}
    for name, caption in rows:
        if caption.startswith("a "):
            truth.setdefault(name, attributes(caption))
    files = sorted(truth)
    device = resolve_device("auto")
    precision = resolve_precision(args.precision, device)
    autocast = autocast_factory(device, precision)
    encoder = load_model(args.model)
    set_attention(encoder.model, "auto", device)
    encoder.model.to(device)
    images, failed = embed_images(encoder, [args.data / "images" / "val" / f for f in files], autocast=autocast)
    if failed:
        raise SystemExit(f"unreadable val images: {failed[:3]}")
    print(f"{len(files)} val images of {args.data}; model {args.model}; {device.type}, {precision}")
    print()
    print(
        "| attribute | classes | chance | top-1, CLIP templates | top-1, caption-form templates | mean per-class recall (caption-form) |"
    )
    print("|---|---|---|---|---|---|")
    for attribute, classes in VALUES.items():
        labels = [classes.index(truth[f][attribute]) for f in files]
        results = []
        for templates in (list(TEMPLATES), caption_templates(attribute)):
            class_emb = class_embeddings(encoder, classes, templates, autocast=autocast)
            results.append(score_zeroshot(attribute, images, class_emb, labels, classes, templates))
        clip, captions = results
        print(
            f"| {attribute} | {len(classes)} | {1 / len(classes):.3f} | {clip.metrics['top1']:.3f} | "
            f"{captions.metrics['top1']:.3f} ({len(captions.templates)} prompts per class) | "
            f"{captions.metrics['mean_per_class_recall']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
