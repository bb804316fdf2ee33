"""The learning rate as a function of the step, and the time-budget plan, on plain numbers.

A budget run measures its speed from PLAN_MEASURE_FROM of its budget (skipping the start, when
caches and the allocator's heap still grow) until PLAN_AT, then fixes its total step count so
that training and the final evaluation end as the budget is spent. Until then the learning rate
holds at its peak after warmup; the cosine anneals from the plan's step to the last step. The
plan owns the run's end: `max_epochs` does not cut a budget the user gave (only `max_steps`
does), and when dev stops improving before the end, the run anneals over a short span from
there (`early_anneal`) instead of stopping with the learning rate still high.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from seq2seq.errors import UserError

PLAN_MEASURE_FROM, PLAN_AT = 0.05, 0.2
# Share of the budget left unplanned, for speed that drifts over a run (other processes, longer
# dev decodes as the model improves); the time-budget stop still catches an overrun.
BUDGET_MARGIN = 0.03
# An early anneal's length, as a share of the planned steps (at least one evaluation's worth).
EARLY_ANNEAL_SHARE = 0.1
SCHEDULES = ("cosine", "plateau", "constant")

log = logging.getLogger("seq2seq")


def learning_rate(cfg, step: int, total_steps: int | None, plateau_scale: float, anneal_start: int | None = None,
                  anneal_from: float = 1.0) -> float:
    """Linear warmup over warmup_steps, then the schedule. Cosine anneals from `anneal_start`
    (default: the end of warmup), where its factor is `anneal_from`, to the last of `total_steps`;
    None (a budget run before its plan) holds the peak."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "cosine":
        factor = 1.0
        if total_steps is not None:
            start = cfg.warmup_steps if anneal_start is None else anneal_start
            progress = min(1.0, max(0, step - start) / max(total_steps - 1 - start, 1))
            factor = cfg.min_lr_ratio + (anneal_from - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.lr_schedule == "plateau":
        factor = plateau_scale
    elif cfg.lr_schedule == "constant":
        factor = 1.0
    else:
        raise UserError(f"train.lr_schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    return cfg.lr * warm * factor


def plan_total_steps(budget_s: float, elapsed_s: float, step: int, step_s: float, eval_s: float,
                     steps_per_eval: int, ceiling: float, margin: float = BUDGET_MARGIN) -> int:
    """The step count at which a run that has done `step` steps in `elapsed_s` seconds ends its
    training and final evaluation when `budget_s` (less its `margin` share) is spent: each further
    step costs `step_s`, each evaluation (one every `steps_per_eval`, and a last one) `eval_s`.
    Never above `ceiling`, never below `step`."""
    left = budget_s * (1 - margin) - elapsed_s - eval_s
    more = left / (step_s + eval_s / max(steps_per_eval, 1))
    return int(min(ceiling, max(step, step + math.floor(more))))


@dataclass
class Plan:
    """A run's schedule state that a resume must keep: the planned last step (None: not planned;
    a run without a budget anneals to its ceiling), and where the cosine starts and at what factor."""
    total_steps: int | None = None
    anneal_start: int | None = None
    anneal_from: float = 1.0

    def lr(self, cfg, step: int, ceiling: float, budget: bool, plateau_scale: float) -> float:
        total = self.total_steps if budget or self.total_steps is not None else ceiling
        return learning_rate(cfg, step, total, plateau_scale, self.anneal_start, self.anneal_from)

    def early_anneal(self, cfg, step: int, steps_per_eval: int) -> int | None:
        """Start a short anneal at `step`, from the learning rate reached there, when a cosine plan
        still has far to go: returns the new last step, or None when there is nothing to shorten
        (no cosine plan, an early anneal under way, or the end near)."""
        if cfg.lr_schedule != "cosine" or self.total_steps is None or self.anneal_from != 1.0:
            return None
        span = max(steps_per_eval, round(EARLY_ANNEAL_SHARE * self.total_steps))
        if step + span >= self.total_steps:
            return None
        self.anneal_from = learning_rate(cfg, step, self.total_steps, 1.0, self.anneal_start, self.anneal_from) / cfg.lr
        self.anneal_start, self.total_steps = step, step + span
        return self.total_steps


class Budget:
    """A budget run's plan: when it measures its speed and plans, how it refits the plan at each
    evaluation, and when it anneals early. `sync(value)` makes every process take rank 0's value;
    `write(record)` logs a record."""

    def __init__(self, budget_s: float | None, ceiling: float, plan_cap: float):
        self.budget_s, self.ceiling, self.plan_cap = budget_s, ceiling, plan_cap
        self.measure_from: tuple[int, float] | None = None  # (step, training seconds): the plan's speed from here
        self.speed_mark: tuple[int, float] | None = None  # the same, from the plan or the last evaluation on

    def plan_due(self, elapsed_s: float, step: int, training_s: float, warmup_steps: int) -> bool:
        """Starts the speed measurement when its time comes; True once the plan can be made.
        How far the run is: its share of the budget, or of its step ceiling."""
        share = max(elapsed_s / self.budget_s, step / self.ceiling)
        if self.measure_from is None and share >= PLAN_MEASURE_FROM:
            self.measure_from = (step, training_s)
        return (self.measure_from is not None and share >= PLAN_AT
                and step >= max(warmup_steps, self.measure_from[0] + 5))

    def plan(self, progress, elapsed_s: float, training_s: float, eval_s: float, steps_per_eval: int,
             steps_per_epoch: int, sync, write) -> None:
        """Fix `progress.plan`'s total step count from the speed measured since `measure_from`."""
        step = progress.step
        step_s = (training_s - self.measure_from[1]) / (step - self.measure_from[0])
        self.speed_mark = (step, training_s)
        total = plan_total_steps(self.budget_s, elapsed_s, step, step_s, eval_s, steps_per_eval, self.ceiling)
        progress.plan.total_steps, progress.plan.anneal_start = sync(total), step
        record = {"type": "plan", "step": step, "total_steps": progress.plan.total_steps,
                  "epochs": round(progress.plan.total_steps / max(steps_per_epoch, 1), 2), "step_s": round(step_s, 4),
                  "eval_s": round(eval_s, 2), "budget_s": self.budget_s,
                  "ceiling": self.ceiling if math.isfinite(self.ceiling) else None}
        write(record)
        log.info("plan: %d steps (%.1f epochs) in the %g-minute budget, at %.3f s a step and %.1f s an evaluation",
                 progress.plan.total_steps, record["epochs"], self.budget_s / 60, step_s, eval_s)

    def replan(self, progress, elapsed_s: float, training_s: float, eval_s: float, steps_per_eval: int,
               sync, write) -> None:
        """At an evaluation, fit the plan to the speed of the steps since the last one when it has
        drifted: shorter when at that speed the run would overrun the whole budget (another
        process, a throttled CPU), so it still ends annealed; longer when it would leave more than
        twice the margin unused (a slowdown has passed), so the budget is spent training. In
        between the plan stands. A resumed session never lengthens the plan it resumed with
        (`plan_cap`). `training_s`: training seconds as the evaluation began."""
        step, total = progress.step, progress.plan.total_steps
        mark, self.speed_mark = self.speed_mark, (step, training_s)
        if self.budget_s is None or total is None or mark is None or step <= mark[0]:
            return
        step_s = (training_s - mark[1]) / (step - mark[0])
        args = (self.budget_s, elapsed_s, step, step_s, eval_s, steps_per_eval, self.plan_cap)
        overruns = plan_total_steps(*args, margin=0.0) < total
        idles = total < plan_total_steps(*args, margin=2 * BUDGET_MARGIN)
        new_total = sync(plan_total_steps(*args) if overruns or idles else total)
        if new_total != total:
            write({"type": "replan", "step": step, "total_steps": new_total, "was": total, "step_s": round(step_s, 4)})
            log.info("replan: %d steps instead of %d, at %.3f s a step since the last evaluation", new_total, total,
                     step_s)
            progress.plan.total_steps = new_total

    def anneal_early(self, progress, cfg, steps_per_eval: int, write) -> bool:
        """A budget run whose dev score stopped improving anneals from here over a short span
        (`Plan.early_anneal`); True when the run goes on: patience never stops a budget run's
        cosine before its end."""
        plan = progress.plan
        if cfg.lr_schedule != "cosine" or plan.total_steps is None:
            return False
        was = plan.total_steps
        total = plan.early_anneal(cfg, progress.step, steps_per_eval)
        progress.bad_evals = 0
        if total is not None:
            self.plan_cap = min(self.plan_cap, total)
            write({"type": "replan", "step": progress.step, "total_steps": total, "was": was, "reason": "patience"})
            log.info("no improvement in %d evaluations: annealing until step %d instead of %d", cfg.patience, total, was)
        return True
