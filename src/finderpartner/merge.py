"""Robust fine-tuning by weight-space ensembling (WiSE-FT, Wortsman et al. 2022).

``theta(alpha) = (1 - alpha) * theta_base + alpha * theta_finetuned`` for two dual encoders of one architecture,
usually a zero-shot model and the same model fine-tuned: alpha 0 is the base, 1 the fine-tuned model, and the
values between often keep most of the fine-tuned gain on the new data while losing less of the base's
robustness elsewhere. ``sweep`` evaluates a list of alphas in memory; ``write_merged`` saves merged models.

Floating-point weights (the logit scale too) are interpolated in float32 (float64 when either is) and stored in
the fine-tuned model's dtype; integer and bool buffers (``position_ids``) are copied from the fine-tuned model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .embedding import _stable_config
from .errors import ModelError
from .evaluate import EvalResult, write_eval_report
from .model import DualEncoder, image_spec_of, save_model
from .outputs import atomic_path, claim_output, write_output

log = logging.getLogger(__name__)

MERGE_KIND = "merge"
SWEEP_REPORT = "wise_ft"  # <out>/wise_ft.json and <out>/wise_ft.png


# --------------------------------------------------------------------------------------------------------------
# Compatibility


def alpha_folder(alpha: float) -> str:
    """The model folder of one alpha inside a multi-alpha output: ``alpha_0``, ``alpha_0.25``, ``alpha_1``."""
    return f"alpha_{alpha:g}"


def check_compatible(base: DualEncoder, finetuned: DualEncoder, sources: tuple[str, str] = ("", "")) -> None:
    """Raise ``ModelError`` naming the first difference that makes the two models impossible to merge.

    Checked in this order: the tokenizer (vocabulary, then the rest), the model class, the config (without
    bookkeeping such as paths, versions and dtype), the state_dict's keys and shapes, the image preprocessing.
    ``sources`` (where each model came from) go into the message.
    """
    a, b = "base", "finetuned"
    what = f"cannot merge base {sources[0]} and finetuned {sources[1]}" if all(sources) else "cannot merge the models"
    same_kind = "WiSE-FT needs two models of one architecture (a fine-tuned model and the model it started from)"
    _check_tokenizers(base.tokenizer, finetuned.tokenizer, what)
    if type(base.model) is not type(finetuned.model):
        raise ModelError(
            f"{what}: base is a {type(base.model).__name__}, finetuned a {type(finetuned.model).__name__}; {same_kind}"
        )
    config_a = _stable_config(base.model.config.to_dict())
    diff = first_difference(config_a, _stable_config(finetuned.model.config.to_dict()))
    if diff is not None:
        key, va, vb = diff
        raise ModelError(
            f"{what}: their architectures differ (config {key}: {va!r} in {a}, {vb!r} in {b}); {same_kind}"
        )
    sa, sb = base.model.state_dict(), finetuned.model.state_dict()
    for key in sorted(set(sa) | set(sb)):
        if key not in sb or key not in sa:
            has, lacks = (a, b) if key not in sb else (b, a)
            raise ModelError(f"{what}: {has} has the weight {key} and {lacks} has not; {same_kind}")
        if sa[key].shape != sb[key].shape:
            raise ModelError(
                f"{what}: the weight {key} has shape {tuple(sa[key].shape)} in {a} and {tuple(sb[key].shape)} in "
                f"{b}; {same_kind}"
            )
    spec_a, spec_b = image_spec_of(base.image_processor), image_spec_of(finetuned.image_processor)
    if spec_a != spec_b:
        raise ModelError(
            f"{what}: they preprocess images differently ({spec_a} in {a}, {spec_b} in {b}); use two models saved "
            "with the same image processor"
        )


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first (sorted) dotted key where two nested dicts differ, with both values (``None`` when absent)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return where, a.get(key), b.get(key)
            found = first_difference(a[key], b[key], where)
            if found is not None:
                return found
        return None
    return None if a == b else (prefix or "(top level)", a, b)


def _check_tokenizers(ta: Any, tb: Any, what: str) -> None:
    va, vb = ta.get_vocab(), tb.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb), key=va.get)
        only_b = sorted(set(vb) - set(va), key=vb.get)
        moved = sorted((t for t in set(va) & set(vb) if va[t] != vb[t]), key=va.get)
        example = (
            f"{only_a[0]!r} only in base"
            if only_a
            else f"{only_b[0]!r} only in finetuned"
            if only_b
            else f"{moved[0]!r} is token {va[moved[0]]} in base, {vb[moved[0]]} in finetuned"
        )
        raise ModelError(
            f"{what}: their tokenizers differ (vocabularies of {len(va)} and {len(vb)} tokens; {example}), so one "
            "token id means different text in each. A tiny model learns its tokenizer from its training captions: "
            "two tiny models trained on different data cannot be merged. Merge a fine-tuned model with the model "
            "it started from"
        )
    diff = first_difference(_tokenizer_rules(ta), _tokenizer_rules(tb))
    if diff is not None:
        key, x, y = diff
        raise ModelError(
            f"{what}: their tokenizers have the same vocabulary but differ in {key} ({_short(x)} in base, "
            f"{_short(y)} in finetuned); merge a fine-tuned model with the model it started from"
        )


def _tokenizer_rules(tokenizer: Any) -> dict[str, Any]:
    """What a tokenizer does besides its vocabulary: special tokens, length limit, and (fast ones) the pipeline."""
    rules: dict[str, Any] = {
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "model_max_length": tokenizer.model_max_length,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        for transient in ("truncation", "padding"):  # set per call by transformers, not part of the tokenizer
            pipeline.pop(transient, None)
        rules["pipeline"] = pipeline
    return rules


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Interpolation


def interpolate(
    base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * base + alpha * finetuned`` for every floating-point tensor (computed in float32, or float64
    when either is, and stored in the fine-tuned tensor's dtype); integer and bool tensors are copied from
    ``finetuned``. The key sets must be equal (``check_compatible``)."""
    merged = {}
    for key, b in finetuned.items():
        a = base[key]
        if not b.is_floating_point():
            merged[key] = b.detach().clone()
            continue
        dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        a32, b32 = a.detach().to("cpu", dtype), b.detach().to("cpu", dtype)
        merged[key] = ((1.0 - alpha) * a32 + alpha * b32).to(b.dtype)
    return merged


