"""The training loop: steps, evaluations, the budget plan, stops and saves, for one process or
many (`Cluster` makes every collective call a no-op for one)."""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from seq2seq.distributed import Cluster
from seq2seq.errors import Interrupted, UserError
from seq2seq.training.averaging import WeightAverage
from seq2seq.training.run_folder import RunFolder
from seq2seq.training.schedule import Budget, Plan

log = logging.getLogger("seq2seq")

# Gradient health, over the median pre-clip norm of the last GRADIENT_WINDOW steps (healthy runs
# of the shipped presets read between 0.1 and 2; an exploding tanh RNN reads above 100).
GRADIENT_WINDOW, VANISHING_BELOW, EXPLODING_ABOVE = 50, 1e-3, 1e2
# Steps in a row with a non-finite loss or gradient (each skipped) before the run gives up.
MAX_NONFINITE_IN_ROW = 10


@dataclass
class Progress:
    """Where a run is: what its resume state keeps (with its `Plan`)."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_score: float = -math.inf
    best: dict | None = None
    bad_evals: int = 0
    plateau_scale: float = 1.0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    window_tokens: int = 0  # the log window: targets, summed loss and training seconds since the last record
    window_loss: float = 0.0
    window_s: float = 0.0
    data_dir: str = ""
    plan: Plan = field(default_factory=Plan)

    def to_json(self) -> dict:
        plan = asdict(self.plan)
        out = {k: v for k, v in asdict(self).items() if k != "plan"}
        return {**out, **plan, "best_score": None if self.best_score == -math.inf else self.best_score}

    @classmethod
    def from_json(cls, saved: dict) -> "Progress":
        plan = Plan(**{k: saved[k] for k in ("total_steps", "anneal_start", "anneal_from") if k in saved})
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__ and k != "plan"}
        progress = cls(**known, plan=plan)
        progress.best_score = -math.inf if progress.best_score is None else progress.best_score
        progress.nonfinite_in_row = 0  # a resumed run gets a fresh allowance (after a fix, say bf16=false)
        return progress


class GradientWatch:
    """Warns once each when the median pre-clip norm of the last GRADIENT_WINDOW steps says the
    gradients vanish or explode."""

    def __init__(self):
        self.recent_norms: deque[float] = deque(maxlen=GRADIENT_WINDOW)
        self.warned: set[str] = set()

    def watch(self, grad_norm: float) -> None:
        self.recent_norms.append(grad_norm)
        if len(self.recent_norms) < GRADIENT_WINDOW:
            return
        median = sorted(self.recent_norms)[GRADIENT_WINDOW // 2]
        if median < VANISHING_BELOW and "vanishing" not in self.warned:
            self.warned.add("vanishing")
            log.warning("gradients are vanishing: median pre-clip norm %.2g over the last %d steps (below %g); "
                        "an lstm or gru cell with model.chrono_horizon set to the span the task needs "
                        "may help (docs/gradient-flow.md)", median, GRADIENT_WINDOW, VANISHING_BELOW)
        if median > EXPLODING_ABOVE and "exploding" not in self.warned:
            self.warned.add("exploding")
            log.warning("gradients are exploding: median pre-clip norm %.3g over the last %d steps (above %g); "
                        "keep train.clip_norm set and lower train.lr", median, GRADIENT_WINDOW, EXPLODING_ABOVE)


class Trainer:
    """One run of `task` on its model: `train_step` alone (timing scripts need no folder), or `run`
    with evaluations, the budget plan, stops and saves into `folder`."""

    def __init__(self, cfg, task, optimizer: torch.optim.Optimizer, cluster: Cluster | None = None,
                 folder: RunFolder | None = None, progress: Progress | None = None,
                 budget_s: float | None = None, clock=time.monotonic, started: float | None = None):
        """`started`: the clock's reading when the run's set-up began (default now): a budget counts from it."""
        self.cfg, self.t, self.task, self.model, self.optimizer = cfg, cfg.train, task, task.model, optimizer
        self.cluster, self.folder = cluster or Cluster(), folder or RunFolder(None, main=False)
        self.progress, self.budget_s, self.clock = progress or Progress(), budget_s, clock
        self.started = clock() if started is None else started
        self.batches, self.batches_epoch = task.batches(self.progress.epoch), self.progress.epoch
        if not self.batches:
            raise UserError("data: an epoch has no batch to train on")
        # Without a budget the schedule runs to the ceiling; a budget run is bounded by max_steps
        # alone, and records its planned total in the progress so that a resume follows it.
        ceiling = self.t.max_steps or (math.inf if budget_s else self.t.max_epochs * len(self.batches))
        planned = self.progress.plan.total_steps
        self.budget = Budget(budget_s, ceiling, ceiling if planned is None else min(ceiling, planned))
        self.eval_seconds = 0.0  # wall clock spent evaluating and saving since the run (or resume) started
        self.window_started = self.training_seconds() - self.progress.window_s
        self.last_eval_s: float | None = None
        self.gradients = GradientWatch()
        self.interrupted: str | None = None
        self.stop: str | None = None
        self.since_eval = 0
        self.elapsed_s = 0.0  # wall clock since the start, rank 0's: what budget decisions read
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.average = WeightAverage(self.model, self.t.ema_decay)

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, batch) -> tuple[float, int, float, float]:
        """One update; returns (summed loss, target count, pre-clip gradient norm, learning rate),
        loss and count summed over the ranks. A non-finite loss or gradient skips the update
        (counted, logged): one bad batch, or a bf16 overflow, should not end an hours-long run;
        MAX_NONFINITE_IN_ROW of them do."""
        p = self.progress
        lr = p.plan.lr(self.t, p.step, self.budget.ceiling, self.budget_s is not None, p.plateau_scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, count = self.task.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: scaling each rank's sum by world / (all ranks' count)
        # makes that average the gradient of the mean over every rank's tokens
        total_loss, total_count = self.cluster.sum(float(loss.detach()), count)
        (loss * (self.cluster.world / max(total_count, 1))).backward()
        loss, count = total_loss, int(total_count)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.clip_norm, foreach=True))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.average.update()
            p.nonfinite_in_row = 0
            self.gradients.watch(grad_norm)
        else:
            self.skip_step(loss, grad_norm, count)
        p.step += 1
        p.batch += 1
        return loss, count, grad_norm, lr

    def skip_step(self, loss: float, grad_norm: float, count: int) -> None:
        p = self.progress
        p.skipped_steps += 1
        p.nonfinite_in_row += 1
        self.folder.write({"type": "skip", "step": p.step + 1, "loss": str(loss / max(count, 1)),
                           "grad_norm": str(grad_norm), "skipped_steps": p.skipped_steps})
        log.warning("step %d: non-finite %s, update skipped (%d so far)", p.step + 1,
                    "loss" if not math.isfinite(loss) else "gradient", p.skipped_steps)
        self.task.forget_state()  # a carried state that went non-finite would poison the next steps
        if p.nonfinite_in_row >= MAX_NONFINITE_IN_ROW:
            p.step += 1
            p.batch += 1
            self.save_resume_state()
            raise diverged(p, self.folder.path)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Epochs until a stop; SIGINT or SIGTERM finishes the current step, saves and stops."""
        self.model.train()
        self.stop = self.stop_reason()  # a run resumed at its last step has nothing left to train
        previous = catch_signals(self)
        together = False  # whether every rank ends here in step (not after one rank's own error)
        try:
            while self.stop is None and (self.budget_s or self.progress.epoch < self.t.max_epochs):
                self.run_epoch()
            if self.since_eval:
                self.evaluate()
            together = True
        except Interrupted:
            together = True
            raise
        finally:
            self.folder.close()
            if together:
                self.cluster.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        log.info("finished: %s; best %s", self.stop or f"{self.t.max_epochs} epochs", self.progress.best)
        return self.progress.best

    def run_epoch(self) -> None:
        p = self.progress
        if self.batches_epoch != p.epoch:
            self.batches, self.batches_epoch = self.task.batches(p.epoch), p.epoch
        bar = tqdm(total=len(self.batches), initial=p.batch, desc=f"epoch {p.epoch + 1}", unit="batch",
                   disable=None if self.cluster.main else True, mininterval=2, leave=False)
        while p.batch < len(self.batches) and self.stop is None:
            loss, count, grad_norm, lr = self.train_step(self.batches[p.batch])
            self.since_eval += 1
            if math.isfinite(loss):
                p.window_tokens += count
                p.window_loss += loss
            bar.update(1)
            if p.step % self.t.log_every == 0:
                record = self.log_train(grad_norm, lr)
                bar.set_postfix(loss=record["loss"], tok_s=int(record["tokens_per_s"]))
            self.after_step()
        bar.close()
        if p.batch >= len(self.batches):
            p.epoch += 1
            p.batch = 0
            if self.stop is None and self.out_of_time():
                self.stop = f"time budget of {self.budget_s / 60:g} min used"
            if not self.t.eval_every and self.stop is None:
                self.evaluate_or_stop()

    def after_step(self) -> None:
        """The plan, the stops and the step-count evaluations that may follow a step."""
        p = self.progress
        if self.cluster.active:  # one signal or clock for all ranks, so they stop and plan alike
            signalled, self.elapsed_s = self.cluster.max(self.interrupted is not None,
                                                         self.clock() - self.started if self.cluster.main else -1.0)
            if signalled and not self.interrupted:
                self.interrupted = "SIGTERM"
        if self.budget_s is not None and p.plan.total_steps is None and self.budget.plan_due(
                self.elapsed(), p.step, self.training_seconds(), self.t.warmup_steps):
            if self.last_eval_s is None and self.evaluate_or_stop():  # the plan needs an evaluation's cost
                return
            self.plan()
        self.stop = self.stop_reason()
        if self.interrupted and self.stop is None:  # a run at its end finishes instead: final evaluation, saves
            self.save_resume_state()
            raise Interrupted(f"{self.interrupted}: state saved at step {p.step}; continue with --resume",
                              128 + signal.Signals[self.interrupted].value)
        if self.stop is None and self.t.eval_every and p.step % self.t.eval_every == 0:
            self.evaluate_or_stop()

    def stop_reason(self) -> str | None:
        p = self.progress
        if self.t.max_steps and p.step >= self.t.max_steps:
            return f"reached max_steps {self.t.max_steps}"
        if p.plan.total_steps is not None and p.step >= p.plan.total_steps:
            return f"completed the {p.plan.total_steps} steps planned for the budget"
        if self.out_of_time():
            return f"time budget of {self.budget_s / 60:g} min used"
        return None

    def evaluate_or_stop(self) -> bool:
        self.since_eval = 0
        if self.evaluate():
            self.stop = f"no improvement in {self.t.patience} evaluations"
        return self.stop is not None

    # -- evaluation and the plan ---------------------------------------------------------------
    def evaluate(self) -> bool:
        """Validate, keep the best model, save the resume state; True when patience has run out
        (a budget run anneals early instead, see `Plan.early_anneal`)."""
        p = self.progress
        eval_start, trained_s = self.clock(), self.training_seconds()
        with self.average.swapped_in():
            result = self.task.validate()
        improved = result["score"] > p.best_score
        record = {"type": "eval", "step": p.step, "epoch": round(p.epoch + p.batch / max(len(self.batches), 1), 2),
                  "elapsed_s": round(self.clock() - self.started, 1), "eval_s": round(self.clock() - eval_start, 1),
                  **{k: v for k, v in result.items() if k != "score"}, "best": improved}
        self.folder.write(record)
        shown = ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("type", "best"))
        log.info("eval: %s%s", shown, " (best)" if improved else "")
        if improved:
            p.best_score, p.best, p.bad_evals = result["score"], record, 0
            with self.average.swapped_in():
                self.folder.save_best(self.model, {"best": record, "parameters": self.n_params})
        else:
            p.bad_evals += 1
            if self.t.lr_schedule == "plateau":
                p.plateau_scale = max(p.plateau_scale * 0.5, self.t.min_lr_ratio)
        self.replan(trained_s)
        out_of_patience = p.bad_evals >= self.t.patience and not self.anneal_early()
        self.save_resume_state()
        # what the plan counts per evaluation, saves included (rank 0's, so every rank plans alike)
        self.last_eval_s = self.cluster.from_main(self.clock() - eval_start)
        self.eval_seconds += self.last_eval_s
        return out_of_patience

    def anneal_early(self) -> bool:
        """True when a budget run goes on despite its patience (see `Budget.anneal_early`)."""
        p = self.progress
        return self.budget_s is not None and self.budget.anneal_early(
            p, self.t, self.t.eval_every or len(self.batches), self.folder.write)

    def plan(self) -> None:
        """Fix the run's total step count from the measured speed so the budget is just used."""
        p = self.progress
        self.budget.plan(p, self.elapsed(), self.training_seconds(), self.last_eval_s, self.t.eval_every or len(self.batches),
                         len(self.batches), self.cluster.from_main, self.folder.write)
        self.save_resume_state()

    def replan(self, trained_s: float) -> None:
        """Fit a budget run's plan to its speed since the last evaluation (`Budget.replan`).
        `trained_s`: training seconds as the evaluation began."""
        self.budget.replan(self.progress, self.elapsed(), trained_s, self.last_eval_s or 0.0,
                           self.t.eval_every or len(self.batches), self.cluster.from_main, self.folder.write)

    # -- clocks, logs and saves ----------------------------------------------------------------
    def elapsed(self) -> float:
        """Wall clock since the start; in a distributed run rank 0's, as of the last step's sync."""
        return self.elapsed_s if self.cluster.active else self.clock() - self.started

    def training_seconds(self) -> float:
        """Wall clock since the start, evaluations and saves excluded: what throughput counts."""
        return self.clock() - self.started - self.eval_seconds

    def out_of_time(self) -> bool:
        """True when the budget could not also cover one more evaluation."""
        return self.budget_s is not None and self.elapsed() + (self.last_eval_s or 0) >= self.budget_s

    def log_train(self, grad_norm: float, lr: float) -> dict:
        """A train record over the steps since the last one (throughput: training time only)."""
        p = self.progress
        seconds = self.training_seconds() - self.window_started
        record = {"type": "train", "step": p.step, "epoch": p.epoch + 1,
                  "loss": round(p.window_loss / max(p.window_tokens, 1), 4), "lr": lr,
                  "grad_norm": round(grad_norm, 3) if math.isfinite(grad_norm) else str(grad_norm),
                  "tokens_per_s": round(p.window_tokens / max(seconds, 1e-9), 1),
                  "elapsed_s": round(self.clock() - self.started, 1)}
        if p.skipped_steps:
            record["skipped_steps"] = p.skipped_steps
        self.folder.write(record)
        p.window_tokens, p.window_loss = 0, 0.0
        self.window_started = self.training_seconds()
        return record

    def save_resume_state(self) -> None:
        """Every rank calls it (each adds its random state); rank 0 writes."""
        self.progress.window_s = self.training_seconds() - self.window_started
        ranks = self.cluster.gather(random_state(self.model, self.task))
        self.folder.save_state(self.model, self.optimizer, self.progress.to_json(), ranks, self.cluster.active,
                               self.average.state())


