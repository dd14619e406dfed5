"""check-env and init-config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import new_command


def add_check_env_command(sub: Any) -> None:
    p = new_command(
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


def _check_env(args: argparse.Namespace) -> int:
    from ..env import environment_report, format_report

    report = environment_report(config_path=args.config)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def add_init_config_command(sub: Any) -> None:
    p = new_command(
        sub,
        "init-config",
        "print a commented default config (YAML) on stdout",
        description="""
Print a config on stdout: every key with its meaning. A preset is one of the shipped configs/*.yaml, by its file
name: clip_base (ViT-B/32 on a 12 GB GPU), clip_tiny (the tiny CLIP on a CPU), minilm_tiny_vit (make run's),
finetune. Save it, edit it, train with it.""",
        examples="""
finderpartner init-config --preset clip_tiny > my_config.yaml
finderpartner init-config > mine.yaml && finderpartner train --config mine.yaml""",
    )
    p.add_argument(
        "--preset",
        default="clip_base",
        metavar="NAME",
        help="a shipped config by file name: clip_base (default), clip_tiny, minilm_tiny_vit, finetune",
    )
    p.set_defaults(handler=_init_config)


def _init_config(args: argparse.Namespace) -> int:
    from ..config import preset_path

    sys.stdout.write(preset_path(args.preset).read_text(encoding="utf-8"))
    return 0
