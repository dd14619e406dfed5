"""eval (retrieval, zero-shot, the WiSE-FT sweep) and merge."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .common import add_runtime_args, add_trust_pickle, image_folders, load_for_inference, new_command, runtime


def add_eval_command(sub: Any) -> None:
    p = new_command(
        sub,
        "eval",
        "retrieval metrics of a saved model on a split, zero-shot classification, or a WiSE-FT alpha sweep",
        description="""
Evaluate a saved model: text-to-image and image-to-text retrieval on a split (R@K, ranks, loss, similarity
histogram), zero-shot classification of labelled images (--classes), or a WiSE-FT sweep (--sweep-alpha).
Prints the figures and writes a report folder (default: <model>/../eval).""",
        examples=_EVAL_EXAMPLES,
        notes=_EVAL_NOTES,
    )
    p.add_argument("--model", help="saved model folder (e.g. outputs/clip_tiny/best_model) or hub id")
    add_trust_pickle(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", type=Path, help="data folder (retrieval on a split)")
    _add_zeroshot_args(p, what)
    p.add_argument("--split", default="val")
    p.add_argument("--out", type=Path, help="report folder (default: <model>/../eval)")
    p.add_argument(
        "--loss-batch",
        type=int,
        metavar="N",
        help="pairs per contrastive batch of the loss (a contrastive loss depends on it; default: the batch the "
        f"model was trained at, as its validation loss was; {DEFAULT_LOSS_BATCH} for a model not trained here)",
    )
    add_runtime_args(p)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    _add_sweep_args(p)
    p.set_defaults(handler=_eval)


def _add_zeroshot_args(p: argparse.ArgumentParser, group: Any) -> None:
    group.add_argument(
        "--classes",
        type=Path,
        help="zero-shot classification instead: a folder of class folders (root/<class>/*.jpg) or a CSV "
        "filename,label (filenames relative to the CSV's folder)",
    )
    p.add_argument(
        "--class-names",
        type=Path,
        help="with --classes: class names, one per line (CSV: every label must be one; folder: which class "
        "folders, in this order)",
    )
    p.add_argument(
        "--templates",
        type=Path,
        help="with --classes: prompt templates, one per line with {} for the class name (default: six of CLIP's)",
    )


def _eval(args: argparse.Namespace) -> int:
    if args.sweep_alpha:
        return _eval_sweep(args)
    _refuse_sweep_args_without_sweep(args)
    if args.classes is not None:
        if args.loss_batch is not None:
            raise UsageError("--loss-batch goes with --data (a split's contrastive loss); zero-shot has no loss")
        return _eval_zeroshot(args)
    if args.class_names is not None or args.templates is not None:
        raise UsageError("--class-names and --templates go with --classes (zero-shot classification)")
    from ..data.dataset import split_paths
    from ..data.sources import EvalSet, require_retrievable
    from ..data.validate import require_usable, validate_split
    from ..env import autocast_factory
    from ..evaluate import claim_report_folder, evaluate_split, format_metrics, write_report

    model_path = Path(args.model)
    out = args.out or (model_path.parent / "eval" if model_path.is_dir() else Path("eval"))
    image_dir, csv_path = split_paths(args.data, args.split)
    protect = {"model": args.model if model_path.is_dir() else None, "images": image_dir, "captions": csv_path}
    if not csv_path.is_file():  # a missing split or data folder, said before the model is loaded
        require_usable(validate_split(args.data, args.split), "raise", evaluating=True)
    claim_report_folder(out, protect)  # a refused --out before the split is embedded, not after
    encoder, device, precision = load_for_inference(args)
    table = require_usable(
        validate_split(args.data, args.split, tokenizer=encoder.tokenizer, context_length=encoder.context_length),
        "raise",
        evaluating=True,
    )
    data = require_retrievable(
        EvalSet.from_table(table), f"split {args.split!r}", "evaluate on a split with more images"
    )
    loss_batch, why = _loss_batch(args, encoder)
    result = evaluate_split(
        encoder,
        data,
        device=device,
        autocast=autocast_factory(device, precision),
        batch_size=args.batch_size,
        loss_batch_size=loss_batch,
        num_workers=args.workers,
        progress=not args.json,
    )
    paths = write_report(
        result,
        out,
        f"{model_path.name}_{args.split}",
        {"model": str(args.model), "data": str(args.data), "split": args.split},
        protect={
            "model": args.model if model_path.is_dir() else None,
            "images": table.image_dir,
            "captions": table.csv_path,
        },
    )
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(
            f"{args.split}: {result.num_images} images, {result.num_captions} captions; loss {result.loss:.4f} "
            f"(at contrastive batch {loss_batch}, {why})"
        )
        print(format_metrics(result.metrics))
        s = result.similarity
        print(
            f"similarity: matching {s['positive_mean']:.3f} ± {s['positive_std']:.3f}, non-matching "
            f"{s['negative_mean']:.3f} ± {s['negative_std']:.3f} (AUC {s.get('auc', float('nan')):.3f})"
        )
        print(f"report: {paths['report']}  plot: {paths['plot']}")
    return 0


DEFAULT_LOSS_BATCH = 256


def _loss_batch(args: argparse.Namespace, encoder: Any) -> tuple[int, str]:
    """The contrastive batch of eval's loss, and where it comes from (said next to the loss)."""
    if args.loss_batch is not None:
        if args.loss_batch < 2:
            raise UsageError(f"--loss-batch {args.loss_batch}: a contrastive batch needs at least 2 pairs")
        return args.loss_batch, "--loss-batch"
    if encoder.train_batch_size is not None:
        return encoder.train_batch_size, "the training batch"
    return DEFAULT_LOSS_BATCH, "the default: the model records no training batch; set it with --loss-batch"


