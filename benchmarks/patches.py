"""Candidate speed-ups of our trainer, applied by monkeypatching inside the benchmark process (src/ is untouched).

    python benchmarks/patches.py --patch fused_adamw,threads=1 -- train --config configs/clip_tiny.yaml ...

runs ``finderpartner`` with the named patches applied first. Each patch is small and says what the equivalent
change in src/ would be; ``train_throughput.py --ours-patch`` and ``profile_ours.py`` measure them against the
unpatched trainer in the same run. A patch whose target no longer exists (src/ changes under us) fails loudly
instead of silently measuring nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    """Run ``hook(run)`` on the trainer's ``_Run`` right after ``train._setup`` built it."""
    from finderpartner import train

    original = _require(train, "_setup")

    def setup(*args: Any, **kwargs: Any) -> Any:
        run = original(*args, **kwargs)
        hook(run)
        return run

    train._setup = setup


# ---------------------------------------------------------------------------------------------------------------
# Optimizer


def _adamw_variant(**flags: bool) -> None:
    """Rebuild the optimizer with the same parameter groups and hyper-parameters, plus ``flags``."""
    import torch

    from finderpartner import train

    original = _require(train, "_optimizer")

    def optimizer(model: Any, cfg: Any) -> torch.optim.Optimizer:
        base = original(model, cfg)
        groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay", "lr")} for g in base.param_groups]
        d = base.defaults
        return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], **flags)

    train._optimizer = optimizer


@patch("fused_adamw")
def _fused(_: str | None) -> None:
    """src change: ``torch.optim.AdamW(..., fused=True)`` (one fused kernel over all parameters)."""
    _adamw_variant(fused=True)


@patch("foreach_adamw")
def _foreach(_: str | None) -> None:
    """src change: ``torch.optim.AdamW(..., foreach=True)`` (multi-tensor; on CPU the default is the per-tensor loop)."""
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


# Vision sequences up to this many tokens train faster with eager attention than with PyTorch's CPU flash
# kernel (measured fwd+bwd, tiny spec, batch 64: 65 tokens 1.45x, 145 tokens 1.47x, 257 tokens 1.14x faster;
# 785 tokens 2.5x slower).
EAGER_MAX_TOKENS = 300


@patch("attention")
def _attention(value: str | None) -> None:
    """src change: on CPU, ``model.set_attn_implementation`` per tower: eager for short sequences, sdpa otherwise.

    ``attention=eager`` forces eager in both towers; ``attention=auto`` (default) applies the token rule above.
    PyTorch's CPU flash-attention backward dominates the step for short sequences (36% of it at 64 px).
    """
    mode = value or "auto"

    def hook(run: Any) -> None:
        if run.device.type != "cpu":
            return
        cfg = run.model.config
        vision_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
        vision = "eager" if mode == "eager" or vision_tokens <= EAGER_MAX_TOKENS else "sdpa"
        run.model.set_attn_implementation({"vision_config": vision, "text_config": "eager"})
        log.warning("attention: vision %s (%d tokens), text eager", vision, vision_tokens)

    _after_setup(hook)


@patch("channels_last")
def _channels_last(_: str | None) -> None:
    """src change: model and pixel batches in channels-last memory format (only the patch embedding is a conv)."""
    import torch

    from finderpartner import memory

    normalize = _require(memory, "normalize")

    def channels_last(pixels: Any, spec: Any, *args: Any, **kwargs: Any) -> Any:
        return normalize(pixels, spec, *args, **kwargs).contiguous(memory_format=torch.channels_last)

    memory.normalize = channels_last
    _after_setup(lambda run: run.model.to(memory_format=torch.channels_last))


# ---------------------------------------------------------------------------------------------------------------
# Data loading


@patch("prefetch")
def _prefetch(value: str | None) -> None:
    """src change: ``prefetch_factor=N`` in ``train._train_loader`` (ours uses 4; PyTorch's default is 2)."""
    _loader_kwargs(prefetch_factor=int(value or 2))


@patch("no_persistent")
def _no_persistent(_: str | None) -> None:
    """Workers re-created every epoch (what open_clip does); ours keeps them (``persistent_workers=True``)."""
    _loader_kwargs(persistent_workers=False)


def _loader_kwargs(**changes: Any) -> None:
    from finderpartner import train

    loader_cls = _require(train, "DataLoader")

    def loader(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("num_workers", 0) > 0:
            kwargs.update(changes)
        return loader_cls(*args, **kwargs)

    train.DataLoader = loader


def decode_cache(
    table: Any, transform: Any, max_pixels: int | None = None, threads: int | None = None
) -> tuple[list[Any], dict[str, float]]:
    """Every image of ``table`` decoded once, pre-resized to the smallest size the augmentation needs.

    The shorter side becomes ``ceil(crop / sqrt(min crop area))``: a random resized crop of the cached image
    then never has fewer pixels than it would have had from the original. Returns one uint8 array per row
    (rows naming the same image share it) and build statistics.
    """
    import numpy as np
    from PIL import Image

    from finderpartner.data.transforms import load_image

    crop = transform.spec.crop
    side = math.ceil(crop / math.sqrt(min(transform.crop_scale)))
    start = time.perf_counter()
    names, row_to_image = table.images()

    def decode(name: str) -> Any:
        img = load_image(table.image_dir / name, max_pixels)  # a one-off cost: no JPEG draft tricks needed
        if min(img.size) > side:
            scale = side / min(img.size)
            size = (max(side, round(img.width * scale)), max(side, round(img.height * scale)))
            img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 2) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(decode, names))
    stats = {"images": len(arrays), "side": side, "seconds": time.perf_counter() - start,
             "megabytes": sum(a.nbytes for a in arrays) / 2**20}  # fmt: skip
    return [arrays[i] for i in row_to_image], stats


def cached_getitem(self: Any, key: tuple[int, int]) -> Any:
    """``PairDataset.__getitem__`` reading the decoded cache instead of the file."""
    import torch
    from PIL import Image

    index, seed = key
    rng = torch.Generator().manual_seed(seed)
    pixels, caption = self.transform(Image.fromarray(self._cache[index]), self.table.captions[index], rng)
    return {"index": index, "pixel_values": pixels, "caption": caption}


@patch("decoded_cache")
def _decoded_cache(_: str | None) -> None:
    """src change: decode every training image once per run (not once per epoch), pre-resized (see decode_cache).

    Built in the main process before the workers fork (they share it copy-on-write). Memory: images x side^2 x 3
    bytes (4000 images at 72 px: 60 MB; at 250 px: 750 MB).
    """
    from finderpartner.data import dataset

    original_init = _require(dataset.PairDataset, "__init__")

    def init(self: Any, table: Any, transform: Any, max_pixels: int | None = None) -> None:
        original_init(self, table, transform, max_pixels)
        self._cache, stats = decode_cache(table, transform, max_pixels)
        log.warning(
            "decoded_cache: %(images)d images cached at %(side)d px in %(seconds).1fs (%(megabytes).0f MB)", stats
        )

    dataset.PairDataset.__init__ = init
    dataset.PairDataset.__getitem__ = cached_getitem


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