def random_state(model: torch.nn.Module, task) -> dict:
    """This process's random state, and the task's (a carried hidden state, say)."""
    device = next(model.parameters()).device
    mine = {"torch_rng": torch.get_rng_state(), "task": task.extra_state()}
    if device.type == "cuda":  # dropout masks on the GPU come from its own generator
        mine["cuda_rng"] = torch.cuda.get_rng_state(device)
    return mine


def catch_signals(trainer: Trainer) -> dict:
    """SIGINT and SIGTERM set the trainer's flag, which the loop reads after each step, so the
    saved state is one between steps (a second signal stops at once, keeping the last saved
    state). Returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame):
        if trainer.interrupted:
            raise KeyboardInterrupt
        trainer.interrupted = signal.Signals(signum).name
        log.info("%s: saving after this step (send it again to stop at once)", trainer.interrupted)

    return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}


def diverged(p: Progress, folder) -> UserError:
    best = p.best["step"] if p.best else None
    return UserError(f"training diverged: {MAX_NONFINITE_IN_ROW} steps in a row had a non-finite loss or gradient "
                     f"(up to step {p.step}); {folder} keeps the best model{f' (step {best})' if best else ''}; "
                     "--resume continues on the next batches, best with --set train.bf16=false (bf16 overflows) "
                     "or a lower train.lr")