def _eval_zeroshot(args: argparse.Namespace) -> int:
    from ..env import autocast_factory
    from ..evaluate import claim_report_folder
    from ..zeroshot import (
        evaluate_zeroshot,
        format_zeroshot,
        load_zeroshot_set,
        read_templates,
        write_zeroshot_report,
    )

    # bad input and a refused output first: before the model is loaded and the images embedded
    data = load_zeroshot_set(args.classes, args.class_names)
    templates = read_templates(args.templates)
    model_path = Path(args.model)
    out = args.out or (model_path.parent / "eval" if model_path.is_dir() else Path("eval"))
    inputs = {"classes": str(args.classes), "class_names": args.class_names, "templates": args.templates}
    protect = {"model": args.model if model_path.is_dir() else None, **inputs, **image_folders(data)}
    claim_report_folder(out, protect)
    encoder, device, precision = load_for_inference(args)
    result = evaluate_zeroshot(
        encoder,
        data,
        templates=templates,
        device=device,
        autocast=autocast_factory(device, precision),
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.json,
    )
    paths = write_zeroshot_report(
        result,
        out,
        f"{model_path.name}_zeroshot_{data.name}",
        {"model": str(args.model), **{k: None if v is None else str(v) for k, v in inputs.items()}},
        protect=protect,
    )
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(format_zeroshot(result))
        print(f"report: {paths['report']}  confusion matrix: {paths['plot']}")
    return 0


_MERGE_EXAMPLES = """
finderpartner merge --base openai/clip-vit-base-patch32 --finetuned outputs/clip/best_model --alpha 0.5 --out merged/wise_0.5
finderpartner merge --base openai/clip-vit-base-patch32 --finetuned outputs/clip/best_model --alpha 0 0.25 0.5 0.75 1 --out merged"""

_MERGE_NOTES = """With one --alpha, --out is the merged model folder; with several, --out/alpha_<a>/ is one per alpha. Each is a plain
transformers folder (CLIPModel.from_pretrained loads it) with a model card naming base, finetuned and alpha.
"""

_EVAL_EXAMPLES = """
finderpartner eval --model outputs/clip_tiny/best_model --data data/sample --split val
finderpartner eval --model outputs/clip_tiny/best_model --classes photos_by_label --json
finderpartner eval --sweep-alpha --base openai/clip-vit-base-patch32 --finetuned outputs/clip/best_model \\
    --data data/mine --split val --data2 data/other --split2 val --alpha 0 0.25 0.5 0.75 1 --out eval/wise"""

_EVAL_NOTES = """--sweep-alpha (WiSE-FT) merges --base and --finetuned in memory at each --alpha, evaluates each merge on the
set(s), prints a table and writes OUT/wise_ft.json and OUT/wise_ft.png (set 1 against set 2, or metric vs alpha).
"""