class Merger:
    """Merged copies of two compatible models, one alpha after another, in one model's memory.

    ``at(alpha)`` returns a ``DualEncoder`` with the fine-tuned model's tokenizer and image processor and the
    interpolated weights; each call reuses (and overwrites) the same model, so keep at most one at a time.
    """

    def __init__(self, base: DualEncoder, finetuned: DualEncoder, sources: tuple[str, str] = ("", "")):
        check_compatible(base, finetuned, sources)
        self._base = {k: v.detach().cpu() for k, v in base.model.state_dict().items()}
        self._finetuned = {k: v.detach().cpu() for k, v in finetuned.model.state_dict().items()}
        self._encoder = DualEncoder(
            copy.deepcopy(finetuned.model).cpu(), finetuned.tokenizer, finetuned.image_processor, kind=finetuned.kind
        )

    @property
    def encoder(self) -> DualEncoder:
        """The merged model of the last ``at`` (its tokenizer and processor are the same for every alpha)."""
        return self._encoder

    def state(self, alpha: float) -> dict[str, torch.Tensor]:
        return interpolate(self._base, self._finetuned, alpha)

    def at(self, alpha: float) -> DualEncoder:
        self._encoder.model.load_state_dict(self.state(alpha))
        return self._encoder


# --------------------------------------------------------------------------------------------------------------
# Writing merged models


def merge_inputs(base: str | Path, finetuned: str | Path, alphas: Sequence[float]) -> dict[str, Any]:
    """The output marker's inputs: the two models (folders as absolute paths, hub ids as given) and the alphas."""
    return {"base": _source(base), "finetuned": _source(finetuned), "alpha": [float(a) for a in alphas]}


def claim_merge_output(
    out: Path, base: str | Path, finetuned: str | Path, alphas: Sequence[float], *, overwrite: bool = False
) -> str:
    """``outputs.claim_output`` for a merge: never an input model or inside one; an earlier merge of the same
    inputs is replaced, one of other inputs only with ``overwrite``, any other folder never."""
    return claim_output(out, MERGE_KIND, merge_inputs(base, finetuned, alphas), overwrite=overwrite)


