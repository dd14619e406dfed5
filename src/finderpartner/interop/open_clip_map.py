"""What corresponds to what between open_clip's ``CLIP`` and transformers' ``CLIPModel`` (used by ``convert``).

Both implement OpenAI's CLIP: a ViT image tower (patch convolution without bias, class token, learned positions, a
LayerNorm before the blocks and one on the class token after them, a linear projection) and a causal text
transformer read at its end-of-text token. Pure functions of configs and state dicts, no files:

* weights: ``weight_rules``, one rule per tensor (copied, transposed, or open_clip's packed q/k/v split in three),
  applied in either direction (``to_hf_weights``, ``to_open_clip_weights``), so a round trip gives the same bits;
* configs: ``hf_config`` / ``open_clip_config``, and ``check_open_clip_config``, which refuses what ``CLIPModel``
  cannot hold (timm or ResNet image towers, HF text towers, attentional pooling, layer scale, ...) naming the key;
* text pooling: open_clip's ``argmax`` (the highest token id: OpenAI's end-of-text) or ``eos`` (the first
  ``eos_id``) become the ``eos_token_id`` transformers pools at (2 means argmax there), and back;
* preprocessing: open_clip's ``preprocess_cfg`` (mean, std, interpolation, resize mode) <-> the image processor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..errors import ModelError
from ..model import DualEncoder, plain_model

log = logging.getLogger(__name__)

# transformers' CLIP text model reads eos_token_id 2 as "pool at the highest token id" (its configs before 4.31)
HF_ARGMAX_EOS = 2
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # open_clip interpolation <-> PIL / image processor


# --------------------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class Rule:
    """Where one tensor lives on both sides. ``how``: "copy"; "transpose" (a projection: open_clip computes
    ``x @ P``, transformers a Linear with ``W = P.T``); "qkv" (open_clip's packed ``in_proj`` is transformers'
    q, k and v stacked); "scalar" (``logit_scale``: shape [] in transformers, [] or [1] in open_clip)."""

    open_clip: str
    hf: tuple[str, ...]
    how: str = "copy"


def _pair(open_clip: str, hf: str) -> list[Rule]:
    return [Rule(f"{open_clip}.{p}", (f"{hf}.{p}",)) for p in ("weight", "bias")]


def _block_rules(oc: str, hf: str) -> list[Rule]:
    qkv = [
        Rule(f"{oc}.attn.in_proj_{p}", tuple(f"{hf}.self_attn.{x}_proj.{p}" for x in "qkv"), "qkv")
        for p in ("weight", "bias")
    ]
    pairs = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"))
    pairs += (("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
    return qkv + [rule for a, b in pairs for rule in _pair(f"{oc}.{a}", f"{hf}.{b}")]


def weight_rules(vision_layers: int, text_layers: int, text_prefix: str = "") -> list[Rule]:
    """Every weight of a CLIP with these depths. ``text_prefix``: "text." for open_clip's ``CustomTextCLIP``, whose
    text tower is a submodule (the same tower: ``custom_text``)."""
    v, t = "vision_model", "text_model"
    rules = [
        Rule("visual.class_embedding", (f"{v}.embeddings.class_embedding",)),
        Rule("visual.conv1.weight", (f"{v}.embeddings.patch_embedding.weight",)),
        Rule("visual.positional_embedding", (f"{v}.embeddings.position_embedding.weight",)),
        *_pair("visual.ln_pre", f"{v}.pre_layrnorm"),  # (sic: transformers' spelling)
        *_pair("visual.ln_post", f"{v}.post_layernorm"),
        Rule("visual.proj", ("visual_projection.weight",), "transpose"),
        Rule(f"{text_prefix}token_embedding.weight", (f"{t}.embeddings.token_embedding.weight",)),
        Rule(f"{text_prefix}positional_embedding", (f"{t}.embeddings.position_embedding.weight",)),
        *_pair(f"{text_prefix}ln_final", f"{t}.final_layer_norm"),
        Rule(f"{text_prefix}text_projection", ("text_projection.weight",), "transpose"),
        Rule("logit_scale", ("logit_scale",), "scalar"),
    ]
    for i in range(vision_layers):
        rules += _block_rules(f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}")
    for i in range(text_layers):
        rules += _block_rules(f"{text_prefix}transformer.resblocks.{i}", f"{t}.encoder.layers.{i}")
    return rules


def to_hf_weights(state: Mapping[str, torch.Tensor], rules: Sequence[Rule], source: str) -> dict[str, torch.Tensor]:
    """An open_clip state dict as a ``CLIPModel`` one; a tensor no rule takes is refused (it has no place there)."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = state[rule.open_clip]
        if rule.how == "qkv":
            out.update(zip(rule.hf, tensor.chunk(3, dim=0)))
        elif rule.how == "transpose":
            out[rule.hf[0]] = tensor.t().contiguous()
        else:
            out[rule.hf[0]] = tensor.reshape(()) if rule.how == "scalar" else tensor
    _refuse_leftovers(set(state) - {r.open_clip for r in rules} - {"logit_bias"}, source)
    return out


