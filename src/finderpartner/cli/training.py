"""train and trial."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from ..errors import (
    INTERRUPTED,
    Stopped,
)
from .common import add_config_args, launched_rank, new_command


def add_train_command(sub: Any) -> None:
    p = new_command(
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
    add_config_args(p)
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
    p.set_defaults(handler=_train, resumable=True)  # Ctrl-C's message says --resume auto


def _train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data.sample import make_sample_data
    from ..train import train

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
        if launched_rank():  # the other processes of a multi-process run: the main one says how to go on
            raise
        again = ["finderpartner", "train", *(["--config", str(args.config)] if args.config else [])]
        again += [x for o in args.overrides for x in ("--set", o)] + ["--resume", "auto"]
        raise Stopped(
            f"{e}: {shlex.join(again)}" + (" (with the same launcher)" if launched_rank() == 0 else "")
        ) from None
    if result.is_main:
        print(f"best model: {result.best_model}")
    return 0


def add_trial_command(sub: Any) -> None:
    p = new_command(
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
    add_config_args(p)
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


def _trial(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()  # --seconds counts the imports too
    from ..config import load_config
    from ..train import format_report, parse_size, run_trial

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
