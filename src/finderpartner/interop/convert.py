"""``finderpartner convert``: open_clip checkpoints <-> transformers ``CLIPModel`` folders, both ways.

``open_clip_map`` says what corresponds to what; this module reads the source (an open_clip model name, config
JSON or folder with its weights; or a saved model folder), carries the tokenizer across, writes the result
(``outputs`` rules: claimed, atomic) and verifies it first: the source and the result, each loaded by its own
library as a user would load it, embed the same images and texts (``verify``); if they differ, nothing is written.

The tokenizer travels as a transformers ``tokenizer.json`` in both folders (open_clip reads it through
``text_cfg.hf_tokenizer_name``); open_clip's own BPE (``SimpleTokenizer``) becomes the equivalent transformers CLIP
tokenizer. open_clip cleans text before tokenising (ftfy, html.unescape) and transformers does not: ids are equal
for every text that cleaning leaves unchanged (the usage printed says what to do for the rest).
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .. import __version__
from ..env import in_hf_cache
from ..errors import FinderPartnerError, ModelError, UsageError
from ..model import DualEncoder, load_model, pickle_refused, plain_model, save_model, write_vocab_files
from ..outputs import claim_output, storage_errors, write_output, write_text_atomic
from ..tokenizer import openai_clip_tokenizer
from .open_clip_map import (
    check_open_clip_config,
    hf_config,
    hf_image_processor,
    open_clip_config,
    open_clip_preprocess,
    refuse,
    to_hf_weights,
    to_open_clip_weights,
    weight_rules,
)

log = logging.getLogger(__name__)

TO_HF, TO_OPEN_CLIP = "hf", "open_clip"
CONVERT_KIND = "convert"
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
OPEN_CLIP_MIN_VERSION = (3, 1)  # 3.0: 'local-dir:' folders; 3.1: text pool_type 'eos' (any tokenizer's eos)
VERIFY_MIN_COSINE = 0.9999
# The weight files open_clip's 'local-dir:' looks for, in its order of preference
_WEIGHT_NAMES = (
    OPEN_CLIP_WEIGHTS,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
# Texts the verification tokenises and embeds: words, case, punctuation, digits, accents, other scripts, emoji,
# repeated whitespace, and one longer than any context (truncation). open_clip's text cleaning leaves them as they are.
VERIFY_TEXTS = (
    "a photo of a dog",
    "Two RED cars, parked next to a tall building...",
    "x",
    "numbers 123 and 4.5; punctuation!?",
    "café naïve façade Ωmega 🦓 控制",
    "it's we'll they're",
    "tab\tand  double   spaces",
    " ".join(["a long caption"] * 40),
)


def open_clip_module() -> Any:
    """open_clip, new enough for the folders this module writes; or say how to install it."""
    try:
        import open_clip
    except ImportError:
        raise FinderPartnerError(
            "finderpartner convert needs open_clip: pip install 'finderpartner[open_clip]'"
        ) from None
    version = tuple(int(n) for n in re.findall(r"\d+", open_clip.__version__)[:2])
    if version < OPEN_CLIP_MIN_VERSION:
        raise FinderPartnerError(
            f"finderpartner convert needs open_clip >= {'.'.join(map(str, OPEN_CLIP_MIN_VERSION))} (installed: "
            f"{open_clip.__version__}): pip install -U 'finderpartner[open_clip]'"
        )
    return open_clip


# --------------------------------------------------------------------------------------------------------------
# The open_clip side: reading a source


@dataclass
class OpenClipSource:
    """An open_clip model as given: its config, preprocessing, weights file, and the folder it came in (if any)."""

    name: str  # for messages: the model name, config file or folder
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    checkpoint: Path
    folder: Path | None = None


def read_open_clip_source(model: str, checkpoint: Path | None) -> OpenClipSource:
    """``--model`` of ``convert --to hf``: an open_clip folder, a model config JSON, or an open_clip model name."""
    oc = open_clip_module()
    if model.startswith("hf-hub:"):
        raise ModelError(
            f"{model}: convert works offline; download the repository (huggingface-cli download "
            f"{model[len('hf-hub:') :]}) and pass its folder as --model"
        )
    path = Path(model.removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        config_file = path / OPEN_CLIP_CONFIG
        if not config_file.is_file():
            hint = (
                "; it is a transformers folder: convert it with --to open_clip"
                if (path / "config.json").is_file()
                else ""
            )
            raise ModelError(f"{path} has no {OPEN_CLIP_CONFIG}, so it is not an open_clip folder{hint}")
        data = _read_json(config_file)
        if not isinstance(data.get("model_cfg"), dict):
            raise ModelError(f"{config_file} has no model_cfg mapping; it is not an open_clip model folder config")
        weights = checkpoint or _weights_in(path)
        return OpenClipSource(str(path), data["model_cfg"], dict(data.get("preprocess_cfg") or {}), weights, path)
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise ModelError(f"model config {path} does not exist; fix the path")
        if path.suffix.lower() != ".json":
            raise ModelError(
                f"--model {path} is a file but not a model config (.json); give the config, and the weights as --checkpoint"
            )
        data = _read_json(path)
        # the hub's open_clip_config.json {model_cfg, preprocess_cfg}, or a bare model config
        wrapped = isinstance(data.get("model_cfg"), dict)
        cfg = data["model_cfg"] if wrapped else data
        preprocess = dict(data.get("preprocess_cfg") or {}) if wrapped else {}
        return OpenClipSource(str(path), cfg, preprocess, _required_checkpoint(checkpoint, model))
    cfg = oc.get_model_config(model)
    if cfg is None:
        raise ModelError(
            f"--model {model} is not a folder, a model config (.json) or an open_clip model name "
            f"(open_clip knows {len(oc.list_models())}, e.g. ViT-B-32, ViT-B-16-quickgelu: open_clip.list_models())"
        )
    if "siglip" in model.lower() and not cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        raise refuse(model, "model name", model, "open_clip gives SigLIP names their own tokenizer")
    return OpenClipSource(model, cfg, {}, _required_checkpoint(checkpoint, model))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path} as JSON ({_brief(e)}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a {type(data).__name__}, not a model config mapping")
    return data


def _required_checkpoint(checkpoint: Path | None, model: str) -> Path:
    if checkpoint is None:
        raise UsageError(f"--model {model} is a model config: give its weights as --checkpoint FILE")
    return checkpoint


def _weights_in(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for ext in ("*.safetensors", "*.bin", "*.pth", "*.pt") for p in folder.glob(ext))
    if len(found) == 1:
        return folder / found[0]
    what = f"several ({', '.join(found)})" if found else "none"
    raise ModelError(
        f"{folder}: expected one open_clip weights file ({OPEN_CLIP_WEIGHTS}), found {what}; name it with --checkpoint"
    )


def _brief(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def build_open_clip(source: OpenClipSource, *, trust_pickle: bool) -> nn.Module:
    """open_clip's model for the source's config, with its weights loaded (strictly), in eval mode."""
    oc = open_clip_module()
    cfg = copy.deepcopy(source.model_cfg)
    model_class = oc.CustomTextCLIP if cfg.pop("custom_text", False) else oc.CLIP
    try:
        model = model_class(**cfg)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise ModelError(f"{source.name}: open_clip cannot build this model config ({_brief(e)})") from None
    path = source.checkpoint
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; fix the path")
    if path.suffix.lower() != ".safetensors" and not trust_pickle:
        raise ModelError(
            f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; refused. If you trust where it "
            "comes from, pass --trust-pickle (it is then read with torch's weights-only loader), or use the "
            "safetensors weights (open_clip_model.safetensors on the hub)"
        )
    from safetensors import SafetensorError

    try:
        oc.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except pickle.UnpicklingError as e:  # code (or other objects) in a pickle: refused even with --trust-pickle
        raise pickle_refused(path, e) from None
    except (RuntimeError, SafetensorError, OSError, KeyError, ValueError, EOFError) as e:
        raise ModelError(
            f"{path}: these weights do not load into the model config {source.name} ({_brief(e)}); give the config "
            "the checkpoint was trained with"
        ) from None
    return model.eval()


def open_clip_tokenizers(source: OpenClipSource) -> tuple[Callable[[list[str]], torch.Tensor], Any, str]:
    """``(open_clip's tokenizer, the transformers tokenizer giving the same ids, its description)``.

    As ``open_clip.get_tokenizer``: ``text_cfg.hf_tokenizer_name`` names a transformers tokenizer (read from the
    model's folder when it came in one, as 'local-dir:' does); without it, OpenAI's BPE (``SimpleTokenizer``).
    """
    oc = open_clip_module()
    text = source.model_cfg["text_cfg"]
    context = int(text.get("context_length", 77))
    name = text.get("hf_tokenizer_name")
    if not name:
        simple = oc.tokenizer.SimpleTokenizer(context_length=context)
        hf = openai_clip_tokenizer(context)  # the same vocabulary and merges
        return simple, hf, "OpenAI CLIP's BPE (open_clip's SimpleTokenizer), as a transformers CLIPTokenizer"
    where = str(source.folder) if source.folder is not None else str(name)
    local = Path(where).is_dir() or in_hf_cache(where)
    try:
        tokenizer = oc.tokenizer.HFTokenizer(where, context_length=context, local_files_only=local)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load the tokenizer {where} (text_cfg.hf_tokenizer_name) ({_brief(e)}); download it where there is "
            f"internet (huggingface-cli download {name}) or put its files beside the model"
        ) from None
    tokenizer.tokenizer.model_max_length = context
    return tokenizer, tokenizer.tokenizer, f"the transformers tokenizer of {where} (text_cfg.hf_tokenizer_name)"


# --------------------------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class Verification:
    """Source and converted model on the same inputs: the lowest cosine between their embeddings of each kind, and
    for how many texts the token ids were equal."""

    images: int
    texts: int
    image_cosine: float
    text_cosine: float
    same_tokens: int

    @property
    def ok(self) -> bool:
        return min(self.image_cosine, self.text_cosine) >= VERIFY_MIN_COSINE and self.same_tokens == self.texts

    def __str__(self) -> str:
        return (
            f"verified on {self.images} images and {self.texts} texts: lowest cosine {self.image_cosine:.7f} (images), "
            f"{self.text_cosine:.7f} (texts); token ids equal for {self.same_tokens}/{self.texts} texts"
        )


def verification_images(size: int) -> list[Image.Image]:
    """Deterministic test images: noise and gradients at the model's size, and one at twice it (both libraries
    downscale it with PIL's bicubic, so their pixels agree)."""
    g = torch.Generator().manual_seed(0)
    images = []
    for i, side in enumerate((size, size, size, 2 * size)):
        noise = torch.randint(0, 256, (side, side, 3), generator=g).float()
        ramp = torch.linspace(0, 255, side).view(1, side, 1).expand(side, side, 3)
        pixels = noise if i % 2 == 0 else (noise + ramp.transpose(0, 1) * i) / (1 + i)
        images.append(Image.fromarray(pixels.round().clamp(0, 255).to(torch.uint8).numpy(), "RGB"))
    return images


@torch.no_grad()
def verify(
    encoder: DualEncoder,
    oc_model: nn.Module,
    oc_preprocess: Callable[[Image.Image], torch.Tensor],
    oc_tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str] = VERIFY_TEXTS,
) -> Verification:
    """Embed the same images (each library preprocessing them its own way) and texts (each tokenising its own way)."""
    images = verification_images(encoder.image_spec.crop)
    ours_images = encoder.encode_images(images).float()
    ours_texts = encoder.encode_texts(list(texts)).float()
    theirs_images = F.normalize(
        oc_model.encode_image(torch.stack([oc_preprocess(im) for im in images])).float(), dim=-1
    )
    ids = oc_tokenizer(list(texts))
    theirs_texts = F.normalize(oc_model.encode_text(ids).float(), dim=-1)
    tokens = encoder.tokenize(list(texts))
    lengths = tokens["attention_mask"].sum(1).tolist()
    same = sum(ids[i, :n].tolist() == tokens["input_ids"][i, :n].tolist() for i, n in enumerate(lengths))
    return Verification(
        images=len(images),
        texts=len(texts),
        image_cosine=float((ours_images * theirs_images).sum(-1).min()),
        text_cosine=float((ours_texts * theirs_texts).sum(-1).min()),
        same_tokens=int(same),
    )


# --------------------------------------------------------------------------------------------------------------
# The two directions


@dataclass
class Converted:
    out: Path
    to: str
    verification: Verification
    usage: str  # how to load the result, and how its tokenizer relates to the source's


def convert(
    to: str,
    model: str,
    out: Path,
    *,
    checkpoint: Path | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
) -> Converted:
    """Convert ``model`` into ``out`` (``to``: "hf" or "open_clip"), verified before the folder is written.

    The folder follows ``outputs.claim_output``: new, empty, or an earlier conversion (of other inputs only with
    ``overwrite``); written atomically.
    """
    if to not in (TO_HF, TO_OPEN_CLIP):
        raise UsageError(f"--to {to!r}: choose {TO_HF} or {TO_OPEN_CLIP}")
    if to == TO_OPEN_CLIP and checkpoint is not None:
        raise UsageError("--checkpoint names open_clip weights for --to hf; --to open_clip reads the --model folder")
    model_path = Path(model.removeprefix("local-dir:")).expanduser()
    inputs = {"to": to, "model": model_path if model_path.exists() else model, "checkpoint": checkpoint}
    if to == TO_OPEN_CLIP and (model_path / OPEN_CLIP_CONFIG).is_file() and not (model_path / "config.json").is_file():
        raise ModelError(
            f"--model {model} is an open_clip folder already ({OPEN_CLIP_CONFIG}); to convert it to a transformers "
            "CLIPModel folder use --to hf"
        )
    claim_output(out, CONVERT_KIND, inputs, overwrite=overwrite)  # before anything is loaded
    if to == TO_HF:
        return _to_hf(model, checkpoint, out, inputs, trust_pickle=trust_pickle)
    return _to_open_clip(model, out, inputs, trust_pickle=trust_pickle)


def _to_hf(model: str, checkpoint: Path | None, out: Path, inputs: dict[str, Any], *, trust_pickle: bool) -> Converted:
    from transformers import CLIPModel

    source = read_open_clip_source(model, checkpoint)
    check_open_clip_config(source.model_cfg, source.name)
    preprocess = open_clip_preprocess(source.model_cfg, source.preprocess_cfg, source.name)
    processor = hf_image_processor(preprocess, source.name)
    oc_tokenizer, tokenizer, described = open_clip_tokenizers(source)
    config = hf_config(source.model_cfg, tokenizer, source.name)
    if max(tokenizer.get_vocab().values()) >= config.text_config.vocab_size:
        raise ModelError(
            f"{source.name}: the tokenizer ({described}) has ids up to {max(tokenizer.get_vocab().values())}, "
            f"beyond text_cfg.vocab_size {config.text_config.vocab_size}; the config does not belong to this tokenizer"
        )
    oc_model = build_open_clip(source, trust_pickle=trust_pickle)
    text_prefix = "text." if source.model_cfg.get("custom_text") else ""
    rules = weight_rules(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers, text_prefix)
    state = oc_model.state_dict()
    hf_model = CLIPModel(config).eval()
    hf_model.load_state_dict(to_hf_weights(state, rules, source.name), strict=True)
    encoder = DualEncoder(hf_model, tokenizer, processor)
    if "logit_bias" in state:  # a sigmoid-loss (SigLIP) model: its bias is kept as this project keeps SigLIP's
        scale, bias = float(state["logit_scale"].reshape(())), float(state["logit_bias"].reshape(()))
        encoder.record_objective({"loss": "siglip", "logit_scale": scale, "logit_bias": bias})
    from open_clip.transform import PreprocessCfg, image_transform_v2

    oc_transform = image_transform_v2(PreprocessCfg(**preprocess), is_train=False)
    usage = _hf_usage(out, described)
    checkpoint_name = source.checkpoint.name

    def write(tmp: Path) -> Verification:
        save_model(encoder, tmp, card=_hf_card(source.name, checkpoint_name, usage))
        return verify(load_model(tmp), oc_model, oc_transform, oc_tokenizer)

    verified = _write_verified(write, out, inputs, what=f"converted model folder {out}")
    return Converted(out, TO_HF, verified, usage)


def _to_open_clip(model: str, out: Path, inputs: dict[str, Any], *, trust_pickle: bool) -> Converted:
    oc = open_clip_module()
    encoder = load_model(model, trust_pickle=trust_pickle)
    # open_clip's get_tokenizer reads the tokenizer from a 'local-dir:' folder; the name is for everything else
    model_cfg, preprocess_cfg = open_clip_config(encoder, str(out.resolve()), model)
    hf_model = plain_model(encoder.model)
    config = hf_model.config
    rules = weight_rules(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers)
    state = to_open_clip_weights(hf_model.state_dict(), rules, model)
    context = model_cfg["text_cfg"]["context_length"]
    state["positional_embedding"] = state["positional_embedding"][:context]  # the positions its tokenizer reaches
    if "init_logit_bias" in model_cfg:
        state["logit_bias"] = torch.tensor(float(model_cfg["init_logit_bias"]))
    state = {k: v.detach().contiguous() for k, v in state.items()}
    usage = _open_clip_usage(out, model_cfg)

    def write(tmp: Path) -> Verification:
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        with storage_errors(tmp / OPEN_CLIP_WEIGHTS, f"the open_clip weights in {out}"):
            save_file(state, str(tmp / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
        config_text = json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
        write_text_atomic(tmp / OPEN_CLIP_CONFIG, config_text)
        encoder.tokenizer.save_pretrained(tmp)
        write_vocab_files(encoder.tokenizer, tmp)
        write_text_atomic(tmp / "README.md", _open_clip_card(model, usage))
        oc_model, _, oc_transform = oc.create_model_and_transforms(f"local-dir:{tmp}")
        return verify(encoder, oc_model.eval(), oc_transform, oc.get_tokenizer(f"local-dir:{tmp}"))

    verified = _write_verified(write, out, inputs, what=f"open_clip model folder {out}")
    return Converted(out, TO_OPEN_CLIP, verified, usage)


def _write_verified(
    write: Callable[[Path], Verification], out: Path, inputs: dict[str, Any], *, what: str
) -> Verification:
    """Put ``out`` in place only once ``write`` filled its temporary folder and the verification it returns passed."""
    verified: list[Verification] = []

    def checked(tmp: Path) -> None:
        result = write(tmp)
        if not result.ok:
            raise ModelError(
                f"the converted model does not reproduce its source ({result}; needed: cosine >= "
                f"{VERIFY_MIN_COSINE} and every text's ids); nothing was written. This architecture differs in a way "
                "the converter does not detect: please report it with the model config"
            )
        verified.append(result)

    stamp = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "finderpartner": __version__}
    write_output(checked, out, CONVERT_KIND, inputs, what=what, **stamp)
    return verified[0]


# --------------------------------------------------------------------------------------------------------------
# What the user is told (printed, and the folder's README.md)

_CLEANING = (
    "open_clip cleans text before tokenising (ftfy.fix_text, html.unescape, whitespace) and a transformers "
    "tokenizer does not"
)


def _hf_usage(out: Path, tokenizer: str) -> str:
    return "\n".join(
        [
            f"use it: finderpartner eval/search/index/export/demo --model {out}",
            f'   or:  transformers.CLIPModel.from_pretrained("{out}"), CLIPProcessor.from_pretrained("{out}")',
            f"tokenizer: {tokenizer}. It gives the open_clip tokenizer's ids for every text that "
            f"open_clip's cleaning leaves unchanged ({_CLEANING}); for text with HTML entities, curly quotes, "
            "full-width or ligature characters, clean it first: open_clip.tokenizer.basic_clean(text).",
        ]
    )


def _open_clip_usage(out: Path, model_cfg: Mapping[str, Any]) -> str:
    text = model_cfg["text_cfg"]
    version = "3.1" if text["pool_type"] == "eos" else "3.0"
    return "\n".join(
        [
            f"use it (open_clip >= {version}):",
            f'   model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")',
            f'   tokenizer = open_clip.get_tokenizer("local-dir:{out}")',
            f"tokenizer: the source model's own (tokenizer.json in {out}, named by text_cfg.hf_tokenizer_name). "
            f"get_tokenizer gives the source's ids for every text that its cleaning leaves unchanged ({_CLEANING}); "
            "for exactly the source's ids on any text: tokenizer.tokenizer(texts, padding='max_length', "
            f"max_length={text['context_length']}, truncation=True, return_tensors='pt').input_ids",
        ]
    )


def _hf_card(source: str, checkpoint: str, usage: str) -> str:
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: zero-shot-image-classification",
            "tags: [clip, finderpartner, open_clip]",
            "---",
            "# CLIP converted from open_clip",
            "",
            f"Converted by FinderPartner {__version__} (`finderpartner convert --to hf`) from the open_clip model "
            f"`{source}` with the weights `{checkpoint}`, and verified against open_clip on the same images and texts.",
            "",
            "```",
            usage,
            "```",
            "",
        ]
    )


def _open_clip_card(source: str, usage: str) -> str:
    return "\n".join(
        [
            "---",
            "library_name: open_clip",
            "tags: [clip, finderpartner]",
            "---",
            "# CLIP converted to open_clip",
            "",
            f"Converted by FinderPartner {__version__} (`finderpartner convert --to open_clip`) from the transformers "
            f"model `{source}`, and verified against it on the same images and texts.",
            "",
            "```",
            usage,
            "```",
            "",
        ]
    )
