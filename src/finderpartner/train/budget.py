"""Training by time budget: how many steps fit, decided once from the measured throughput of the first steps.

``train.time_budget`` counts from the start of ``train`` (start-up included). The loop trains
``SKIP_STEPS`` steps untimed (data workers starting, allocator, kernels being chosen), times the next
``MEASURE_STEPS`` (validation and checkpoint time left out), and then fixes the total step count so that the
remaining steps, validations and checkpoints end within the budget. The decision is saved in the trainer
state of every later checkpoint: a resumed run keeps it and never measures again. The warm-up is at least as
long as the measurement, so every learning rate taken before the decision is a warm-up rate that does not
depend on the total: a budget run equals a ``max_steps`` run of the decided length with the same warm-up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..data.sources import EvalSet
from ..evaluate import evaluate_split
from ..progress import format_duration
from .step import capture_rng, restore_rng

if TYPE_CHECKING:
    from .recipe import Run

log = logging.getLogger(__name__)

SKIP_STEPS = 10  # untimed first steps of each process's loop (the first 8 come from batches prefetched at start)
MEASURE_STEPS = 20  # timed steps before the decision
MIN_MEASURE_STEPS = 5  # when a resumed run has less of its warm-up left than MEASURE_STEPS
MARGIN = 0.93  # plan for this share of the time left: later steps ran up to 10% slower than the timed ones
UNDECIDED = 10**12  # the provisional total while the decision is pending (only warm-up rates are asked for)


@dataclass
class Plan:
    """The run's step count: fixed from the config, or decided by a time budget once the throughput is known."""

    total: int  # the steps of the run; a provisional upper bound until ``decided``
    warmup: int  # learning-rate warm-up steps
    budget_s: float | None = None
    cap: int | None = None  # train.max_steps: a time budget never plans more
    start: float = 0.0  # perf_counter() when the budget started counting
    decided: bool = True
    reused: bool = False  # the decision came from a checkpoint
    measure_from: int = 0  # global step after which the timing starts
    decide_at: int = 0  # global step after which the step count is fixed
    rate: float = 0.0  # measured steps/s
    costs: dict[str, list[float]] = field(default_factory=lambda: {"validation": [], "checkpoint": []})
    _t0: float | None = None
    _paused_in_window: float = 0.0

    @classmethod
    def from_config(cls, train: Any, steps_per_epoch: int, start: float) -> Plan:
        fixed = train.max_steps or steps_per_epoch * train.epochs
        budget = train.time_budget_s
        if budget is None:
            return cls(total=fixed, warmup=train.warmup_steps)
        if train.max_steps and train.max_steps <= SKIP_STEPS + MEASURE_STEPS:
            log.info(
                "train.max_steps %d is too few steps to measure for train.time_budget: training %d steps",
                train.max_steps,
                train.max_steps,
            )
            return cls(total=fixed, warmup=train.warmup_steps)
        warmup = max(train.warmup_steps, SKIP_STEPS + MEASURE_STEPS)
        if warmup != train.warmup_steps:
            log.info(
                "warm-up lengthened from %d to %d steps: it covers the throughput measurement of train.time_budget",
                train.warmup_steps,
                warmup,
            )
        return cls(
            total=train.max_steps or UNDECIDED,
            warmup=warmup,
            budget_s=budget,
            cap=train.max_steps,
            start=start,
            decided=False,
        )

    def total_now(self) -> int:
        return self.total

    def warmup_now(self) -> int:
        return self.warmup

    def fix(self, total: int) -> None:
        """The decided step count; a warm-up as long as the run is cut to a fifth of it (not below the timing)."""
        self.total, self.decided = total, True
        if self.warmup >= total:
            capped = max(total // 5, SKIP_STEPS + MEASURE_STEPS)
            log.warning(
                "warm-up of %d steps is not shorter than the %d steps of the time budget: using %d",
                self.warmup,
                total,
                capped,
            )
            self.warmup = capped

    def adopt(self, state: Any) -> None:
        """After a resume: take the step count a budget decided before the interruption."""
        if self.budget_s is not None and not self.decided and state.planned_steps:
            self.fix(state.planned_steps)
            self.reused = True

    def describe(self) -> str:
        if self.budget_s is None:
            return f"{self.total} steps"
        if self.reused:
            return f"{self.total} steps (decided by the time budget before the resume; not measured again)"
        if self.decided:
            return f"{self.total} steps"
        cap = f", at most {self.cap}" if self.cap else ""
        return (
            f"time budget {format_duration(self.budget_s)}: steps decided after the first "
            f"{SKIP_STEPS + MEASURE_STEPS}{cap}"
        )

    def begin(self, step: int) -> None:
        """The loop starts (or restarts after a resume) at global step ``step``."""
        if self.decided:
            return
        self.measure_from = step + SKIP_STEPS
        self.decide_at = max(self.measure_from + MIN_MEASURE_STEPS, min(self.measure_from + MEASURE_STEPS, self.warmup))
        if self.cap:
            self.decide_at = min(self.decide_at, self.cap)
        self._t0, self._paused_in_window = None, 0.0

    def step_done(self, step: int) -> bool:
        """Called after every step; True once, when the step count is to be decided (on every process alike)."""
        if self.decided:
            return False
        now = time.perf_counter()
        if step == self.measure_from:
            self._t0, self._paused_in_window = now, 0.0
        if step < self.decide_at:
            return False
        if self._t0 is not None and step > self.measure_from:
            self.rate = (step - self.measure_from) / max(now - self._t0 - self._paused_in_window, 1e-9)
        return True

    @contextlib.contextmanager
    def paused(self, kind: str) -> Iterator[None]:
        """Time outside the steps (validation, checkpoints): left out of the throughput, kept as cost estimates."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self.costs.setdefault(kind, []).append(spent)
            if not self.decided and self._t0 is not None:
                self._paused_in_window += spent

    def measured_cost(self, kind: str) -> float | None:
        values = sorted(self.costs.get(kind, []))
        return values[len(values) // 2] if values else None

    def remaining_s(self) -> float:
        assert self.budget_s is not None
        return self.budget_s - (time.perf_counter() - self.start)


def steps_that_fit(
    seconds: float,
    step: int,
    rate: float,
    *,
    validation_s: float,
    checkpoint_s: float,
    steps_per_epoch: int,
    eval_every_epochs: int,
    checkpoint_every: int,
) -> int:
    """The most further steps whose time, with the validations and checkpoints they bring, fits in ``seconds``.

    Validations come every ``eval_every_epochs`` epochs and after the last step; checkpoints every
    ``checkpoint_every`` steps before the last and once after it (as the training loop does).
    """
    if rate <= 0 or seconds <= 0:
        return 0
    every = steps_per_epoch * eval_every_epochs

    def cost(n: int) -> float:
        end = step + n
        validations = end // every - step // every + (1 if end % every else 0)
        checkpoints = (end - 1) // checkpoint_every - step // checkpoint_every + 1
        return n / rate + validations * validation_s + checkpoints * checkpoint_s

    lo, hi = 0, max(1, math.ceil(seconds * rate))  # cost(hi) > seconds: the steps alone take that long
    while lo < hi:  # cost() never decreases with n: the largest n with cost(n) <= seconds
        mid = (lo + hi + 1) // 2
        if cost(mid) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return lo


def decide_steps(run: Run) -> None:
    """Fix the step count of a time-budget run: the main process decides from what it measured, the others agree."""
    plan, state, cfg = run.plan, run.state, run.cfg
    total = torch.zeros(1, dtype=torch.long, device=run.device if dist.is_initialized() else "cpu")
    validation_s = 0.0 if run.val is None else _validation_cost(run)  # every process: validation is shared
    if run.is_main:
        checkpoint_s = plan.measured_cost("checkpoint") or _checkpoint_cost_estimate(run)
        remaining = plan.remaining_s() * MARGIN
        more = steps_that_fit(
            remaining,
            state.global_step,
            plan.rate,
            validation_s=validation_s,
            checkpoint_s=checkpoint_s,
            steps_per_epoch=run.batches.steps_per_epoch,
            eval_every_epochs=cfg.train.eval_every_epochs,
            checkpoint_every=cfg.train.checkpoint_every,
        )
        fits = state.global_step + more
        total[0] = min(fits, plan.cap) if plan.cap else fits
        capped = ""
        if plan.cap and fits > plan.cap:
            capped = f"; capped at train.max_steps {plan.cap} (the budget allows {fits})"
        log.info(
            "time budget %s: %d steps planned at %.2f steps/s (%.1f epochs; %d steps and %.0f s spent so far, "
            "validation ~%.1f s, checkpoint ~%.1f s)%s",
            format_duration(plan.budget_s or 0),
            int(total[0]),
            plan.rate,
            int(total[0]) / run.batches.steps_per_epoch,
            state.global_step,
            time.perf_counter() - plan.start,
            validation_s,
            checkpoint_s,
            capped,
        )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(total, src=0)
    plan.fix(max(int(total[0]), state.global_step))
    state.planned_steps = plan.total


def _validation_cost(run: Run) -> float:
    """Seconds per validation: measured when one ran already, else timed on a slice of the split and scaled up.

    Every process calls this (the slice is validated as validation runs: shared between the processes).
    """
    measured = run.plan.measured_cost("validation")
    if measured is not None:
        return measured
    assert run.val is not None
    val, k = run.val, min(len(run.val.images), 64)
    rows = [i for i, image in enumerate(val.text_to_image) if image < k]
    part = EvalSet(val.name, val.images[:k], [val.captions[i] for i in rows], [val.text_to_image[i] for i in rows])
    rng = capture_rng()  # leaves the run exactly as it was: same random numbers, training mode
    start = time.perf_counter()
    try:
        evaluate_split(
            run.encoder,
            part,
            device=run.device,
            autocast=run.autocast,
            batch_size=run.cfg.eval.batch_size,
            objective=run.objective,
            loss_batch_size=run.batches.global_batch,
            chunk_size=run.cfg.eval.chunk_size,
            distributed=True,
        )
    finally:
        run.model.train()
        restore_rng(rng)
    seconds = time.perf_counter() - start
    scale = max(len(val.images) / max(1, k), len(val.captions) / max(1, len(rows)))
    return seconds * scale + _bytes(run.model.state_dict()) / 200e6  # + saving the best model


def _checkpoint_cost_estimate(run: Run) -> float:
    """Seconds per checkpoint before one was written: its bytes at 200 MB/s."""
    return 0.05 + (_bytes(run.model.state_dict()) + _bytes(run.optimizer.state_dict()["state"])) / 200e6


def _bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_bytes(v) for v in tree.values())
    return 0