def to_open_clip_weights(
    state: Mapping[str, torch.Tensor], rules: Sequence[Rule], source: str
) -> dict[str, torch.Tensor]:
    """A ``CLIPModel`` state dict as an open_clip one (the inverse of ``to_hf_weights``, bit for bit)."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        parts = [state[name] for name in rule.hf]
        if rule.how == "qkv":
            out[rule.open_clip] = torch.cat(parts, dim=0)
        elif rule.how == "transpose":
            out[rule.open_clip] = parts[0].t().contiguous()
        else:
            out[rule.open_clip] = parts[0].reshape(()) if rule.how == "scalar" else parts[0]
    taken = {name for rule in rules for name in rule.hf}
    _refuse_leftovers({k for k in state if k not in taken and not k.endswith("position_ids")}, source)
    return out


def _refuse_leftovers(names: set[str], source: str) -> None:
    if names:
        listing = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise ModelError(
            f"{source}: {len(names)} weight(s) have no counterpart on the other side ({listing}); this model's "
            "architecture differs from CLIP's and cannot be converted"
        )


# --------------------------------------------------------------------------------------------------------------
# Configs: what converts, and how


def refuse(where: str, key: str, value: Any, reason: str) -> ModelError:
    return ModelError(
        f"{where}: {key} = {value!r}: {reason}; transformers' CLIPModel cannot represent it, so this model cannot "
        "be converted (use it with open_clip itself)"
    )


# Settings that change the computation and have no CLIPModel counterpart, checked first for a precise message
_VISION_REASONS = {
    "timm_model_name": "a timm image tower; CLIPModel's image tower is its own ViT",
    "attentional_pool": "attentional pooling (CoCa); CLIPModel reads the class token",
    "ls_init_value": "layer scale in every block",
    "no_ln_pre": "no LayerNorm before the blocks",
    "block_type": "custom attention blocks",
    "qk_norm": "LayerNorm on queries and keys",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "learnt per-head attention scales",
    "scale_attn_inner": "a LayerNorm inside attention",
    "scale_attn": "a LayerNorm after attention",
    "scale_fc": "a LayerNorm inside the MLP",
    "act_kwargs": "activation arguments",
}
_TEXT_REASONS = {
    "hf_model_name": "a transformers text tower (BERT, XLM-R, ...); CLIPModel's text tower is CLIP's own transformer",
    "embed_cls": "an appended class token (CoCa)",
    "no_causal_mask": "bidirectional text attention; CLIPModel's text attention is causal",
    "tokenizer_mode": "a custom tokenisation mode",
    **{k: v for k, v in _VISION_REASONS.items() if k not in ("timm_model_name", "attentional_pool", "no_ln_pre")},
    "proj_bias": "a bias in the text projection",
}
# Settings that may differ from open_clip's defaults: mapped here, or training-only, or only read by a tower that is
# refused above (timm_*, hf_*)
_VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout"}
_VISION_FREE |= {"pos_embed_type", "final_ln_after_pool", "output_tokens", "norm_kwargs", "pool_type"}
_VISION_FREE |= {"timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_FREE = {"context_length", "vocab_size", "hf_tokenizer_name", "tokenizer_kwargs", "width", "heads", "layers"}
_TEXT_FREE |= {"mlp_ratio", "pad_id", "eos_id", "final_ln_after_pool", "pool_type", "proj_type", "output_tokens"}
_TEXT_FREE |= {"norm_kwargs", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}
_MODEL_KEYS |= {"nonscalar_logit_scale", "custom_text", "output_dict"}


def check_open_clip_config(cfg: Mapping[str, Any], where: str) -> None:
    """Refuse a model config ``CLIPModel`` cannot represent, naming the first such key."""
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg.get(k), (int, dict))]
    if missing:
        raise ModelError(f"{where}: not an open_clip model config (no {', '.join(missing)}); give a CLIP model config")
    if "multimodal_cfg" in cfg:
        raise refuse(where, "multimodal_cfg", "...", "a CoCa model (an image-conditioned text decoder)")
    unknown = sorted(set(cfg) - _MODEL_KEYS)
    if unknown:
        raise refuse(where, unknown[0], cfg[unknown[0]], "a setting of another model class")
    vision, text = _vision_cfg(cfg, where), _text_cfg(cfg, where)
    for prefix, settings, reasons, free in (
        ("vision_cfg", vision, _VISION_REASONS, _VISION_FREE),
        ("text_cfg", text, _TEXT_REASONS, _TEXT_FREE),
    ):
        defaults = type(settings)()
        for key, reason in reasons.items():
            if getattr(settings, key, None) != getattr(defaults, key, None):
                raise refuse(where, f"{prefix}.{key}", getattr(settings, key), reason)
        for field in fields(settings):
            value = getattr(settings, field.name)
            if field.name not in free and value != getattr(defaults, field.name):
                raise refuse(where, f"{prefix}.{field.name}", value, "a setting this converter does not know")
        norm = settings.norm_kwargs or {}
        if set(norm) - {"eps"}:
            raise refuse(where, f"{prefix}.norm_kwargs", norm, "LayerNorm arguments other than eps")
    if isinstance(vision.layers, (list, tuple)):
        raise refuse(where, "vision_cfg.layers", vision.layers, "a ResNet image tower; CLIPModel's is a ViT")
    for key in ("image_size", "patch_size"):
        value = getattr(vision, key)
        if isinstance(value, (list, tuple)) and len(set(value)) > 1:
            raise refuse(where, f"vision_cfg.{key}", value, "a non-square size; CLIPModel's are square")
    if vision.pool_type != "tok":
        raise refuse(where, "vision_cfg.pool_type", vision.pool_type, "CLIPModel pools the class token ('tok')")
    if text.pool_type not in ("argmax", "eos"):
        raise refuse(where, "text_cfg.pool_type", text.pool_type, "CLIPModel pools at the end-of-text token")
    if text.pool_type == "eos" and text.eos_id == HF_ARGMAX_EOS:
        raise refuse(where, "text_cfg.eos_id", text.eos_id, "transformers reads eos_token_id 2 as argmax pooling")
    if text.proj_type != "linear":
        raise refuse(where, "text_cfg.proj_type", text.proj_type, "CLIPModel has a linear text projection")
    kwargs = dict(text.tokenizer_kwargs or {})
    clean = kwargs.pop("clean", "whitespace" if text.hf_tokenizer_name else "lower")
    if kwargs or clean != ("whitespace" if text.hf_tokenizer_name else "lower"):
        raise refuse(
            where,
            "text_cfg.tokenizer_kwargs",
            text.tokenizer_kwargs,
            "open_clip changes the text before tokenising (clean, reduction, ...) in a way a transformers "
            "tokenizer cannot, so the converted model would tokenise differently",
        )


def _vision_cfg(cfg: Mapping[str, Any], where: str) -> Any:
    from open_clip.model import CLIPVisionCfg

    return _dataclass(CLIPVisionCfg, cfg["vision_cfg"], f"{where}: vision_cfg")


def _text_cfg(cfg: Mapping[str, Any], where: str) -> Any:
    from open_clip.model import CLIPTextCfg

    return _dataclass(CLIPTextCfg, cfg["text_cfg"], f"{where}: text_cfg")


def _dataclass(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ModelError(f"{where} must be a mapping of settings, got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ModelError(f"{where}: {unknown[0]!r} is not an open_clip setting (this open_clip does not know it)")
    return cls(**values)


def _side(value: int | Sequence[int]) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _eps(settings: Any) -> float:
    return float((settings.norm_kwargs or {}).get("eps", 1e-5))  # torch's LayerNorm default, as open_clip's


def hf_config(cfg: Mapping[str, Any], tokenizer: Any, where: str) -> Any:
    """The ``CLIPConfig`` of an open_clip model config (checked by ``check_open_clip_config``)."""
    from transformers import CLIPConfig

    vision, text = _vision_cfg(cfg, where), _text_cfg(cfg, where)
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"  # open_clip's nn.GELU is the exact (erf) GELU
    embed_dim = int(cfg["embed_dim"])
    return CLIPConfig(
        text_config=dict(
            vocab_size=text.vocab_size,
            hidden_size=text.width,
            intermediate_size=int(text.width * text.mlp_ratio),
            num_hidden_layers=text.layers,
            num_attention_heads=text.heads,
            max_position_embeddings=text.context_length,
            hidden_act=act,
            layer_norm_eps=_eps(text),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=_hf_eos(text, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=embed_dim,
        ),
        vision_config=dict(
            image_size=_side(vision.image_size),
            patch_size=_side(vision.patch_size),
            hidden_size=vision.width,
            intermediate_size=int(vision.width * vision.mlp_ratio),
            num_hidden_layers=vision.layers,
            num_attention_heads=vision.width // vision.head_width,
            hidden_act=act,
            layer_norm_eps=_eps(vision),
            projection_dim=embed_dim,
        ),
        projection_dim=embed_dim,
    )


def _hf_eos(text: Any, tokenizer: Any) -> int:
    """The eos_token_id at which transformers pools where open_clip does.

    'eos': the first ``eos_id``. 'argmax': the highest id; that is the first eos when eos is the tokenizer's highest
    id (OpenAI's <|endoftext|>, 49407), otherwise transformers' own argmax pooling (eos_token_id 2).
    """
    if text.pool_type == "eos":
        return int(text.eos_id)
    eos = tokenizer.eos_token_id
    highest = max(tokenizer.get_vocab().values())
    return int(eos) if eos is not None and eos == highest and eos != HF_ARGMAX_EOS else HF_ARGMAX_EOS


def open_clip_config(encoder: DualEncoder, tokenizer_name: str, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` of open_clip for a ``CLIPModel`` (refusing what open_clip cannot build)."""
    from transformers import CLIPModel

    model = plain_model(encoder.model)
    if not isinstance(model, CLIPModel):
        raise ModelError(
            f"{where} is a {type(model).__name__} (e.g. model.name: towers, a pretrained text tower); open_clip's "
            "CLIP has CLIP's own text transformer only, so only CLIPModel folders convert"
        )
    v, t = model.config.vision_config, model.config.text_config
    acts = {v.hidden_act, t.hidden_act}
    if len(acts) > 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ModelError(
            f"{where}: text_config.hidden_act {t.hidden_act!r} and vision_config.hidden_act {v.hidden_act!r}: "
            "open_clip uses one activation for both towers, quick_gelu or gelu; this model cannot be converted"
        )
    if getattr(v, "num_channels", 3) != 3:
        raise ModelError(f"{where}: vision_config.num_channels {v.num_channels}: open_clip's ViT reads RGB (3)")
    spec = encoder.image_spec
    if not spec.resize == spec.crop == v.image_size:
        raise ModelError(
            f"{where}: the image processor resizes to {spec.resize} and crops {spec.crop} for a {v.image_size}-pixel "
            "model; open_clip resizes and crops to the model's size: set preprocessor_config.json's size and "
            "crop_size to it, or keep this model in transformers"
        )
    resample = {code: name for name, code in RESAMPLE.items()}.get(int(getattr(encoder.image_processor, "resample", 3)))
    if resample is None:
        raise ModelError(
            f"{where}: the image processor's resample {encoder.image_processor.resample} has no open_clip name"
        )
    vision_cfg = {
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "width": v.hidden_size,
        "layers": v.num_hidden_layers,
        "head_width": v.hidden_size // v.num_attention_heads,
        "mlp_ratio": mlp_ratio(v.hidden_size, v.intermediate_size, f"{where}: vision_config"),
    }
    eos = t.eos_token_id
    pooling = {"pool_type": "argmax"} if eos == HF_ARGMAX_EOS else {"pool_type": "eos", "eos_id": int(eos)}
    text_cfg = {
        "context_length": encoder.context_length,
        "vocab_size": t.vocab_size,
        "width": t.hidden_size,
        "heads": t.num_attention_heads,
        "layers": t.num_hidden_layers,
        "mlp_ratio": mlp_ratio(t.hidden_size, t.intermediate_size, f"{where}: text_config"),
        **pooling,
        "hf_tokenizer_name": tokenizer_name,
    }
    for settings, hf in ((vision_cfg, v), (text_cfg, t)):
        if float(hf.layer_norm_eps) != 1e-5:
            settings["norm_kwargs"] = {"eps": float(hf.layer_norm_eps)}
    model_cfg: dict[str, Any] = {
        "embed_dim": int(model.config.projection_dim),
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    if encoder.logit_bias is not None:  # SigLIP's bias: open_clip's CLIP carries it as logit_bias
        model_cfg["init_logit_bias"] = encoder.logit_bias
    preprocess_cfg = {
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": resample,
        "resize_mode": "shortest",
    }
    return model_cfg, preprocess_cfg


def mlp_ratio(width: int, intermediate: int, where: str) -> float:
    """The ``mlp_ratio`` from which open_clip rebuilds this MLP width: it computes ``int(width * mlp_ratio)``, and
    ``intermediate / width`` rounded down in floating point would lose one (1664 wide, 7680 inner, for one)."""
    ratio = intermediate / width
    if int(width * ratio) != intermediate:
        ratio = math.nextafter(ratio, math.inf)
    if int(width * ratio) != intermediate:
        raise ModelError(f"{where}: intermediate_size {intermediate} is not a ratio of {width} open_clip can rebuild")
    return ratio


def open_clip_preprocess(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A model's inference preprocessing as open_clip builds it: its defaults, the given values, the model's size."""
    from open_clip.transform import PreprocessCfg

    known = {f.name for f in fields(PreprocessCfg)}
    size = _vision_cfg(model_cfg, where).image_size
    return {**asdict(PreprocessCfg()), **{k: v for k, v in preprocess_cfg.items() if k in known}, "size": size}


def hf_image_processor(preprocess: Mapping[str, Any], where: str) -> Any:
    """The ``CLIPImageProcessor`` of open_clip's preprocessing (resize the shortest edge, centre crop, normalise)."""
    from transformers import CLIPImageProcessor

    if preprocess["resize_mode"] != "shortest":
        raise ModelError(
            f"{where}: preprocess_cfg.resize_mode = {preprocess['resize_mode']!r}: this project's preprocessing (and the "
            "transformers image processor it writes) resizes the shortest edge and centre-crops; set resize_mode to "
            "'shortest' in the model config JSON if you accept that non-square images are then cropped"
        )
    if preprocess["interpolation"] not in RESAMPLE:
        raise ModelError(
            f"{where}: preprocess_cfg.interpolation {preprocess['interpolation']!r}: use bicubic, bilinear or nearest"
        )
    if preprocess["interpolation"] != "bicubic":
        log.warning(
            "%s resizes images %s; finderpartner's own preprocessing resizes bicubic",
            where,
            preprocess["interpolation"],
        )
    size = _side(preprocess["size"])
    if len(preprocess["mean"]) != 3 or len(preprocess["std"]) != 3:
        raise ModelError(f"{where}: preprocess_cfg mean and std need three values (RGB)")
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=RESAMPLE[preprocess["interpolation"]],
        image_mean=[float(x) for x in preprocess["mean"]],
        image_std=[float(x) for x in preprocess["std"]],
    )
