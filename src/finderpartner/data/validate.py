"""Check a split before training: every problem in the CSV and the image files, reported at once.

Images are fully decoded (a truncated JPEG only fails when its pixels are read), in threads: PIL releases the
GIL while decoding. Images that decode but are unusual (alpha, palette, 16-bit, CMYK, EXIF rotation) are not
problems: ``transforms.load_image`` converts them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..progress import Progress
from .dataset import PairTable, Problem, read_split
from .transforms import ImageTooLarge, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitReport:
    split: str
    table: PairTable  # the usable rows
    problems: tuple[Problem, ...]
    rows_total: int  # data rows in the CSV, usable or not

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    def describe(self, limit: int | None = 50) -> str:
        lines = [f"{self.split}: {len(self.table)} usable pair(s) of {self.rows_total}; {len(self.fatal)} problem(s)"]
        shown = self.problems if limit is None else self.problems[:limit]
        lines += [f"  - {p}" + ("" if p.fatal else " (warning)") for p in shown]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


def validate_split(
    root: str | Path,
    split: str,
    *,
    max_pixels: int | None = None,
    tokenizer: Any = None,
    context_length: int | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> SplitReport:
    """Read and check one split; the report's table holds only the rows without a fatal problem."""
    table, problems = read_split(root, split)
    rows_total = len(table) + sum(1 for p in problems if p.line is not None and p.fatal)
    bad_images = _check_images(table, max_pixels, workers, progress)
    keep = []
    for i in range(len(table)):
        reason = bad_images.get(table.filenames[i])
        if reason is None:
            keep.append(i)
        else:
            problems.append(
                Problem(str(table.csv_path), table.lines[i], reason[0], f"{table.filenames[i]!r}: {reason[1]}")
            )
    table = table.select(keep)
    if tokenizer is not None and context_length and len(table):
        problems += _long_captions(table, tokenizer, context_length)
    problems.sort(key=lambda p: (p.file, p.line or 0))
    return SplitReport(split, table, tuple(problems), rows_total)


MIN_IMAGES = 2  # an evaluated split (eval, data.val_split) needs 2 distinct images: with 1 retrieval means nothing


def retrieval_problem(report: SplitReport) -> Problem | None:
    """The split-level problem of a split with too few distinct usable images to be evaluated (the rule train and
    eval apply: ``sources.require_retrievable``), so that validate-data reports it too."""
    images = len(report.table.images()[0])
    if images >= MIN_IMAGES:
        return None
    return Problem(
        report.table.name,
        None,
        "too_few_images",
        f"{images} distinct usable image(s) in {len(report.table)} pair(s): eval and training (as data.val_split) "
        f"need at least {MIN_IMAGES} (with one, the loss is undefined and every recall is 1.0); add images",
    )


def require_usable(report: SplitReport, on_error: str, *, evaluating: bool = False) -> PairTable:
    """Apply ``data.on_error``: 'raise' refuses any fatal problem, 'skip' drops the rows that have one.

    ``evaluating``: for eval, which reads every row of its split and has no data.on_error to offer."""
    if report.fatal and on_error == "raise":
        rows = any(p.line is not None and p.kind != "bad_header" for p in report.fatal)
        if not rows:  # the split itself is missing or unreadable: no row to fix or skip
            raise DataError(report.describe())
        advice = (
            "Fix these rows (eval reads every row of the split)."
            if evaluating
            else f"Fix these rows, or set data.on_error: skip to train on the {len(report.table)} usable pairs."
        )
        raise DataError(f"{report.describe()}\n{advice}")
    for p in report.problems:
        log.warning("%s%s", p, "" if p.fatal else " (warning)")
    if report.fatal:
        log.warning(
            "%s: skipping %d bad row(s); training on %d pair(s)", report.split, len(report.fatal), len(report.table)
        )
    if len(report.table) == 0:
        raise DataError(f"{report.split}: no usable pairs in {report.table.name}")
    return report.table


def _check_images(
    table: PairTable, max_pixels: int | None, workers: int | None, progress: bool
) -> dict[str, tuple[str, str]]:
    unique = sorted(set(table.filenames))

    def check(name: str) -> tuple[str, tuple[str, str] | None]:
        path = table.image_dir / name
        try:
            if os.path.getsize(path) == 0:
                return name, ("empty_file", "zero-byte file")
            load_image(path, max_pixels)
        except ImageTooLarge as e:
            return name, ("decompression_bomb", str(e))
        except Exception as e:
            kind = "truncated_image" if "truncated" in str(e).lower() else "not_an_image"
            return name, (kind, f"cannot be decoded as an image ({type(e).__name__}: {e})")
        return name, None

    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(check, unique)
        results = Progress(
            results, total=len(unique), desc="checking images", unit="img", disable=not progress, leave=False
        )
        return {name: reason for name, reason in results if reason is not None}


def _long_captions(table: PairTable, tokenizer: Any, context_length: int) -> list[Problem]:
    cut = long_captions_note(list(table.captions), tokenizer, context_length)
    if cut is None:
        return []
    return [Problem(str(table.csv_path), table.lines[cut[0]], "caption_truncated", cut[1], fatal=False)]


def long_captions_note(captions: list[str], tokenizer: Any, context_length: int) -> tuple[int, str] | None:
    """(index of the first, one-line note) of the captions longer than the context, which the model cuts; else None.

    Each distinct caption is tokenised once (fast tokenizers do a data set's captions in seconds).
    """
    distinct = list(dict.fromkeys(captions))
    if not distinct:
        return None
    lengths = [len(ids) for ids in tokenizer(distinct, truncation=False)["input_ids"]]
    long = {c for c, n in zip(distinct, lengths) if n > context_length}
    if not long:
        return None
    first = next(i for i, c in enumerate(captions) if c in long)
    count = sum(1 for c in captions if c in long)
    example = captions[first] if len(captions[first]) <= 80 else captions[first][:77] + "..."
    return first, (
        f"{count} of {len(captions)} captions ({len(long)} distinct) are longer than the model's "
        f"{context_length}-token context and are cut, e.g. {example!r}"
    )