DEFAULT_SWEEP_ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def add_merge_command(sub: Any) -> None:
    p = new_command(
        sub,
        "merge",
        "WiSE-FT: interpolate the weights of a base and a fine-tuned model",
        description="""
WiSE-FT: theta = (1 - alpha) * theta_base + alpha * theta_finetuned, for two models of one architecture and
tokenizer; keeps what the base model knew while keeping most of the fine-tuning's gain.""",
        examples=_MERGE_EXAMPLES,
        notes=_MERGE_NOTES,
    )
    p.add_argument("--base", required=True, help="the model fine-tuning started from (saved folder or hub id)")
    p.add_argument("--finetuned", required=True, help="the fine-tuned model (e.g. outputs/clip/best_model)")
    _add_alpha_args(p, default=[0.5], what="(default: 0.5)")
    add_trust_pickle(p)
    p.add_argument(
        "--out", type=Path, required=True, help="merged model folder (several alphas: a folder of alpha_<a>/ folders)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge of other models or alphas")
    p.set_defaults(handler=_merge)


def _add_alpha_args(p: Any, *, default: list[float] | None, what: str) -> None:
    p.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=default,
        metavar="A",
        help=f"weight of the fine-tuned model: 0 = base, 1 = fine-tuned {what}",
    )
    p.add_argument("--extrapolate", action="store_true", help="allow --alpha outside [0, 1]")


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("WiSE-FT sweep (instead of --model)")
    g.add_argument(
        "--sweep-alpha",
        action="store_true",
        help="evaluate the merge of --base and --finetuned at each --alpha (in memory, no model written)",
    )
    g.add_argument("--base", help="the model fine-tuning started from (saved folder or hub id)")
    g.add_argument("--finetuned", help="the fine-tuned model")
    _add_alpha_args(g, default=None, what="(default: 0 0.25 0.5 0.75 1)")
    g.add_argument("--data2", type=Path, help="a second evaluation set's data folder (default: --data)")
    g.add_argument("--split2", help="the second set's split (default: --split)")


def _alphas(args: argparse.Namespace, default: list[float]) -> list[float]:
    """--alpha as floats: finite, each once, in [0, 1] unless --extrapolate."""
    values = default if args.alpha is None else list(args.alpha)
    for a in values:
        if not math.isfinite(a):
            raise UsageError(f"--alpha {a} is not a number; give values between 0 (base) and 1 (fine-tuned)")
        if not 0.0 <= a <= 1.0 and not args.extrapolate:
            raise UsageError(
                f"--alpha {a:g} is outside [0, 1] (0: the base model, 1: the fine-tuned one); beyond them the "
                "weights are extrapolated along the fine-tuning direction: pass --extrapolate if that is what you want"
            )
    repeated = sorted({a for a in values if values.count(a) > 1})
    if repeated:
        raise UsageError(f"--alpha lists {', '.join(f'{a:g}' for a in repeated)} more than once; give each alpha once")
    return values


def _merger(args: argparse.Namespace) -> Any:
    from ..merge import Merger
    from ..model import load_model

    base = load_model(args.base, trust_pickle=args.trust_pickle)
    finetuned = load_model(args.finetuned, trust_pickle=args.trust_pickle)
    return Merger(base, finetuned, sources=(str(args.base), str(args.finetuned)))


def _merge(args: argparse.Namespace) -> int:
    from ..merge import claim_merge_output, write_merged

    alphas = _alphas(args, [0.5])
    claim_merge_output(args.out, args.base, args.finetuned, alphas, overwrite=args.overwrite)  # before loading
    merger = _merger(args)
    folders = write_merged(merger, args.out, args.base, args.finetuned, alphas, overwrite=args.overwrite)
    for alpha, folder in zip(alphas, folders):
        print(f"alpha {alpha:g}: {folder}")
    return 0


