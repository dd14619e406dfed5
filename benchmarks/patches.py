"""Candidate speed-ups of our trainer, applied by monkeypatching inside the benchmark process (src/ is untouched).

    python benchmarks/patches.py --patch unfused_adamw,threads=1 -- train --config configs/clip_tiny.yaml ...

runs ``finderpartner`` with the named patches applied first. Speed-ups the measurements justified are in src/
now and have config switches for A/B runs instead of patches: ``model.attention=sdpa`` (eager attention for
short CPU sequences off), ``data.cache_images=false`` (decoded-image cache off); ``unfused_adamw`` here undoes
the fused optimizer. Each patch is small and says what the equivalent
change in src/ would be; ``train_throughput.py --ours-patch`` and ``profile_ours.py`` measure them against the
unpatched trainer in the same run. A patch whose target no longer exists (src/ changes under us) fails loudly
instead of silently measuring nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("finderpartner.bench.patches")
PATCHES: dict[str, Callable[[str | None], None]] = {}


def patch(name: str) -> Callable[[Callable[[str | None], None]], Callable[[str | None], None]]:
    def register(fn: Callable[[str | None], None]) -> Callable[[str | None], None]:
        PATCHES[name] = fn
        return fn

    return register


def _require(module: Any, attr: str) -> Any:
    if not hasattr(module, attr):
        raise RuntimeError(f"patch target {module.__name__}.{attr} no longer exists: update benchmarks/patches.py")
    return getattr(module, attr)


def _after_setup(hook: Callable[[Any], None]) -> None:
    """Run ``hook(run)`` on the trainer's ``Run`` right after ``train.setup`` built it."""
    from finderpartner.train import recipe as train

    original = _require(train, "setup")

    def setup(*args: Any, **kwargs: Any) -> Any:
        run = original(*args, **kwargs)
        hook(run)
        return run

    train.setup = setup


# ---------------------------------------------------------------------------------------------------------------
# Optimizer


def _adamw_variant(**flags: bool) -> None:
    """Rebuild the optimizer with the same parameter groups and hyper-parameters, plus ``flags``."""
    import torch

    from finderpartner.train import recipe as train

    original = _require(train, "build_optimizer")

    def optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        base = original(*args, **kwargs)
        groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay", "lr")} for g in base.param_groups]
        d = base.defaults
        return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], **flags)

    train.build_optimizer = optimizer


@patch("unfused_adamw")
def _unfused(_: str | None) -> None:
    """Undo a kept change: PyTorch's per-tensor AdamW loop instead of ours' ``fused=True``."""
    _adamw_variant(fused=False, foreach=False)


@patch("foreach_adamw")
def _foreach(_: str | None) -> None:
    """Variant to compare against ours' ``fused=True``: ``torch.optim.AdamW(..., foreach=True)`` (multi-tensor)."""
    _adamw_variant(foreach=True)


# ---------------------------------------------------------------------------------------------------------------
# Threads, compile, memory format


@patch("threads")
def _threads(value: str | None) -> None:
    """src change: ``torch.set_num_threads(N)`` in the training process (DataLoader workers use 1 thread each)."""
    import torch

    torch.set_num_threads(int(value or 1))


@patch("interop")
def _interop(value: str | None) -> None:
    """src change: ``torch.set_num_interop_threads(N)`` in the training process."""
    import torch

    torch.set_num_interop_threads(int(value or 1))


@patch("compile")
def _compile(value: str | None) -> None:
    """src change: compile the two towers' forward methods (state_dict keys stay as they are).

    ``compile=reduce-overhead`` etc. passes a mode; the default mode otherwise.
    """
    import torch

    def hook(run: Any) -> None:
        kwargs = {"mode": value} if value else {}
        for tower in (run.model.vision_model, run.model.text_model):
            tower.forward = torch.compile(
                tower.forward, **kwargs
            )  # dynamic=None: a new caption length marks it dynamic

    _after_setup(hook)


@patch("channels_last")
def _channels_last(_: str | None) -> None:
    """src change: model and pixel batches in channels-last memory format (only the patch embedding is a conv)."""
    import torch

    from finderpartner import model

    normalize = _require(model, "normalize")  # what DualEncoder.encode_images normalises pixel batches with

    def channels_last(pixels: Any, spec: Any, *args: Any, **kwargs: Any) -> Any:
        return normalize(pixels, spec, *args, **kwargs).contiguous(memory_format=torch.channels_last)

    model.normalize = channels_last
    _after_setup(lambda run: run.model.to(memory_format=torch.channels_last))


# ---------------------------------------------------------------------------------------------------------------
# Data loading


@patch("prefetch")
def _prefetch(value: str | None) -> None:
    """src change: ``prefetch_factor=N`` in ``data.sources.Loading.loader_options`` (ours: 4; PyTorch's default: 2)."""
    _loader_kwargs(prefetch_factor=int(value or 2))


@patch("no_persistent")
def _no_persistent(_: str | None) -> None:
    """Workers re-created every epoch (what open_clip does); ours keeps them (``persistent_workers=True``)."""
    _loader_kwargs(persistent_workers=False)


def _loader_kwargs(**changes: Any) -> None:
    """Change the DataLoader options of training (``data.sources.Loading.loader_options``) when workers are used."""
    from finderpartner.data.sources import Loading

    original = _require(Loading, "loader_options")

    def loader_options(self: Any, *, persistent: bool) -> dict[str, Any]:
        options = original(self, persistent=persistent)
        if options.get("num_workers", 0) > 0:
            options.update(changes)
        return options

    Loading.loader_options = loader_options


# ---------------------------------------------------------------------------------------------------------------


def apply(spec: str) -> list[str]:
    """Apply ``name[=value],...``; returns the names applied."""
    applied = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in PATCHES:
            raise SystemExit(f"unknown patch {name!r}; known: {', '.join(sorted(PATCHES))}")
        PATCHES[name](value or None)
        applied.append(item)
    return applied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", default="", help=f"comma-separated patches: {', '.join(sorted(PATCHES))}")
    parser.add_argument("--list", action="store_true", help="list the patches and exit")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then finderpartner arguments")
    ns = parser.parse_args()
    if ns.list:
        for name, fn in sorted(PATCHES.items()):
            print(f"{name:15s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    applied = apply(ns.patch)
    print(f"benchmarks/patches.py: applied {applied or 'nothing'}", file=sys.stderr, flush=True)
    from finderpartner.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