def write_merged(
    merger: Merger,
    out: Path,
    base: str | Path,
    finetuned: str | Path,
    alphas: Sequence[float],
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Save the merged model of each alpha; returns the model folders.

    One alpha: ``out`` is the model folder. Several: ``out/alpha_<a>/`` each. Every model folder is a plain
    transformers folder (weights, tokenizer, processor) with a model card naming base, fine-tuned model and
    alpha. ``out`` is claimed (``claim_merge_output``) and written atomically, a user's files kept (``outputs.write_output``).
    """
    claim_merge_output(out, base, finetuned, alphas, overwrite=overwrite)
    inputs = merge_inputs(base, finetuned, alphas)
    single = len(alphas) == 1
    folders = [out if single else out / alpha_folder(a) for a in alphas]

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for alpha, folder in zip(alphas, folders):
            where = tmp if single else tmp / folder.name
            save_model(merger.at(alpha), where, card=model_card(inputs["base"], inputs["finetuned"], alpha))
            log.info("alpha %g: merged model written", alpha)

    stamp = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "finderpartner": __version__}
    write_output(write, out, MERGE_KIND, inputs, what=f"merged model folder {out}", **stamp)
    return folders


def model_card(base: str, finetuned: str, alpha: float) -> str:
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: zero-shot-image-classification",
            "tags: [clip, finderpartner, wise-ft]",
            "---",
            f"# WiSE-FT merge, alpha {alpha:g}",
            "",
            f"Weight-space interpolation made by FinderPartner {__version__} (`finderpartner merge`):",
            "`theta = (1 - alpha) * theta_base + alpha * theta_finetuned`.",
            "",
            f"* base: `{base}`",
            f"* finetuned: `{finetuned}`",
            f"* alpha: {alpha:g}" + (" (outside [0, 1]: extrapolated)" if not 0 <= alpha <= 1 else ""),
            "",
            "Integer buffers come from the fine-tuned model; the tokenizer and image processor are the two models'"
            " (identical).",
            "",
            "## Use",
            "",
            "```python",
            "from transformers import CLIPModel, CLIPProcessor",
            'model = CLIPModel.from_pretrained("path/to/this/folder")',
            'processor = CLIPProcessor.from_pretrained("path/to/this/folder")',
            "```",
            "",
        ]
    )


def _source(model: str | Path) -> str:
    return os.path.abspath(model) if Path(model).is_dir() else str(model)


# --------------------------------------------------------------------------------------------------------------
# The alpha sweep


@dataclass
class SweepRow:
    alpha: float
    results: list[EvalResult]  # one per evaluation set, in the order given


def sweep(
    merger: Merger, alphas: Sequence[float], evaluate: Callable[[DualEncoder], list[EvalResult]]
) -> list[SweepRow]:
    """Evaluate the merged model of each alpha (in memory, nothing written) with ``evaluate``."""
    rows = []
    for alpha in alphas:
        rows.append(SweepRow(alpha, evaluate(merger.at(alpha))))
        log.info("alpha %g: %s", alpha, ", ".join(f"mean recall {r.mean_recall:.4f}" for r in rows[-1].results))
    return rows


def t2i_r1(result: EvalResult) -> float:
    return float(result.metrics["text_to_image"]["R@1"])


def format_sweep(rows: Sequence[SweepRow], set_names: Sequence[str]) -> str:
    """A fixed-width table: alpha, then mean recall and text->image R@1 of each evaluation set."""
    header = f"{'alpha':>7}" + "".join(f"  {name + ' mean recall':>28}  {name + ' t2i R@1':>24}" for name in set_names)
    lines = [header]
    for row in rows:
        lines.append(f"{row.alpha:>7g}" + "".join(f"  {r.mean_recall:>28.4f}  {t2i_r1(r):>24.4f}" for r in row.results))
    return "\n".join(lines)


def sweep_record(
    rows: Sequence[SweepRow], sets: Sequence[Mapping[str, Any]], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The sweep as JSON: ``extra`` (the models), the evaluation sets, and per alpha each set's full summary."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
        "sets": [dict(s) for s in sets],
        "rows": [
            {
                "alpha": row.alpha,
                "sets": [
                    {"mean_recall": r.mean_recall, "text_to_image/R@1": t2i_r1(r), "summary": r.summary()}
                    for r in row.results
                ],
            }
            for row in rows
        ],
    }


def write_sweep_report(
    record: Mapping[str, Any], rows: Sequence[SweepRow], out_dir: Path, *, protect: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """``<out>/wise_ft.json`` (``sweep_record``) and ``<out>/wise_ft.png`` (``plot_tradeoff``), in an evaluation
    report folder (``evaluate.write_eval_report``); no history line."""
    names = [str(s["name"]) for s in record["sets"]]
    plot = (f"{SWEEP_REPORT}.png", lambda path: plot_tradeoff(rows, names, path))
    return write_eval_report(out_dir, SWEEP_REPORT, record, plot, protect=protect, what="the WiSE-FT report")


def plot_tradeoff(rows: Sequence[SweepRow], set_names: Sequence[str], path: Path) -> Path:
    """Two sets: set 1's mean recall (x) against set 2's (y), each point labelled with its alpha. One set: mean
    recall and text->image R@1 against alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    if len(set_names) >= 2:
        xs = [row.results[0].mean_recall for row in rows]
        ys = [row.results[1].mean_recall for row in rows]
        ax.plot(xs, ys, "o-")
        for row, x, y in zip(rows, xs, ys):
            ax.annotate(f"α={row.alpha:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(f"{set_names[0]}: mean recall")
        ax.set_ylabel(f"{set_names[1]}: mean recall")
        ax.set_title("WiSE-FT: base (α=0) to fine-tuned (α=1)")
    else:
        alphas = [row.alpha for row in rows]
        ax.plot(alphas, [row.results[0].mean_recall for row in rows], "o-", label="mean recall")
        ax.plot(alphas, [t2i_r1(row.results[0]) for row in rows], "s--", label="text→image R@1")
        ax.set_xlabel("alpha (0: base, 1: fine-tuned)")
        ax.set_ylabel(set_names[0] if set_names else "metric")
        ax.set_title("WiSE-FT")
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a whole plot or the previous one, never half of one
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
