"""What the command modules share: the parser class (hidden flag spellings), shared arguments, loading a model
for inference, and where a run's data was."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import EXIT_CODES

log = logging.getLogger("finderpartner")


def runtime(args: argparse.Namespace) -> tuple[Any, str]:
    """The device and precision --device and --precision ask for ('auto': what this machine does best)."""
    from ..env import resolve_device, resolve_precision

    device = resolve_device(args.device)
    return device, resolve_precision(args.precision, device)


def load_for_inference(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``--model`` loaded for embedding: the encoder with the attention kernels training validated with (the same
    figures, faster), the device and the precision. Every command that embeds with the torch model uses this."""
    from ..model import load_model, set_attention

    device, precision = runtime(args)
    encoder = load_model(args.model, trust_pickle=args.trust_pickle)
    set_attention(encoder.model, "auto", device, precision)
    return encoder, device, precision


class Parser(argparse.ArgumentParser):
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


def hidden_alias(p: argparse.ArgumentParser, alias: str, flag: str) -> None:
    """Accept ``alias`` for ``flag`` without showing it (the seed's spellings, which its shims still pass)."""
    assert isinstance(p, Parser) and flag in p._option_string_actions, flag
    p.hidden_aliases[alias] = flag


def new_command(
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


def exit_code_table() -> str:
    """The exit codes, one per line (printed by --help; README carries the same table, checked by a test)."""
    return "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (see `finderpartner init-config`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )


def add_trust_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also load pickle weights (pytorch_model.bin) when the model has no safetensors; pickle can "
        "run arbitrary code: only for a model from a source you trust",
    )


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high], else argparse's usage error (exit 2) saying the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound} (got {value})")
        return value

    return parse


PORT = whole_number(0, 65535)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=whole_number(1), default=64, help="images embedded at once")
    p.add_argument("--workers", type=whole_number(0), default=2, help="image-decoding worker processes")


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnx"],
        help="onnx: embed with an export folder (--model is then the folder `finderpartner export` wrote)",
    )
    p.add_argument("--onnx-variant", default="fp32", choices=["fp32", "fp16", "int8"], help="with --backend onnx")


def run_split(model_dir: Path) -> tuple[Path, Path] | None:
    """(images folder, captions CSV) of the validation split of the run that produced the model, if found.

    A relative data.root is relative to the folder the run was trained from: tried from there (known from the run
    folder's place, ``<that folder>/<output_dir>/<experiment>``) and from the working folder.
    """
    run_config = model_dir.parent / "config.yaml"
    if not run_config.is_file():
        log.info("%s has no run folder (no %s): its training data is unknown", model_dir, run_config)
        return None
    from ..config import load_config

    cfg = load_config(run_config)
    split = cfg.data.val_split or cfg.data.train_split
    root = Path(cfg.data.root)
    roots = [root] if root.is_absolute() else [Path.cwd() / root]
    trained_in = training_folder(model_dir.parent, cfg.output_dir, cfg.experiment)
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


def training_folder(run_dir: Path, output_dir: str, experiment: str) -> Path | None:
    """The working folder a run was trained from, when its output_dir is relative: the run folder less its tail."""
    tail = (*Path(output_dir).parts, experiment)
    resolved = run_dir.resolve()
    if Path(output_dir).is_absolute() or ".." in tail or resolved.parts[-len(tail) :] != tail:
        return None
    return resolved.parents[len(tail) - 1]


def image_folders(data: Any) -> dict[str, Path]:
    """The folders a zero-shot set's images lie in (a CSV's own folder aside: a report may go beside it)."""
    if data.source.is_dir():
        return {"images": data.source}
    folders = sorted({image.parent for image in data.images} - {data.source.parent})
    return {"images" + (f" {i + 1}" if i else ""): folder for i, folder in enumerate(folders)}


def launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun, accelerate launch, SLURM's srun) started several, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return int(os.environ.get("RANK", "0")) if world > 1 else None
    except ValueError:
        return None
