"""The ``finderpartner`` command. The only module that parses argv, sets up logging and chooses exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, progress, signals
from .errors import (
    BROKEN_PIPE,
    EXIT_CODES,
    INTERNAL_ERROR,
    INTERRUPTED,
    DataError,
    FinderPartnerError,
    Stopped,
    UsageError,
)
from .outputs import claim_files, storage_error, write_text_atomic

log = logging.getLogger("finderpartner")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits with 2 here, with argparse's message
    _setup_logging(args.verbose, args.quiet)
    signals.interrupt_on_signals()  # SIGTERM (a cluster's preemption) stops a command as Ctrl-C does
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenise in DataLoader workers instead
    progress.quiet_other_bars()  # bars on a terminal only, from transformers too; before it is imported
    try:
        with progress.routed_logging():
            return int(args.handler(args) or 0)
    except FinderPartnerError as e:
        rank = _launched_rank()
        label = "stopped" if isinstance(e, Stopped) else "error"
        print(f"{'' if rank is None else f'[rank {rank}] '}{label}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # stdout's reader is gone (`| head`): not a bug, and nothing more can be printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit, when Python flushes stdout
        return BROKEN_PIPE
    except KeyboardInterrupt:
        hint = "; a training continues from its last checkpoint with --resume auto" if args.handler is _train else ""
        by = f" by {signals.received()}" if signals.received() else ""
        print(f"interrupted{by}: nothing half-written was kept (earlier files are intact){hint}", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place that turns any error into an exit code
        refused = storage_error(e, Path(getattr(e, "filename", None) or "."), verb="use")
        if refused is not None:  # a write the disk refused, somewhere no writer expected it: still not a bug
            print(f"error: {refused}", file=sys.stderr)
            return refused.exit_code
        traceback.print_exc()
        print(
            f"internal error: this is a bug in finderpartner {__version__}, not something you did wrong. Please "
            "report it with the command you ran and the traceback above.",
            file=sys.stderr,
        )
        return INTERNAL_ERROR


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that also takes hidden spellings of its flags, shown nowhere in --help: the underscore form
    of every flag (``--top_k`` for ``--top-k``, as the seed's scripts spelt them) and the seed's renamed flags
    (``hidden_aliases``: ``--model_path`` for ``--model``). Its subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases: dict[str, str] = {}

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        return super().parse_known_args(self._canonical(sys.argv[1:] if args is None else list(args)), namespace)

    def _canonical(self, args: list[str]) -> list[str]:
        """``--model_path DIR`` -> ``--model DIR``, ``--top_k=3`` -> ``--top-k=3``: only flags this parser has."""
        out = []
        for i, arg in enumerate(args):
            if arg == "--":  # the rest are values
                return out + args[i:]
            flag, eq, value = arg.partition("=")
            if flag.startswith("--") and "_" in flag:
                name = self.hidden_aliases.get(flag, flag.replace("_", "-"))
                if name in self._option_string_actions:
                    arg = name + eq + value
            out.append(arg)
        return out


def _hidden_alias(p: argparse.ArgumentParser, alias: str, flag: str) -> None:
    """Accept ``alias`` for ``flag`` without showing it (the seed's spellings, which its shims still pass)."""
    assert isinstance(p, _Parser) and flag in p._option_string_actions, flag
    p.hidden_aliases[alias] = flag


def _command(
    sub: Any, name: str, help: str, *, description: str, examples: str, notes: str = ""
) -> argparse.ArgumentParser:
    """A subcommand whose --help has a description, examples, notes and the exit codes (text laid out as written)."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines())
    if notes:
        epilog += "\n\n" + notes.strip()
    p = sub.add_parser(
        name,
        help=help,
        description=description.strip(),
        epilog=f"{epilog}\n\nexit codes:\n{exit_code_table()}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # -v / -q after the command too (`finderpartner index ... -q`); SUPPRESS keeps the one given before it
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="finderpartner",
        description="Fine-tune a CLIP dual encoder on image-caption pairs, evaluate it, export it, search a gallery.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"finderpartner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only: no progress either")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in (
        _add_check_env_command,
        _add_init_config_command,
        _add_sample_data_command,
        _add_validate_data_command,
        _add_make_shards_command,
        _add_train_command,
        _add_trial_command,
        _add_eval_command,
        _add_merge_command,
        _add_index_command,
        _add_search_command,
        _add_export_command,
        _add_demo_command,
        _add_serve_command,
        _add_convert_command,
    ):
        add(sub)
    return parser


def _add_check_env_command(sub: Any) -> None:
    p = _command(
        sub,
        "check-env",
        "report the Python packages, GPU and recommended settings",
        description="""
Report Python, PyTorch and the optional packages found (and what each is for), the GPU or CPU and its memory,
and the settings recommended for this machine. Exits 1 when a required package is missing or too old.""",
        examples="""
finderpartner check-env
finderpartner check-env --config configs/clip_base.yaml --json""",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", type=Path, help="also check this config's model and output folder")
    p.set_defaults(handler=_check_env)


def _add_init_config_command(sub: Any) -> None:
    p = _command(
        sub,
        "init-config",
        "print a commented default config (YAML) on stdout",
        description="""
Print a config on stdout: every key with its meaning, starting from a preset (tiny: the CPU model of
`make run`; rtx3060: ViT-B/32 on a 12 GB GPU; minilm; finetune). Save it, edit it, train with it.""",
        examples="""
finderpartner init-config --preset tiny > my_config.yaml
finderpartner init-config --preset rtx3060 > mine.yaml && finderpartner train --config mine.yaml""",
    )
    p.add_argument(
        "--preset",
        default="rtx3060",
        choices=["rtx3060", "tiny", "minilm", "finetune"],
        help="starting point (default: rtx3060)",
    )
    p.set_defaults(handler=_init_config)


def _add_sample_data_command(sub: Any) -> None:
    p = _command(
        sub,
        "sample-data",
        "write the synthetic sample data set",
        description="""
Write a deterministic synthetic data set (coloured shapes, two captions per image) in the folder layout that
train, eval and validate-data read: images/<split>/ and captions_<split>.csv.""",
        examples="""
finderpartner sample-data --out data/sample
finderpartner sample-data --out data/small --train-images 200 --val-images 50 --image-size 64""",
    )
    p.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder (default: data/sample)")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--val-images", type=int, default=300)
    p.add_argument("--image-size", type=int, default=96, help="pixels per side")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace sample data made with other settings")
    p.set_defaults(handler=_sample_data)


def _add_validate_data_command(sub: Any) -> None:
    p = _command(
        sub,
        "validate-data",
        "check a data folder and report every problem at once",
        description="""
Check a data folder (images/<split>/ and captions_<split>.csv) and list every problem at once, by file and
line: missing, empty, truncated or non-image files, bad CSV rows, empty captions, captions longer than the
model's context. Exits 1 when a split has a problem that stops training.""",
        examples="""
finderpartner validate-data --data data/sample
finderpartner validate-data --data data/mine --split train --model outputs/clip_tiny/best_model --json""",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with images/<split>/ and captions_<split>.csv")
    p.add_argument("--split", action="append", help="split(s) to check (default: every captions_*.csv)")
    p.add_argument("--model", help="count captions longer than this model's context (a saved model folder)")
    _add_trust_pickle(p)
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="larger images count as decompression bombs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_validate_data)


def _add_make_shards_command(sub: Any) -> None:
    p = _command(
        sub,
        "make-shards",
        "write a split of the folder layout as WebDataset tar shards",
        description="""
Write one split of the folder layout as WebDataset tar shards (<key>.jpg|png + <key>.txt) and sizes.json,
for training with data.format: webdataset and data.train_shards.""",
        examples="""
finderpartner make-shards --data data/sample --split train --out shards
finderpartner make-shards --data data/mine --split val --out shards --shard-size 5000""",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with images/<split>/ and captions_<split>.csv")
    p.add_argument("--split", default="train")
    p.add_argument("--out", type=Path, required=True, help="shard folder (<split>-000000.tar, ...)")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard")
    p.add_argument("--overwrite", action="store_true", help="replace a shard folder made from another data folder")
    p.set_defaults(handler=_make_shards)


def _add_train_command(sub: Any) -> None:
    p = _command(
        sub,
        "train",
        "train as configured",
        description="""
Train as the config says (--set overrides any key). The run folder <output_dir>/<experiment>/ gets the
resolved config, checkpoints, metrics.jsonl and best_model/ (a plain transformers folder). A folder holding an
earlier run is continued with --resume auto or started over with --overwrite. Ctrl-C or SIGTERM (a cluster's
preemption) finishes the current step, writes a checkpoint and prints the command that continues (exit 12).""",
        examples="""
finderpartner train --config configs/clip_tiny.yaml --resume auto
finderpartner train --config configs/clip_base.yaml --set data.root=data/mine --set train.epochs=3""",
    )
    _add_config_args(p)
    p.add_argument(
        "--resume", metavar="PATH|auto", help="continue from a checkpoint folder, or the newest complete one"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that holds an earlier run (deletes its checkpoints, best model, metrics)",
    )
    p.add_argument(
        "--create-sample-data",
        action="store_true",
        help="write the sample data to data.root first (without --config: to data/sample, then stop)",
    )
    p.set_defaults(handler=_train)


def _add_trial_command(sub: Any) -> None:
    p = _command(
        sub,
        "trial",
        "a minute of real training steps: does the config fit, how fast, when would it end",
        description="""
Run the configured training for a short time on this machine and report: device and precision, the micro-batch
the probe chooses and the contrastive batch, pairs/s, peak memory, MFU against the device's peak, and the time of
one epoch and of the whole schedule (per 10k pairs when the data is not there: synthetic batches of the model's
image size and caption length are used then). The model is the configured one; a hub model whose weights cannot
be fetched is measured as its architecture (arch:ViT-B-32, ...) with random weights, which it says. Writes nothing
(no run folder, no cache). One process; Ctrl-C or SIGTERM stops it and reports what was measured (exit 130).""",
        examples="""
finderpartner trial --config configs/clip_tiny.yaml
finderpartner trial --config configs/clip_base.yaml --memory-cap 12GiB --seconds 90
finderpartner trial --config configs/clip_base.yaml --set model.name=arch:ViT-B-16 --inject-oom --json""",
        notes="""
--memory-cap emulates a smaller GPU (torch.cuda.set_per_process_memory_fraction); on a CPU it caps the resident
memory the micro-batch probe plans for. A config that cannot fit even one pair exits 7. docs/trial.md says how
each figure is measured.""",
    )
    _add_config_args(p)
    p.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="how long the trial runs, setup included (default: 60; at least 2 steps)",
    )
    p.add_argument("--memory-cap", metavar="SIZE", help="emulate a device with this much memory, e.g. 12GiB or 8GB")
    p.add_argument("--inject-oom", action="store_true", help="make one step run out of memory and show the recovery")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(handler=_trial)


def _add_eval_command(sub: Any) -> None:
    p = _command(
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
    _add_trust_pickle(p)
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
    _add_runtime_args(p)
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


def _add_index_command(sub: Any) -> None:
    p = _command(
        sub,
        "index",
        "embed photos into a photo store (parallel, resumable); remove photos; compact",
        description="""
Embed every image under a folder (or listed in a CSV/JSONL) into a photo store: FAISS + SQLite, with
attribute columns for --where filters (docs/search.md). Run it again and only new and changed images are
embedded, appended without rewriting the index; under torchrun / accelerate launch (-m finderpartner.cli index ...)
each process embeds a share.
Work is saved in parts as it goes: after Ctrl-C, SIGTERM or a crash the same command continues.
`index remove` hides photos from every search at once; `index compact` drops them from disk and rebuilds the
base index (exact for small stores, IVF with measured recall above).""",
        examples="""
finderpartner index --model outputs/clip_tiny/best_model --images photos --attributes people.csv --out store
finderpartner index remove --out store --where "city = 'Paris'"
finderpartner index compact --out store""",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["add", "remove", "compact"],
        default="add",
        help="add (default): embed photos; remove: hide photos now; compact: drop them, rebuild the index",
    )
    p.add_argument("--model", help="model folder (or export folder with --backend onnx); needed to add")
    _add_trust_pickle(p)
    p.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--list", type=Path, help="CSV or JSONL naming the images (column path; other columns: attributes)")
    p.add_argument("--attributes", type=Path, help="CSV/JSONL: a file name column, then attribute columns")
    p.add_argument(
        "--out",
        "--store",
        dest="out",
        type=Path,
        required=True,
        help="photo store folder (new, or a store of the same model: photos are added), or a Milvus collection: "
        "milvus:FILE.db, milvus:http://host:19530[#name] (docs/serve.md)",
    )
    p.add_argument("--path", action="append", help="remove: this photo (repeatable)")
    p.add_argument("--id", action="append", type=int, help="remove: the photo with this id (repeatable)")
    p.add_argument("--where", help="remove: the photos matching this filter (docs/search.md: the grammar)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store of another model, or an index of an earlier version, at --out",
    )
    _add_runtime_args(p)
    _add_backend_args(p)
    p.set_defaults(handler=_index)


def _add_search_command(sub: Any) -> None:
    p = _command(
        sub,
        "search",
        "rank images by a text description (or by similarity to an image)",
        description="""
Rank a gallery's images by a text description (--prompt) or by similarity to an image (--image). The gallery
is an index made by `finderpartner index`, or a folder (whose index is kept in the cache and reused).""",
        examples="""
finderpartner search --model outputs/clip_tiny/best_model --images data/sample/images/val --prompt "a large red circle"
finderpartner search --model outputs/clip_tiny/best_model --index photos_index --image query.jpg --top-k 10 --json""",
    )
    p.add_argument("--model", required=True)
    _add_trust_pickle(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--index", type=Path, help="store made by `finderpartner index` (a folder, or milvus:FILE.db / milvus:URI)"
    )
    where.add_argument("--images", type=Path, help="folder of images (embeddings cached and reused)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="describe what you are looking for")
    what.add_argument("--image", type=Path, help="find images similar to this one")
    p.add_argument("-k", "--top-k", type=int, default=5)
    p.add_argument(
        "--where",
        help="with --index: only photos matching this filter, e.g. \"city = 'Paris' and age "
        'between 25 and 35" (docs/search.md)',
    )
    p.add_argument("--nprobe", type=int, help="with --index: IVF lists visited (default: tuned at build time)")
    p.add_argument("--exact", action="store_true", help="with --index: exact search over every photo")
    _add_runtime_args(p)
    _add_backend_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_search)


def _add_export_command(sub: Any) -> None:
    p = _command(
        sub,
        "export",
        "export to ONNX in optimum's and transformers.js's layout (model + both encoders), verify with onnxruntime",
        description="""
Export to ONNX in Hugging Face optimum's layout: onnx/model.onnx (logits and both embeddings; it loads in
optimum's ORTModelForZeroShotImageClassification), onnx/text_model.onnx and onnx/vision_model.onnx (L2-normalised
embeddings, for search; transformers.js loads them in a web page), each with its own weights, and config.json,
the tokenizer and preprocessing beside them.
Then verify every graph against PyTorch with onnxruntime on real inputs (max abs diff, cosine, latency);
--fp16 / --int8 also report what the smaller variants cost in accuracy.""",
        examples="""
finderpartner export --model outputs/clip_tiny/best_model --out exports/clip_tiny
finderpartner export --model outputs/clip/best_model --out exports/clip --fp16 --int8""",
    )
    p.add_argument("--model", required=True, help="saved model folder or hub id")
    _hidden_alias(p, "--model_path", "--model")
    _add_trust_pickle(p)
    p.add_argument(
        "--out", type=Path, required=True, help="export folder (new, or an earlier export of the same model)"
    )
    _hidden_alias(p, "--output_dir", "--out")
    p.add_argument("--overwrite", action="store_true", help="replace an export of another model at --out")
    p.add_argument("--fp16", action="store_true", help="also write fp16 encoders (for GPUs) and report their accuracy")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write int8 graphs (dynamic quantization; *_quantized.onnx, transformers.js's q8) and report their "
        "accuracy",
    )
    p.add_argument(
        "--exporter",
        default="auto",
        choices=["auto", "dynamo", "torchscript"],
        help="torch.onnx exporter (auto: dynamo when onnxscript is installed)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--images", type=Path, help="images to verify with (default: the run's validation images)")
    p.add_argument(
        "--captions", type=Path, help="captions to verify with: a CSV with a caption column, or one per line"
    )
    p.add_argument("--verify-count", type=int, default=32, help="images and captions used for verification")
    p.add_argument("--json", action="store_true", help="print the export info and verification as JSON")
    p.set_defaults(handler=_export)


def _add_demo_command(sub: Any) -> None:
    p = _command(
        sub,
        "demo",
        "web demo: image-text scores, text comparison, gallery search by prompt",
        description="""
Start a Gradio web app: an image scored against several texts, texts compared with each other, and gallery
search by prompt with thumbnails. It binds 127.0.0.1 (this machine only) unless --host says otherwise.""",
        examples="""
finderpartner demo --model outputs/clip_tiny/best_model --images data/sample/images/val
finderpartner demo --model outputs/clip_tiny/best_model --index photos_index --port 8080""",
    )
    p.add_argument("--model", required=True, help="saved model folder or hub id")
    _hidden_alias(p, "--model_path", "--model")
    _add_trust_pickle(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--index", type=Path, help="gallery index made by `finderpartner index`")
    where.add_argument("--images", type=Path, help="gallery folder (default: the run's validation images, if known)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default: 10 MB)")
    _add_runtime_args(p)
    _add_backend_args(p)
    p.set_defaults(handler=_demo)


def _add_serve_command(sub: Any) -> None:
    p = _command(
        sub,
        "serve",
        "HTTP search service for apps: POST /search (text or image, k, filter), GET /healthz, docs at /docs",
        description="""
Serve a photo store over HTTP (FastAPI + uvicorn): POST /search takes JSON {"text", "k", "where"} or a
multipart image upload and answers the best hits with scores and attributes; GET /healthz tells the model, the
store, its count and generation; /docs is the OpenAPI page. The model and store are loaded once; an update of
the store on disk (finderpartner index) is swapped in without refusing a query. Binds 127.0.0.1 unless --host
says otherwise; with a token (--token-file, or $FINDERPARTNER_SERVE_TOKEN) every search needs
`Authorization: Bearer <token>`. SIGTERM or Ctrl-C finishes the requests in flight, then stops (exit 130).""",
        examples="""
finderpartner serve --model outputs/clip_tiny/best_model --index photos_index
finderpartner serve --model outputs/clip_tiny/best_model --index milvus:photos.db --port 8080
finderpartner serve --backend onnx --model exports/clip --index photos_index --host 0.0.0.0 --token-file token.txt""",
        notes="""docs/serve.md has curl examples, the limits, how reloading works and how to point it at a Milvus cluster.""",
    )
    p.add_argument("--model", required=True, help="saved model folder, hub id, or (with --backend onnx) an export")
    _add_trust_pickle(p)
    p.add_argument(
        "--index",
        required=True,
        help="the store: a folder made by `finderpartner index`, or milvus:FILE.db / milvus:http://host:19530[#name]",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--token-file", help="file whose first line is the bearer token (else $FINDERPARTNER_SERVE_TOKEN)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default: 10 MB)")
    p.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest uploaded image, width x height (default: 40M)"
    )
    p.add_argument("--max-k", type=int, default=100, help="most hits a request may ask for (default: 100)")
    p.add_argument(
        "--reload-interval", type=float, default=1.0, help="seconds between checks for a new store version (0: never)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--max-batch", type=int, default=32, help="queries encoded together when they arrive at once")
    p.add_argument("--search-threads", type=int, default=1, help="FAISS threads (default 1: the model has the cores)")
    _add_backend_args(p)
    p.set_defaults(handler=_serve)


def exit_code_table() -> str:
    """The exit codes, one per line (printed by --help; README carries the same table, checked by a test)."""
    return "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())


_EPILOG = f"""examples:
  finderpartner sample-data --out data/sample
  finderpartner train --config configs/clip_tiny.yaml --resume auto
  finderpartner eval --model outputs/clip_tiny/best_model --data data/sample
  finderpartner search --model outputs/clip_tiny/best_model --images photos --prompt "a dog on a beach"

No command deletes or overwrites files it did not create: an existing output folder is written to only when
the same command made it for the same inputs (--overwrite replaces one it made for other inputs).

Progress: a bar when stderr is a terminal; in a log (a pipe, a file, CI) a plain line every tenth of the work or
30 s, with the rate and the time left; none with -q or TQDM_DISABLE=1. `finderpartner COMMAND --help` gives
each command's examples. Flags are spelt with hyphens (--top-k); their underscore forms (--top_k) and the seed's
--model_path and --output_dir are accepted too.

exit codes:
{exit_code_table()}
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (see `finderpartner init-config`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )


def _add_trust_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also load pickle weights (pytorch_model.bin) when the model has no safetensors; pickle can "
        "run arbitrary code: only for a model from a source you trust",
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=64, help="images embedded at once")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnx"],
        help="onnx: embed with an export folder (--model is then the folder `finderpartner export` wrote)",
    )
    p.add_argument("--onnx-variant", default="fp32", choices=["fp32", "fp16", "int8"], help="with --backend onnx")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (not the stream of the moment it was made: that may be closed)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """Log lines on stderr; in a multi-process run each line names its process, and only the main one (rank 0)
    reports progress: the others print warnings and errors (all of it with -v)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    rank = _launched_rank()
    if rank is not None and rank > 0 and not verbose:
        level = max(level, logging.WARNING)
    handler = _StderrHandler()
    where = "" if rank is None else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {where}%(levelname)-7s %(message)s", "%H:%M:%S"))
    pkg = logging.getLogger("finderpartner")
    pkg.handlers[:] = [handler]
    pkg.setLevel(level)
    pkg.propagate = False
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun, accelerate launch, SLURM's srun) started several, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return int(os.environ.get("RANK", "0")) if world > 1 else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Commands


def _check_env(args: argparse.Namespace) -> int:
    from .env import environment_report, format_report

    report = environment_report(config_path=args.config)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def _init_config(args: argparse.Namespace) -> int:
    from .config import PRESET_NOTES, preset_config, render_yaml

    header = (
        f"# FinderPartner config, preset '{args.preset}'. Every key is optional; unknown keys are errors.\n"
        f"# Train with: finderpartner train --config <this file> [--set key=value ...]\n"
    )
    if args.preset in PRESET_NOTES:
        header += f"# {PRESET_NOTES[args.preset]}\n"
    sys.stdout.write(header + render_yaml(preset_config(args.preset)))
    return 0


def _sample_data(args: argparse.Namespace) -> int:
    from .data.sample import make_sample_data

    summary = make_sample_data(
        args.out,
        train_images=args.train_images,
        val_images=args.val_images,
        image_size=args.image_size,
        image_format=args.format,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    for split, c in summary.counts.items():
        print(f"{split}: {c['images']} images, {c['pairs']} pairs, {c['distinct_captions']} distinct captions")
    print(f"sample data in {summary.root}")
    return 0


def _validate_data(args: argparse.Namespace) -> int:
    import dataclasses

    from .data.validate import retrieval_problem, validate_split

    if not args.data.exists():
        raise DataError(
            f"--data {args.data} does not exist; give the data folder (images/<split>/, captions_<split>.csv)"
        )
    if not args.data.is_dir():
        raise DataError(
            f"--data {args.data} is a file; give the data folder that holds images/<split>/ and "
            f"captions_<split>.csv (for this file: --data {args.data.parent})"
        )
    splits = args.split or sorted(p.stem.removeprefix("captions_") for p in args.data.glob("captions_*.csv"))
    if not splits:
        raise DataError(
            f"{args.data}: no captions_<split>.csv found; a data folder holds images/<split>/ and "
            "captions_<split>.csv (see README: Your data)"
        )
    tokenizer = context = None
    if args.model:
        from .model import load_model

        encoder = load_model(args.model, trust_pickle=args.trust_pickle)
        tokenizer, context = encoder.tokenizer, encoder.context_length
    reports = [
        validate_split(
            args.data,
            s,
            max_pixels=args.max_pixels,
            tokenizer=tokenizer,
            context_length=context,
            progress=not args.json,
        )
        for s in splits
    ]
    # the split-level rule train and eval apply too (a split of one image cannot be evaluated)
    reports = [
        dataclasses.replace(r, problems=(*r.problems, p)) if (p := retrieval_problem(r)) and r.rows_total else r
        for r in reports
    ]
    if args.json:
        out = {
            r.split: {
                "usable_pairs": len(r.table),
                "rows": r.rows_total,
                "problems": [
                    {"file": p.file, "line": p.line, "kind": p.kind, "message": p.message, "fatal": p.fatal}
                    for p in r.problems
                ],
            }
            for r in reports
        }
        print(json.dumps(out, indent=2))
    else:
        for r in reports:
            print(r.describe(limit=None))
    return 1 if any(r.fatal for r in reports) else 0


def _make_shards(args: argparse.Namespace) -> int:
    from .data.shards import write_shards

    if args.shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1 (got {args.shard_size})")
    shards = write_shards(args.data, args.split, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    first, last = Path(shards[0]).name, Path(shards[-1]).name
    print(
        f"{len(shards)} shard(s) in {args.out}: use data.format: webdataset, data.train_shards: "
        f"{args.out}/{args.split}-{{{first[-10:-4]}..{last[-10:-4]}}}.tar"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.sample import make_sample_data
    from .train import train

    if args.create_sample_data and args.config is None:
        summary = make_sample_data(Path("data/sample"))
        print(f"sample data in {summary.root}; train on it with: finderpartner train --config configs/clip_tiny.yaml")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.create_sample_data:
        make_sample_data(cfg.data.root)
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except Stopped as e:
        if _launched_rank():  # the other processes of a multi-process run: the main one says how to go on
            raise
        again = ["finderpartner", "train", *(["--config", str(args.config)] if args.config else [])]
        again += [x for o in args.overrides for x in ("--set", o)] + ["--resume", "auto"]
        raise Stopped(
            f"{e}: {shlex.join(again)}" + (" (with the same launcher)" if _launched_rank() == 0 else "")
        ) from None
    if result.is_main:
        print(f"best model: {result.best_model}")
    return 0


def _trial(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()  # --seconds counts the imports too
    from .config import load_config
    from .trial import format_report, parse_size, run_trial

    cap = parse_size(args.memory_cap) if args.memory_cap is not None else None
    cfg = load_config(args.config, args.overrides)
    report = run_trial(
        cfg,
        seconds=args.seconds,
        memory_cap=cap,
        inject_oom=args.inject_oom,
        config_name=str(args.config or "defaults"),
        started=started,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return INTERRUPTED if report["interrupted"] else 0


def _runtime(args: argparse.Namespace) -> tuple[Any, str]:
    from .env import resolve_device, resolve_precision

    device = resolve_device(args.device)
    return device, resolve_precision(args.precision, device)


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
    from .data.dataset import split_paths
    from .data.sources import EvalSet, require_retrievable
    from .data.validate import require_usable, validate_split
    from .env import autocast_factory
    from .evaluate import evaluate_split, format_metrics, write_report
    from .model import load_model, set_attention
    from .zeroshot import claim_report_folder

    model_path = Path(args.model)
    out = args.out or (model_path.parent / "eval" if model_path.is_dir() else Path("eval"))
    image_dir, csv_path = split_paths(args.data, args.split)
    protect = {"model": args.model if model_path.is_dir() else None, "images": image_dir, "captions": csv_path}
    if not csv_path.is_file():  # a missing split or data folder, said before the model is loaded
        require_usable(validate_split(args.data, args.split), "raise", evaluating=True)
    claim_report_folder(out, protect)  # a refused --out before the split is embedded, not after
    device, precision = _runtime(args)
    encoder = load_model(args.model, trust_pickle=args.trust_pickle)
    set_attention(encoder.model, "auto", device)  # the kernels training validated with: the same figures, faster
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
    from .env import autocast_factory
    from .model import load_model, set_attention
    from .zeroshot import (
        claim_report_folder,
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
    protect = {"model": args.model if model_path.is_dir() else None, **inputs, **_image_folders(data)}
    claim_report_folder(out, protect)
    device, precision = _runtime(args)
    encoder = load_model(args.model, trust_pickle=args.trust_pickle)
    set_attention(encoder.model, "auto", device)
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


def _image_folders(data: Any) -> dict[str, Path]:
    """The folders a zero-shot set's images lie in (a CSV's own folder aside: a report may go beside it)."""
    if data.source.is_dir():
        return {"images": data.source}
    folders = sorted({image.parent for image in data.images} - {data.source.parent})
    return {"images" + (f" {i + 1}" if i else ""): folder for i, folder in enumerate(folders)}


def _searcher(args: argparse.Namespace) -> Any:
    from .embedding import Searcher
    from .model import load_model, set_attention
    from .onnx_runtime import OnnxSearcher

    if getattr(args, "backend", "torch") == "onnx":
        return OnnxSearcher(
            args.model,
            variant=args.onnx_variant,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
    device, precision = _runtime(args)
    encoder = load_model(args.model, trust_pickle=args.trust_pickle)
    set_attention(encoder.model, "auto", device)
    return Searcher(encoder, device=device, precision=precision, batch_size=args.batch_size, num_workers=args.workers)


def _index(args: argparse.Namespace) -> int:
    from .search.commands import index_command
    from .search.milvus_index import milvus_index_command
    from .search.milvus_store import is_milvus_location

    if is_milvus_location(args.out):  # a Milvus collection (docs/serve.md), not a store folder
        return milvus_index_command(args, _searcher)
    return index_command(args, _searcher)


def _search(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError(
            "--prompt is empty: describe what you are looking for, e.g. --prompt 'a red circle on the left'"
        )
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {args.top_k})")
    if args.index is None and (args.where or args.nprobe or args.exact):
        raise UsageError("--where, --nprobe and --exact search a photo store: give it with --index STORE")
    searcher = _searcher(args)
    if args.index is not None:
        from .search.commands import search_store

        return search_store(args, searcher)
    index = _gallery(args, searcher, progress=not args.json)
    if index is None:
        raise UsageError("give the gallery to search: --images DIR or --index INDEX")
    if args.prompt is not None:
        _warn_if_cut(searcher, args.prompt.strip())
        query = searcher.embed_texts([args.prompt.strip()])
    else:
        vectors, failed = searcher.embed_paths([args.image])
        if failed:
            raise DataError(f"cannot read query image {args.image}: {failed[0][1]}")
        query = vectors
    hits = index.search(query, args.top_k)[0]
    captions = _gallery_captions(index.root)  # a split of a data folder: what each hit shows, by its caption
    if args.json:
        results = [{"rank": h.rank, "path": str(h.path), "score": round(h.score, 6)} for h in hits]
        for result in results:
            if (caption := captions.get(Path(result["path"]))) is not None:
                result["caption"] = caption
        print(json.dumps({"query": args.prompt or str(args.image), "results": results}, indent=2))
    else:
        print(f"top {len(hits)} of {len(index)} images for {_shortened(args.prompt or str(args.image))!r}:")
        for h in hits:
            shown = f"  <- {captions[h.path]}" if h.path in captions else ""
            print(f"{h.rank:>3}. {h.score:.4f}  {h.path}{shown}")
    return 0


def _gallery_captions(folder: Path) -> dict[Path, str]:
    """The first caption of each image when the gallery is a split of a data folder (``<root>/images/<split>/`` beside
    ``<root>/captions_<split>.csv``), by image path; empty for any other folder or an unreadable CSV."""
    from .data.dataset import read_split

    if folder.parent.name != "images":
        return {}
    table, _ = read_split(folder.parent.parent, folder.name)  # rows with a problem are left out, nothing raised
    captions: dict[Path, str] = {}
    for i in range(len(table)):
        captions.setdefault(table.path(i), table.captions[i])
    return captions


def _warn_if_cut(searcher: Any, prompt: str) -> None:
    """Say so when the prompt is longer than the model's context: the model reads its first tokens only."""
    encoder = getattr(searcher, "onnx", None) or searcher.encoder  # OnnxSearcher / Searcher
    tokens = len(encoder.tokenizer(prompt, truncation=False)["input_ids"])
    if tokens > encoder.context_length:
        log.warning(
            "--prompt is %d tokens long; the model reads only the first %d (its context length), the rest is "
            "ignored: %r",
            tokens,
            encoder.context_length,
            _shortened(prompt),
        )


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _gallery(args: argparse.Namespace, searcher: Any, progress: bool) -> Any:
    """The index to search: --index (checked against the model), --images (cached), else the run's val images."""
    from .index import cached_gallery

    if args.index is not None:  # a photo store (`finderpartner index`), seen by the demo as a gallery
        from .search.faiss_store import FaissStore
        from .search.searcher import PhotoSearcher, StoreGallery

        store = FaissStore.open(args.index)
        PhotoSearcher(searcher, store, where=str(args.index))  # refuses another model's store
        return StoreGallery(store)
    images = args.images or _default_gallery(Path(getattr(searcher, "source", None) or args.model))
    if images is None:
        return None
    index, stats = cached_gallery(searcher, images, progress=progress)
    if stats.embedded or stats.removed:
        log.info("gallery %s: %s", images, stats)
    return index


def _run_split(model_dir: Path) -> tuple[Path, Path] | None:
    """(images folder, captions CSV) of the validation split of the run that produced the model, if found.

    A relative data.root is relative to the folder the run was trained from: tried from there (known from the run
    folder's place, ``<that folder>/<output_dir>/<experiment>``) and from the working folder.
    """
    run_config = model_dir.parent / "config.yaml"
    if not run_config.is_file():
        log.info("%s has no run folder (no %s): its training data is unknown", model_dir, run_config)
        return None
    from .config import load_config

    cfg = load_config(run_config)
    split = cfg.data.val_split or cfg.data.train_split
    root = Path(cfg.data.root)
    roots = [root] if root.is_absolute() else [Path.cwd() / root]
    trained_in = _training_folder(model_dir.parent, cfg.output_dir, cfg.experiment)
    if not root.is_absolute() and trained_in is not None and trained_in != Path.cwd():
        roots.append(trained_in / root)
    for candidate in roots:
        if (candidate / "images" / split).is_dir():
            return candidate / "images" / split, candidate / f"captions_{split}.csv"
    log.info(
        "the model's run (%s) used data.root %s, but its %s images are not at %s",
        run_config,
        cfg.data.root,
        split,
        " nor ".join(str(c / "images" / split) for c in roots),
    )
    return None


def _training_folder(run_dir: Path, output_dir: str, experiment: str) -> Path | None:
    """The working folder a run was trained from, when its output_dir is relative: the run folder less its tail."""
    tail = (*Path(output_dir).parts, experiment)
    resolved = run_dir.resolve()
    if Path(output_dir).is_absolute() or ".." in tail or resolved.parts[-len(tail) :] != tail:
        return None
    return resolved.parents[len(tail) - 1]


def _default_gallery(model_dir: Path) -> Path | None:
    """No --images/--index: the validation images of the run that produced the model, if known."""
    found = _run_split(model_dir)
    if found is not None:
        log.info("no --images/--index given: using %s (the run's validation images)", found[0])
    return found[0] if found else None


def _export(args: argparse.Namespace) -> int:
    import tempfile

    from .embedding import model_fingerprint
    from .export import ExportError, export_onnx, format_verification, read_verification_inputs, verify_export
    from .model import load_model

    encoder = load_model(args.model, trust_pickle=args.trust_pickle)
    source = str(Path(args.model).resolve()) if Path(args.model).is_dir() else str(args.model)  # usable from any cwd
    info = export_onnx(
        encoder,
        args.out,
        fingerprint=model_fingerprint(encoder.model),
        fp16=args.fp16,
        int8=args.int8,
        exporter=args.exporter,
        opset=args.opset,
        source=source,
        overwrite=args.overwrite,
        progress=not args.json,
    )
    with tempfile.TemporaryDirectory() as tmp:
        images, captions = args.images, args.captions
        if images is None:
            images, run_captions = _run_split(Path(args.model)) or _sample_images(Path(tmp), encoder.image_spec.crop)
            captions = captions or run_captions
        paths, texts = read_verification_inputs(images, captions, args.verify_count)
        report = verify_export(encoder, args.out, paths, texts, progress=not args.json)
    claim_files(args.out, "export", {"model": source}, ["verification.json"])
    write_text_atomic(args.out / "verification.json", json.dumps(report.to_dict(), indent=2))
    if args.json:
        print(json.dumps({"export": info, "verification": report.to_dict()}, indent=2))
    else:
        print(format_verification(report))
        print(f"export folder: {args.out}")
    if not report.ok:
        raise ExportError(
            f"the ONNX export in {args.out} does not reproduce PyTorch (see the table above); "
            "try --exporter torchscript or another --opset"
        )
    return 0


def _sample_images(tmp: Path, size: int) -> tuple[Path, Path]:
    """A few synthetic sample images with captions, for verifying an export when no data is at hand."""
    from .data.sample import make_sample_data

    log.info("no --images given and the run's validation images were not found: verifying on synthetic sample images")
    root = make_sample_data(tmp / "sample", train_images=0, val_images=16, image_size=max(32, size)).root
    return root / "images" / "val", root / "captions_val.csv"


def _demo(args: argparse.Namespace) -> int:
    from .demo import launch_demo

    searcher = _searcher(args)
    index = _gallery(args, searcher, progress=True)
    if index is None:
        log.warning("no gallery (--index or --images): the gallery search tab stays empty")
    try:  # Gradio's serving loop closes the server on a KeyboardInterrupt (signals.py: SIGTERM raises one too)
        launch_demo(searcher, index, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    except KeyboardInterrupt:
        pass
    if signals.received():
        print(f"demo stopped by {signals.received()}: the server is closed", file=sys.stderr)
        return INTERRUPTED
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .search.backends import open_store, store_version
    from .serve import LiveStore, SearchService, ServeSettings, read_token, run

    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-pixels", args.max_pixels)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive (got {value})")
    if args.max_k < 1 or args.max_batch < 1:
        raise UsageError("--max-k and --max-batch must be at least 1")
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        token=read_token(args.token_file, dict(os.environ)),
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        max_batch=args.max_batch,
        search_threads=args.search_threads,
        reload_interval_s=args.reload_interval,
    )
    args.batch_size, args.workers = args.max_batch, 0  # an upload is one image: no decoding processes
    searcher = _searcher(args)
    fingerprint = searcher.fingerprint
    live = LiveStore(lambda: open_store(args.index, fingerprint=fingerprint), store_version(args.index), fingerprint)
    service = SearchService(searcher, live, settings, model=str(args.model), store=str(args.index))
    try:
        run(service, log_level="info" if args.verbose else "warning", announce=lambda line: print(line, flush=True))
    except KeyboardInterrupt:  # uvicorn re-raises the signal it stopped for, once the requests in flight are done
        pass
    finally:
        service.close()
    if signals.received():
        print(f"serve stopped by {signals.received()}: the requests in flight were answered", file=sys.stderr)
        return INTERRUPTED
    return 0


# --------------------------------------------------------------------------------------------------------------
# WiSE-FT: merge, and eval --sweep-alpha

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


def _add_merge_command(sub: Any) -> None:
    p = _command(
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
    _add_trust_pickle(p)
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
    from .merge import Merger
    from .model import load_model

    base = load_model(args.base, trust_pickle=args.trust_pickle)
    finetuned = load_model(args.finetuned, trust_pickle=args.trust_pickle)
    return Merger(base, finetuned, sources=(str(args.base), str(args.finetuned)))


def _merge(args: argparse.Namespace) -> int:
    from .merge import claim_merge_output, write_merged

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
    from .data.sources import EvalSet, require_retrievable
    from .data.validate import require_usable, validate_split

    table = require_usable(
        validate_split(data, split, tokenizer=encoder.tokenizer, context_length=encoder.context_length),
        "raise",
        evaluating=True,
    )
    return require_retrievable(
        EvalSet.from_table(table), f"split {split!r}", "evaluate on a split with more images"
    ), table


def _eval_sweep(args: argparse.Namespace) -> int:
    from .env import autocast_factory
    from .evaluate import evaluate_split
    from .merge import claim_sweep_output, format_sweep, sweep, sweep_record, write_sweep_report
    from .model import set_attention

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
    claim_sweep_output(out, protect)  # before the models load and the sweep runs
    merger = _merger(args)
    device, precision = _runtime(args)
    sets = []
    for i, (data, split) in enumerate(wanted):
        eval_set, table = _sweep_set(data, split, merger.encoder)
        sets.append(eval_set)
        protect |= {f"images{i + 1}": table.image_dir, f"captions{i + 1}": table.csv_path}

    def evaluate(encoder: Any) -> list[Any]:
        set_attention(encoder.model, "auto", device)  # as `eval` does
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


# --------------------------------------------------------------------------------------------------------------
# open_clip <-> transformers


def _add_convert_command(sub: Any) -> None:
    p = _command(
        sub,
        "convert",
        "convert between open_clip checkpoints and transformers CLIPModel folders",
        description="Convert a CLIP between open_clip and transformers, both ways, for the ViT CLIPs both libraries\n"
        "share (timm, ResNet or HF-text towers, attentional pooling and the towers model are refused).",
        examples="""
finderpartner convert --to hf --model ViT-B-32 --checkpoint open_clip_model.safetensors --out models/vit-b-32
finderpartner convert --to open_clip --model outputs/clip_tiny/best_model --out open_clip/clip_tiny
""",
        notes="""
--to hf: --model is an open_clip model name or model config JSON (with --checkpoint), or an open_clip folder
(open_clip_config.json + weights). --to open_clip: --model is a saved CLIPModel folder or hub id. The tokenizer
travels with the model; before anything is written, source and result embed the same images and texts and must
agree (cosine >= 0.9999, same token ids). How to load the result is printed.
""",
    )
    p.add_argument("--to", required=True, choices=["hf", "open_clip"], help="the library to convert to")
    p.add_argument(
        "--model",
        required=True,
        help="--to hf: open_clip model name, model config JSON or open_clip folder; --to open_clip: CLIPModel folder",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="open_clip weights (.safetensors; .pt/.bin need --trust-pickle), --to hf only",
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder to write (new, or an earlier conversion)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion of another model at --out")
    _add_trust_pickle(p)
    p.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    result = convert(
        args.to,
        args.model,
        args.out,
        checkpoint=args.checkpoint,
        trust_pickle=args.trust_pickle,
        overwrite=args.overwrite,
    )
    print(result.verification)
    print(f"written: {result.out}")
    print(result.usage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
