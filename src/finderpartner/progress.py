"""How the progress of a long loop is shown: the one place that decides, for every loop that reports it.

* **On a terminal** (stderr is a TTY): a tqdm bar on stderr.
* **In a log** (stderr is a pipe or a file: CI, ``nohup``, ``| tee``): no bar and no ``\\r``, but a plain INFO
  line each time another tenth of the work is done, and at least every 30 s (a loop of unknown length gets
  only those), with the rate and the time left; no two lines within a second (a loop done in a second logs
  one line, when it ends).
* **Nothing** when the caller turns it off (``--json``, a process other than the main one), under ``-q`` (the
  ``finderpartner`` logger is above INFO: progress is shown exactly when INFO lines are), or when the
  environment says ``TQDM_DISABLE=1``.

``Progress`` takes tqdm's arguments for what the package uses of them (``total``, ``desc``, ``unit``,
``initial``, ``leave``, ``disable``), so a loop reads as it would with tqdm. tqdm is imported only for a bar.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("finderpartner.progress")

FRACTION = 0.1  # a log line per tenth of the work
SECONDS = 30.0  # and at least one this often (the only ones when the total is unknown)
MIN_GAP = 1.0  # but never two within this many seconds (the last line, at the end, aside)

BAR, LINES, OFF = "bar", "lines", "off"


def format_duration(seconds: float) -> str:
    """'42 s', '3.5 min', '1.2 h'."""
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


def display(enabled: bool = True) -> str:
    """How progress is shown now: BAR, LINES or OFF (see the module's docstring)."""
    if not enabled or _env_true("TQDM_DISABLE") or not log.isEnabledFor(logging.INFO):
        return OFF
    return BAR if _isatty(sys.stderr) else LINES


class Progress:
    """A progress report over ``iterable`` (iterate it) or over ``update()`` calls; close it, or use ``with``."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        leave: bool = True,
        disable: bool = False,
    ):
        if total is None and iterable is not None:
            with contextlib.suppress(TypeError):  # no len(): a generator, a DataLoader over an IterableDataset
                total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._start_n = self._logged_n = initial
        self.postfix = ""
        self.mode = display(not disable)
        self._bar: Any = None
        self._start = self._logged_at = time.monotonic()
        self._logged_tenth = self._tenth(initial)
        if self.mode == BAR:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True, file=sys.stderr
            )

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this Progress counts update() calls; give it an iterable to iterate")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == LINES:
            now = time.monotonic()
            since = now - self._logged_at
            if since >= SECONDS or (since >= MIN_GAP and self._tenth(self.n) > self._logged_tenth):
                self._log_line(now)

    def set_total(self, total: int | None) -> None:
        """The total once it is known (a training's time budget decides its step count after some steps)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()
        self._logged_tenth = max(self._logged_tenth, self._tenth(self._logged_n))

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (``loss=0.512``): at the bar's end, or at the end of each log line."""
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == LINES and self.n > self._logged_n:
            self._log_line(time.monotonic())  # the last stretch, whatever fraction it was
        self.mode = OFF

    # -- log lines

    def _tenth(self, n: int) -> int:
        return math.floor(n / self.total / FRACTION + 1e-9) if self.total else 0

    def _log_line(self, now: float) -> None:
        self._logged_n, self._logged_at, self._logged_tenth = self.n, now, self._tenth(self.n)
        log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc: unit n/total (p%), rate, elapsed, ETA; postfix``: what a log line says."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [
            f"{self.unit} {self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
            if self.total
            else f"{self.unit} {self.n}"
        ]
        if rate >= 1:
            parts.append(f"{rate:.0f} {self.unit}/s" if rate >= 100 else f"{rate:.1f} {self.unit}/s")
        elif rate > 0:
            parts.append(f"{1 / rate:.1f} s/{self.unit}")
        parts.append(f"{format_duration(round(elapsed, 1))} elapsed")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {format_duration(round((self.total - self.n) / rate, 1))}")
        text = f"{self.desc}: " + ", ".join(parts) if self.desc else ", ".join(parts)
        return f"{text}; {self.postfix}" if self.postfix else text


def routed_logging() -> contextlib.AbstractContextManager[Any]:
    """While bars are drawn, log lines go through tqdm (printed above the bar, not through it)."""
    if display() != BAR:
        return contextlib.nullcontext()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # check-env must still run, and say to install tqdm
        return contextlib.nullcontext()
    return logging_redirect_tqdm(loggers=[logging.getLogger("finderpartner")])


def quiet_other_bars() -> None:
    """No bar from transformers or huggingface_hub (loading and saving weights, downloads) unless ours are bars.

    Call before they are imported (they read ``HF_HUB_DISABLE_PROGRESS_BARS`` then); a value already set wins.
    """
    if display() != BAR:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False