def _refuse_sweep_args_without_sweep(args: argparse.Namespace) -> None:
    given = [
        flag
        for flag, value in (
            ("--base", args.base),
            ("--finetuned", args.finetuned),
            ("--alpha", args.alpha),
            ("--extrapolate", args.extrapolate),
            ("--data2", args.data2),
            ("--split2", args.split2),
        )
        if value not in (None, False)
    ]
    if given:
        raise UsageError(f"{', '.join(given)} only work(s) with --sweep-alpha (WiSE-FT); add it, or drop them")
    if args.model is None:
        raise UsageError(
            "eval needs --model DIR (or --sweep-alpha --base DIR --finetuned DIR to evaluate their merges)"
        )


def _sweep_set(data: Path, split: str, encoder: Any) -> tuple[Any, Any]:
    """(EvalSet, its PairTable) of one evaluation set, checked as `eval` checks its split."""
    from ..data.sources import EvalSet, require_retrievable
    from ..data.validate import require_usable, validate_split

    table = require_usable(
        validate_split(data, split, tokenizer=encoder.tokenizer, context_length=encoder.context_length),
        "raise",
        evaluating=True,
    )
    return require_retrievable(
        EvalSet.from_table(table), f"split {split!r}", "evaluate on a split with more images"
    ), table


def _eval_sweep(args: argparse.Namespace) -> int:
    from ..env import autocast_factory
    from ..evaluate import claim_report_folder, evaluate_split
    from ..merge import format_sweep, sweep, sweep_record, write_sweep_report
    from ..model import set_attention

    if args.model is not None:
        raise UsageError("--sweep-alpha evaluates merges of --base and --finetuned: drop --model")
    missing = [flag for flag, value in (("--base", args.base), ("--finetuned", args.finetuned)) if value is None]
    if missing:
        raise UsageError(f"--sweep-alpha needs {' and '.join(missing)} (the two models to merge)")
    alphas = _alphas(args, DEFAULT_SWEEP_ALPHAS)
    wanted = [(args.data, args.split)]
    if args.data2 is not None or args.split2 is not None:
        wanted.append((args.data2 or args.data, args.split2 or args.split))
        if Path(os.path.abspath(wanted[0][0])) == Path(os.path.abspath(wanted[1][0])) and wanted[0][1] == wanted[1][1]:
            raise UsageError("the second set (--data2/--split2) is the first one; name another data folder or split")
    names = [f"{Path(d).name}/{s}" for d, s in wanted]
    if len(set(names)) < len(names):
        names = [f"set {i + 1} ({n})" for i, n in enumerate(names)]
    finetuned_path = Path(args.finetuned)
    out = args.out or (finetuned_path.parent / "eval" if finetuned_path.is_dir() else Path("eval"))
    protect: dict[str, Any] = {
        "base": args.base if Path(args.base).is_dir() else None,
        "finetuned": args.finetuned if finetuned_path.is_dir() else None,
    }
    for i, (data, split) in enumerate(wanted):  # the layout's paths; checked again with the validated ones
        protect |= {
            f"images{i + 1}": Path(data) / "images" / split,
            f"captions{i + 1}": Path(data) / f"captions_{split}.csv",
        }
    claim_report_folder(out, protect)  # before the models load and the sweep runs
    merger = _merger(args)
    device, precision = runtime(args)
    sets = []
    for i, (data, split) in enumerate(wanted):
        eval_set, table = _sweep_set(data, split, merger.encoder)
        sets.append(eval_set)
        protect |= {f"images{i + 1}": table.image_dir, f"captions{i + 1}": table.csv_path}

    def evaluate(encoder: Any) -> list[Any]:
        set_attention(encoder.model, "auto", device, precision)  # as `eval` does
        return [
            evaluate_split(
                encoder,
                eval_set,
                device=device,
                autocast=autocast_factory(device, precision),
                batch_size=args.batch_size,
                loss_batch_size=_loss_batch(args, encoder)[0],
                num_workers=args.workers,
                progress=not args.json,
            )
            for eval_set in sets
        ]

    rows = sweep(merger, alphas, evaluate)
    record = sweep_record(
        rows,
        [{"name": n, "data": str(d), "split": s} for n, (d, s) in zip(names, wanted)],
        {"base": str(args.base), "finetuned": str(args.finetuned)},
    )
    paths = write_sweep_report(record, rows, out, protect=protect)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(format_sweep(rows, names))
        print(f"report: {paths['report']}  plot: {paths['plot']}")
    return 0
