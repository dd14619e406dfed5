"""How a command stops on SIGINT (Ctrl-C) and SIGTERM (how SLURM, Kubernetes and cloud spot instances preempt a
job; SLURM also sends it ahead of the time limit with ``--signal``): both alike, and a second one kills at once.

* Every command (``interrupt_on_signals``, installed by ``cli.main``): the first signal raises
  ``KeyboardInterrupt`` where the program is, so every ``finally`` runs: temporary files are removed, earlier files
  stay (``outputs.write_output``), and the CLI exits with 130. ``index`` saves the images it embedded so far
  before it stops (``index.update_index``).
* ``train`` wants the step it is in finished, not torn (and in a multi-process run, every process at the same
  step): inside its loop ``StopRequest`` only records the signal; the loop asks at each step boundary, all
  processes vote (``processes.any_true``), and all write a checkpoint together before stopping.
* The second signal, of either kind, restores the default action and re-sends itself: the process ends at once.
* A signal that lands inside an ``import`` (the first seconds of a command import torch, transformers, ...) is
  handled right after it: a library interrupted mid-import is left half-initialised, and some swallow the
  ``KeyboardInterrupt`` and go on.
* DataLoader worker processes ignore both (``ignore_in_worker``): a terminal's Ctrl-C and SLURM's SIGTERM reach
  the whole process group, and a worker that died would stop the main process with an error of its own; the main
  process shuts its workers down, and they leave by themselves if it is killed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals this process received, first first


def name(signum: int) -> str:
    return signal.Signals(signum).name


def received() -> str | None:
    """The name of the first stop signal this process received (None: none)."""
    return name(_received[0]) if _received else None


def _kill_at_once(signum: int) -> None:
    """The default action for every stop signal from now on, then this one again: the process ends."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _in_import(frame):  # a library interrupted mid-import is left half-initialised (some swallow the
        _resend_soon(signum)  # KeyboardInterrupt and go on): raised once the import is done
        return
    if _received:
        _kill_at_once(signum)
    _received.append(signum)
    raise KeyboardInterrupt(name(signum))


def _in_import(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


_resending = threading.Event()


def _resend_soon(signum: int, delay_s: float = 0.05) -> None:
    """The same signal again in ``delay_s`` (one at a time), to be handled outside the import."""
    if _resending.is_set():
        return
    _resending.set()

    def again() -> None:
        _resending.clear()
        os.kill(os.getpid(), signum)

    timer = threading.Timer(delay_s, again)
    timer.daemon = True
    timer.start()


def _quiet_dead_peer(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` that drops one case: multiprocessing's resource-sharer thread (which hands file
    descriptors to DataLoader workers) failing to reach a worker a Ctrl-C or SIGTERM to the process group just
    ended. That thread calls ``sys.excepthook`` itself, so the stop printed a traceback beside its own message."""
    frames = traceback.extract_tb(tb)
    if issubclass(kind, (OSError, EOFError)) and any(f.filename.endswith("resource_sharer.py") for f in frames):
        log.debug("a DataLoader worker was gone before it got its data: %s: %s", kind.__name__, value)
        return
    _excepthook(kind, value, tb)


_excepthook = sys.excepthook


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` (the first one); the second kills at once. Main thread only."""
    if threading.current_thread() is threading.main_thread():
        sys.excepthook = _quiet_dead_peer
        for s in STOP_SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:  # nohup / a shell's background job: stays ignored
                signal.signal(s, _interrupt)


class StopRequest:
    """Within the block, the first SIGINT/SIGTERM is only recorded (``requested``) for the code to stop at a point
    of its choosing; the second kills at once. The handlers in place before are restored on leaving."""

    def __init__(self, what: str) -> None:
        self.what = what  # for the log line: what happens before the stop
        self.signum: int | None = None  # the signal this process received
        self.agreed = False  # set by the code that stopped (train: when every process voted to stop)
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            _kill_at_once(signum)
        self.signum = signum
        _received.append(signum)
        log.warning("%s received: %s, then stopping (send it again to stop at once)", name(signum), self.what)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def ignore_in_worker(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves stopping to the main process (module docstring)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
