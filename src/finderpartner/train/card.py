"""The model card (README.md of best_model/): what was trained, on what, how well, and how to use it."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from typing import Any

import torch

from .. import __version__
from ..config import Config
from ..evaluate import EvalResult, format_change, format_metrics
from ..model import (
    ARCH_KIND,
    TINY_KIND,
    base_model_names,
)


@dataclass(frozen=True)
class CardFacts:
    """What the card says about a run, read off it once (``recipe.card_facts``): the card sees nothing else."""

    cfg: Config  # names, data, seed, card.license and card.data
    kind: str  # DualEncoder.kind: tiny and architecture runs are trained from scratch
    model_class: str  # CLIPModel, or VisionTextDualEncoderModel (towers)
    mean_pooling: bool  # the text tower's tokens are averaged (config.json text_pooling: mean)
    vocabulary: int  # tokens in the tokenizer
    context_length: int
    step: int
    epoch: int
    global_batch: int
    precision: str
    train_pairs: int  # pairs per epoch
    samples_seen: int
    objective: dict[str, Any] | None  # the SigLIP record (loss, logit_scale, logit_bias), None for CLIP
    before: dict[str, float] | None  # validation figures before the first step (fine-tuning)
    after: dict[str, float]  # of the latest validation

    @property
    def from_scratch(self) -> bool:
        return self.kind in (TINY_KIND, ARCH_KIND)


def versions() -> dict[str, str]:
    """The versions a checkpoint records."""
    import transformers

    return {
        "finderpartner": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def model_card(facts: CardFacts, result: EvalResult | None) -> str:
    """best_model/README.md: a Hugging Face model card (front matter, what was trained, validation, use)."""
    cfg, model_class = facts.cfg, facts.model_class
    processor_class = "CLIPProcessor" if model_class == "CLIPModel" else "VisionTextDualEncoderProcessor"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        f"license: {cfg.card.license}",
        "tags: [clip, finderpartner]",
        "---",
        f"# {cfg.experiment}",
        "",
        f"CLIP dual encoder {'trained from scratch' if facts.from_scratch else 'fine-tuned'} with "
        f"FinderPartner {__version__} from `{cfg.model.name}` on `{cfg.data.root}`",
        f"(split `{cfg.data.train_split}`), step {facts.step}, epoch {facts.epoch}, contrastive batch "
        f"{facts.global_batch}, precision {facts.precision}, seed {cfg.seed}.",
        "",
    ]
    if result is not None:
        lines += [
            f"## Validation (`{cfg.data.val_split}`, {result.num_images} images, {result.num_captions} captions)",
            "",
            "```",
            format_metrics(result.metrics),
            "```",
            "",
            f"Validation loss {result.loss:.4f} (at contrastive batch {result.loss_batch_size}, the training batch; "
            f"`finderpartner eval` uses it too); mean recall {result.mean_recall:.4f}.",
            "",
        ]
        if facts.before is not None:
            lines += [
                f"### Before -> after fine-tuning (`{cfg.model.name}` before the first step, this model at step "
                f"{facts.step})",
                "",
                "```",
                format_change(facts.before, facts.after),
                "```",
                "",
            ]
    lines += _card_data_and_text(facts)
    lines += [
        "## Use",
        "",
        "```python",
        f"from transformers import {model_class}, {processor_class}",
        f'model = {model_class}.from_pretrained("path/to/best_model")',
        f'processor = {processor_class}.from_pretrained("path/to/best_model")',
        "```",
        "",
    ]
    if facts.mean_pooling:
        lines += [
            "Text embeddings are the mean of the text tower's token outputs (config.json `text_pooling: mean`), then",
            "`text_projection`, not `get_text_features` (which uses the tower's pooler).",
            "",
        ]
    record = facts.objective
    if record is not None:
        lines += [
            "## Scores are sigmoids (SigLIP), not a softmax",
            "",
            f"Trained with the pairwise sigmoid loss (`train.loss: {record['loss']}`): every image-text pair is scored",
            "on its own, `p = sigmoid(exp(logit_scale) * cos + logit_bias)`, independently of the other texts (the",
            "probabilities need not sum to 1). The learnt temperature is the model's `logit_scale` "
            f"({record['logit_scale']:.6g}, exp {math.exp(record['logit_scale']):.6g}); the bias "
            f"({record['logit_bias']:.6g}) is in config.json as `finderpartner_objective.logit_bias`.",
            "",
            "```python",
            "import torch",
            'bias = model.config.finderpartner_objective["logit_bias"]',
            'inputs = processor(text=texts, images=image, return_tensors="pt", padding=True)',
            "logits = model(**inputs).logits_per_image  # exp(logit_scale) * cosine",
            "probs = torch.sigmoid(logits + bias)  # not logits.softmax(-1)",
            "```",
            "",
        ]
    return "\n".join(lines)


def _card_data_and_text(facts: CardFacts) -> list[str]:
    """The card's training data, license and text-input sections."""
    cfg = facts.cfg
    source = f"WebDataset shards `{cfg.data.train_shards}`" if cfg.data.format == "webdataset" else f"`{cfg.data.root}`"
    lines = [
        "## Training data",
        "",
        f"{facts.train_pairs} image-caption pairs per epoch from {source} (split `{cfg.data.train_split}`), "
        f"{facts.samples_seen} pairs seen in training.",
        "",
        cfg.card.data
        or "No description was given (set `card.data` in the config to say what the images and captions "
        "are, where they come from, and under which terms).",
        "",
        "## License",
        "",
        f"`{cfg.card.license}` (`card.license`)."
        if cfg.card.license != "other"
        else "Not stated (`card.license: other`): the terms of the training data"
        + ("" if facts.from_scratch else f" and of the pretrained model ({base_model_names(cfg.model)})")
        + " apply.",
        "",
        "## Text input",
        "",
        f"Texts are truncated to {facts.context_length} tokens (the text tower's context length), start and end "
        "tokens included.",
    ]
    if facts.kind == TINY_KIND:
        lines.append(
            f"The tokenizer is a byte-level BPE of {facts.vocabulary} tokens learnt from the training captions, "
            "not OpenAI CLIP's: words the captions never used are split into pieces the model rarely or never saw, "
            "so write queries in the captions' vocabulary."
        )
    elif facts.kind == ARCH_KIND:
        lines.append("The tokenizer is OpenAI CLIP's byte-level BPE (49,408 tokens).")
    else:
        lines.append(f"The tokenizer is the pretrained text tower's ({base_model_names(cfg.model)}), unchanged.")
    return [*lines, ""]
