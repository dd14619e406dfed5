"""The ``finderpartner`` command. The only package that parses argv, sets up logging and chooses exit codes.

One module per command family, each with its parsers beside its handlers: ``environment`` (check-env,
init-config), ``data`` (sample-data, validate-data, make-shards), ``training`` (train, trial), ``evaluation``
(eval, merge), ``search`` (index, search, demo), ``interop`` (export, convert); ``common`` holds the parser
class, shared arguments and the model loading the inference commands share."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__, progress, signals
from ..errors import (
    BROKEN_PIPE,
    INTERNAL_ERROR,
    INTERRUPTED,
    FinderPartnerError,
    Stopped,
)
from ..outputs import storage_error
from .common import Parser, exit_code_table, launched_rank
from .data import add_make_shards_command, add_sample_data_command, add_validate_data_command
from .environment import add_check_env_command, add_init_config_command
from .evaluation import add_eval_command, add_merge_command
from .interop import add_convert_command, add_export_command
from .search import add_demo_command, add_index_command, add_search_command
from .serve import add_serve_command
from .training import add_train_command, add_trial_command

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
        rank = launched_rank()
        label = "stopped" if isinstance(e, Stopped) else "error"
        print(f"{'' if rank is None else f'[rank {rank}] '}{label}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # stdout's reader is gone (`| head`): not a bug, and nothing more can be printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit, when Python flushes stdout
        return BROKEN_PIPE
    except KeyboardInterrupt:
        hint = (
            "; a training continues from its last checkpoint with --resume auto"
            if getattr(args, "resumable", False)
            else ""
        )
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
        add_check_env_command,
        add_init_config_command,
        add_sample_data_command,
        add_validate_data_command,
        add_make_shards_command,
        add_train_command,
        add_trial_command,
        add_eval_command,
        add_merge_command,
        add_index_command,
        add_search_command,
        add_export_command,
        add_demo_command,
        add_serve_command,
        add_convert_command,
    ):
        add(sub)
    return parser


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
    rank = launched_rank()
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
