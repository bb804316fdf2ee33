"""One training loop for both models; a task object supplies the model-specific parts.

A task has: `model`, `tokenizer`, `batches(epoch)` (deterministic given the seed and epoch),
`loss(batch) -> (summed loss, target count)`, `validate() -> metrics with a "score" (higher is
better)`, `extra_state()` / `load_extra_state()` for what must survive a resume, and
`forget_state()` to drop a carried state after a non-finite step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from seq2seq import checkpoint, inference
from seq2seq.device import autocast
from seq2seq.device import resolve as resolve_device
from seq2seq.distributed import Cluster
from seq2seq.config import Config
from seq2seq.corpus import TokenizedCorpus
from seq2seq.data import (char_streams, load_pairs, non_empty, within_length, pad, read_text, resolve,
                          token_batches)
from seq2seq.errors import Interrupted, UserError
from seq2seq.files import check_free_space, check_output_folder, write_text_atomic
from seq2seq.loss import smoothed_cross_entropy
from seq2seq.metrics import bleu_chrf
from seq2seq.models.rnn import detach
from seq2seq.tokenizer import BOS, EOS, PAD, CharVocab, SubwordTokenizer

log = logging.getLogger("seq2seq")


class TranslationTask:
    def __init__(self, cfg: Config, data_dir: Path, tokenizer: SubwordTokenizer | None = None):
        d, self.cfg = cfg.data, cfg
        dev = list(non_empty(load_pairs(d, data_dir, "dev"), "dev"))  # first: a wrong dev path fails in seconds
        if not dev:
            raise UserError(f"data.dev {d.dev!r}: no sentence pairs")
        self.train = TokenizedCorpus.build(d, data_dir, tokenizer)
        self.tokenizer = self.train.tokenizer
        fits = (self.train.src_len <= d.max_tokens) & (self.train.tgt_len <= d.max_tokens)
        self.rows = np.flatnonzero(fits)  # the pairs trained on
        self.src_len, self.tgt_len = self.train.src_len[self.rows] + 1, self.train.tgt_len[self.rows] + 1  # with EOS/BOS
        if len(self.rows) < len(fits):
            log.info("train: dropped %d pair(s) longer than %d tokens", len(fits) - len(self.rows), d.max_tokens)
        if not len(self.rows):
            raise UserError(f"data.train {d.train!r}: no pair is within data.max_tokens = {d.max_tokens}")
        if d.dev_max_sentences:
            dev = dev[: d.dev_max_sentences]
        self.dev_src, self.dev_ref = [s for s, _ in dev], [t for _, t in dev]
        dev_src_ids, dev_tgt_ids = self.tokenizer.encode(self.dev_src), self.tokenizer.encode(self.dev_ref)
        keep = within_length(dev_src_ids, dev_tgt_ids, d.max_tokens, "dev")  # for dev loss; BLEU uses all
        self.dev_src_ids, self.dev_tgt_ids = [dev_src_ids[i] for i in keep], [dev_tgt_ids[i] for i in keep]
        log.info("train: %d pairs, %d target tokens; dev: %d pairs", len(self.rows),
                 int(self.tgt_len.sum()) - len(self.rows), len(self.dev_src))
        self.model = checkpoint.build(cfg, self.tokenizer)
        self.forward = self.model  # what training calls: the model, or its DistributedDataParallel wrapper
        self.device = torch.device("cpu")
        self.rank, self.world = 0, 1

    def to(self, device: torch.device) -> None:
        self.device = device
        self.model.to(device)

    def shard(self, rank: int, world: int) -> None:
        """Rank `rank` of `world` takes every world-th batch of the epoch's one shuffled order."""
        self.rank, self.world = rank, world

    def batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(sampling seed, row numbers) per batch, the rows read from the table when trained on."""
        t = self.cfg.train
        seed = t.seed * 1000 + epoch
        order = token_batches(self.src_len, self.tgt_len, t.batch_tokens, seed)
        order = [((seed * 100_003 + i) % (2**32 - 1), self.rows[b]) for i, b in enumerate(order)]  # SentencePiece's seed is 32-bit
        if self.world > 1:  # the same number for every rank: they step together
            order = order[self.rank :: self.world][: len(order) // self.world]
        return order

    def read(self, batch: tuple[int, np.ndarray]) -> tuple[list[list[int]], list[list[int]]]:
        seed, rows = batch
        alpha = self.cfg.data.sample_alpha
        if alpha > 0:  # subword regularization: each batch segmented afresh, repeatably from its seed
            import sentencepiece as spm
            spm.set_random_generator_seed(seed)
            return self.train.sampled_rows(rows, alpha)
        return self.train.rows(rows)

    def loss(self, batch: tuple[int, np.ndarray]) -> tuple[torch.Tensor, int]:
        return self.pair_loss(*self.read(batch))

    def pair_loss(self, src_ids: list[list[int]], tgt_ids: list[list[int]], smoothing: float | None = None,
                  teacher_forcing: float | None = None) -> tuple[torch.Tensor, int]:
        src, src_len = pad(src_ids, PAD, eos=EOS)
        tgt, _ = pad(tgt_ids, PAD, bos=BOS, eos=EOS)
        if self.device.type == "cuda":  # pinned pages let the copy overlap the GPU's work
            src, tgt = src.pin_memory().to(self.device, non_blocking=True), tgt.pin_memory().to(self.device, non_blocking=True)
        ratio = self.cfg.train.teacher_forcing if teacher_forcing is None else teacher_forcing
        net = self.forward if self.model.training else self.model
        with autocast(self.cfg.train.bf16, self.device):
            logits = net(src, src_len, tgt[:, :-1], teacher_forcing=ratio)
        target = tgt[:, 1:]
        count = int((target != PAD).sum())
        smoothing = self.cfg.train.label_smoothing if smoothing is None else smoothing
        loss = smoothed_cross_entropy(logits.flatten(0, 1), target.flatten(), smoothing, ignore_index=PAD,
                                      grad_scale=1 / max(count, 1))  # the trainer's mean
        return loss, count

    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        total, count = 0.0, 0
        order = token_batches([len(s) + 1 for s in self.dev_src_ids], [len(s) + 1 for s in self.dev_tgt_ids],
                              self.cfg.train.batch_tokens, seed=0)
        for b in order:
            loss, n = self.pair_loss([self.dev_src_ids[i] for i in b], [self.dev_tgt_ids[i] for i in b],
                                     smoothing=0.0, teacher_forcing=1.0)
            total, count = total + float(loss), count + n
        hyps = inference.translate(self.model, self.tokenizer, self.dev_src, beam=self.cfg.train.dev_beam,
                                   bf16=self.cfg.train.bf16, int8=False)  # the weights as trained
        scores = bleu_chrf([h[0][0] for h in hyps], self.dev_ref)
        self.model.train()
        dev_loss = total / max(count, 1)
        return {"dev_loss": round(dev_loss, 4), "dev_ppl": round(math.exp(dev_loss), 2),
                "dev_bleu": scores["bleu"], "dev_chrf": scores["chrf"], "score": scores["bleu"]}

    def extra_state(self) -> dict:
        return {}

    def forget_state(self) -> None:
        pass

    def load_extra_state(self, state: dict) -> None:
        pass


class CharLMTask:
    def __init__(self, cfg: Config, data_dir: Path, tokenizer: CharVocab | None = None):
        self.cfg = cfg
        text = read_text(resolve(data_dir, cfg.data.text))
        split = int(len(text) * (1 - cfg.data.valid_fraction))
        if split < 2 or split >= len(text):
            raise UserError(f"{cfg.data.text}: {len(text)} characters cannot be split with valid_fraction "
                            f"{cfg.data.valid_fraction}")
        self.tokenizer = tokenizer or CharVocab.build(text[:split])
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        self.train_ids, self.valid_ids = ids[:split], ids[split:]
        char_streams(self.train_ids, cfg.train.batch_size)  # too short a text fails here, not at the first step
        self.device, self.rank, self.world = torch.device("cpu"), 0, 1
        self.streams, self.streams_epoch = None, None
        log.info("text: %d characters, vocabulary %d; train %d, validation %d characters",
                 len(text), len(self.tokenizer), split, len(text) - split)
        self.model = checkpoint.build(cfg, self.tokenizer)
        self.forward = self.model  # what training calls: the model, or its DistributedDataParallel wrapper
        self.hidden = None

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self.device = device

    def shard(self, rank: int, world: int) -> None:
        """Rank `rank` of `world` reads its own block of the batch_size streams."""
        if self.cfg.train.batch_size % world:
            raise UserError(f"train.batch_size {self.cfg.train.batch_size} must divide by the {world} processes")
        self.rank, self.world, self.streams_epoch = rank, world, None

    def batches(self, epoch: int) -> list:
        return [(epoch, start) for start in range(0, self.epoch_streams(epoch).size(1) - 1, self.cfg.train.bptt)]

    def epoch_streams(self, epoch: int) -> torch.Tensor:
        """This rank's streams of the epoch. Each epoch cuts the text at its own offset, drawn from
        (seed, epoch): rows start at new places and no epoch repeats another's windows."""
        if self.streams_epoch != epoch:
            t = self.cfg.train
            offset = random.Random(t.seed * 1000 + epoch).randrange(max(1, len(self.train_ids) // t.batch_size // 2))
            streams = char_streams(self.train_ids[offset:], t.batch_size)
            per = t.batch_size // self.world
            self.streams, self.streams_epoch = streams[self.rank * per : (self.rank + 1) * per].to(self.device), epoch
        return self.streams

    def loss(self, batch: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, start = batch
        if start == 0:
            self.hidden = None  # each epoch reads its streams from their start
        streams = self.epoch_streams(epoch)
        x = streams[:, start : start + self.cfg.train.bptt]
        y = streams[:, start + 1 : start + 1 + self.cfg.train.bptt]
        x = x[:, : y.size(1)]
        with autocast(self.cfg.train.bf16, x.device):
            logits, hidden = self.forward(x, self.hidden)
        self.hidden = detach(hidden)  # truncated BPTT: carry the state, not its graph
        loss = smoothed_cross_entropy(logits.flatten(0, 1), y.flatten(), grad_scale=1 / y.numel())
        return loss, y.numel()

    def validate(self) -> dict:
        # fp32 even when training in bf16: this is the number reported against quality bars
        scores = inference.score_text(self.model, self.valid_ids, context=self.train_ids[-256:])
        self.model.train()
        return {"valid_nats_per_char": round(scores["nats_per_char"], 4),
                "valid_bits_per_char": round(scores["bits_per_char"], 4), "score": -scores["nats_per_char"]}

    def forget_state(self) -> None:
        self.hidden = None

    def extra_state(self) -> dict:
        if self.hidden is None:
            return {}
        hidden = self.hidden if isinstance(self.hidden, tuple) else (self.hidden,)
        return {f"hidden{i}": h.cpu() for i, h in enumerate(hidden)}

    def load_extra_state(self, state: dict) -> None:
        parts = [state[f"hidden{i}"].to(self.device) for i in range(2) if f"hidden{i}" in state]
        self.hidden = None if not parts else (tuple(parts) if len(parts) == 2 else parts[0])


TASKS = {"translator": TranslationTask, "charlm": CharLMTask}


# The clock the loop reads; tests replace it with a fake one.
clock = time.monotonic

# A budget run measures its speed from PLAN_MEASURE_FROM of its budget (skipping the start, when
# caches and the allocator's heap still grow) until PLAN_AT (or those shares of its max_epochs
# ceiling, where it would reach that first), then fixes its total step count, so
# that training and the final evaluation end as the budget is spent. Until then the learning rate
# holds at its peak after warmup; the cosine anneals from the plan's step to the last step.
PLAN_MEASURE_FROM, PLAN_AT = 0.05, 0.2
# Share of the budget left unplanned, for speed that drifts over a run (other processes, longer
# dev decodes as the model improves); the time-budget stop still catches an overrun.
BUDGET_MARGIN = 0.03
# Gradient health, over the median pre-clip norm of the last GRADIENT_WINDOW steps. Healthy runs
# of the shipped presets read 0.6-1.8 (translator) and 0.14-0.53 (character model); the
# gradient-flow report's tanh RNN with exploding recurrent weights reads above 100 unclipped.
GRADIENT_WINDOW, VANISHING_BELOW, EXPLODING_ABOVE = 50, 1e-3, 1e2
# Steps in a row with a non-finite loss or gradient (each skipped) before the run gives up.
MAX_NONFINITE_IN_ROW = 10


def learning_rate(cfg, step: int, total_steps: int | None, plateau_scale: float, anneal_start: int | None = None) -> float:
    """Linear warmup over warmup_steps, then the schedule. Cosine anneals from `anneal_start`
    (default: the end of warmup) to the last of `total_steps`; None (a budget run before its
    plan) holds the peak."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "cosine":
        factor = 1.0
        if total_steps is not None:
            start = cfg.warmup_steps if anneal_start is None else anneal_start
            progress = min(1.0, max(0, step - start) / max(total_steps - 1 - start, 1))
            factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.lr_schedule == "plateau":
        factor = plateau_scale
    elif cfg.lr_schedule == "constant":
        factor = 1.0
    else:
        raise UserError(f"train.lr_schedule must be cosine, plateau or constant, got {cfg.lr_schedule!r}")
    return cfg.lr * warm * factor


def plan_total_steps(budget_s: float, elapsed_s: float, step: int, step_s: float, eval_s: float,
                     steps_per_eval: int, ceiling: int, margin: float = BUDGET_MARGIN) -> int:
    """The step count at which a run that has done `step` steps in `elapsed_s` seconds ends its
    training and final evaluation when `budget_s` (less its `margin` share) is spent: each further
    step costs `step_s`, each evaluation (one every `steps_per_eval`, and a last one) `eval_s`.
    Never above `ceiling`, never below `step`."""
    left = budget_s * (1 - margin) - elapsed_s - eval_s
    more = left / (step_s + eval_s / max(steps_per_eval, 1))
    return int(min(ceiling, max(step, step + math.floor(more))))


def train(cfg: Config, data_dir: Path | None, output: Path, time_budget: float | None = None,
          resume: bool = False, device: str = "auto", init_from: Path | None = None) -> dict:
    """Train into `output`; returns the best evaluation. `time_budget` is in minutes of wall clock:
    the run plans its step count (and so its learning-rate schedule) to end when it is spent.
    On resume, `data_dir` None means the folder the run was started with. `device`: auto (CUDA
    where present), cpu or cuda. `init_from`: a model folder whose weights and tokenizer the run
    starts from (fine-tuning; `cfg.model` must be that folder's)."""
    return Trainer(cfg, data_dir, Path(output), time_budget, resume, device, init_from).run()


class Trainer:
    """One run: set-up (or resume), then steps, evaluations, the budget plan and saves."""

    def __init__(self, cfg: Config, data_dir: Path | None, output: Path, time_budget: float | None, resume: bool,
                 device: str = "auto", init_from: Path | None = None):
        self.started = clock()
        self.cluster = Cluster.from_env(resolve_device(device))
        self.device, main = self.cluster.device, self.cluster.main
        if not main:
            log.setLevel(logging.WARNING)  # one rank speaks for the run
        self.cfg, self.t, self.output = cfg, cfg.train, output
        self.budget_s = time_budget * 60 if time_budget else None
        self._check_output(resume)
        torch.set_num_threads(self.t.threads or max(1, (os.cpu_count() or 1) // self.cluster.world))
        torch.manual_seed(self.t.seed)
        learning_rate(self.t, 0, None, 1.0)  # a bad schedule name fails now, before anything is written
        state = None
        if resume:
            state = checkpoint.load_state(output / checkpoint.STATE)
            data_dir = data_dir or Path(json.loads(state["progress"])["data_dir"])
        data_dir = Path(data_dir)
        self._build_task(data_dir, resume, init_from)
        self._build_optimizer()
        self.progress = {"step": 0, "epoch": 0, "batch": 0, "best_score": -math.inf, "best": None, "bad_evals": 0,
                         "plateau_scale": 1.0, "total_steps": None, "anneal_start": None,
                         "skipped_steps": 0, "nonfinite_in_row": 0, "window_tokens": 0, "window_loss": 0.0, "window_s": 0.0,
                         "data_dir": str(data_dir.resolve())}
        if resume:
            self._load_resume_state(state, data_dir)
        if main:
            cfg.save(output / "config.json")  # on resume too: --set train.* overrides are kept
        self.batches, self.batches_epoch = self.task.batches(self.progress["epoch"]), self.progress["epoch"]
        # Without a budget the schedule runs to the ceiling (a resume may raise it); a budget run
        # records its planned total in the progress, so that a resume follows the same schedule.
        self.ceiling = self.t.max_steps or self.t.max_epochs * len(self.batches)
        self._start_counters()
        self._open_log(resume, init_from)

    def _check_output(self, resume: bool) -> None:
        """Refuse a folder that cannot take this run, before anything is written."""
        output = self.output
        if resume and not (output / checkpoint.STATE).is_file():
            raise UserError(f"{output}: nothing to resume ({checkpoint.STATE} not found)")
        if self.cluster.main and not resume and (output / "config.json").exists():
            raise UserError(f"{output} already holds a model: pass --resume to continue it, or choose another --output")
        if self.cluster.main:
            check_output_folder(output)

    def _build_task(self, data_dir: Path, resume: bool, init_from: Path | None) -> None:
        """The task with its data, tokenizer and model on the device: the tokenizer is the run's
        own on resume, `init_from`'s when fine-tuning, else built from the data (by rank 0 only,
        the others wait and read it)."""
        main, output = self.cluster.main, self.output
        kind_tokenizer = SubwordTokenizer if self.cfg.kind == "translator" else CharVocab
        tokenizer = None
        if resume:
            tokenizer = kind_tokenizer.load(output)
        elif init_from is not None and main:
            tokenizer = kind_tokenizer.load(init_from)
        if not main:  # rank 0 first: it builds the token cache and the tokenizer, which the others read
            self.cluster.barrier()
            tokenizer = tokenizer or kind_tokenizer.load(output)
        self.task = TASKS[self.cfg.kind](self.cfg, data_dir, tokenizer)
        if main:
            if not resume:
                self.task.tokenizer.save(output)
            self.cluster.barrier()
        self.task.to(self.device)
        self.task.shard(self.cluster.rank, self.cluster.world)
        self.model = self.task.model
        if init_from is not None and not resume:  # before the optimizer and the first saved state
            checkpoint.load_weights(self.model, init_from / checkpoint.BEST)
            log.info("weights and tokenizer from %s", init_from)
        self.task.forward = self.cluster.wrap(self.model)
        if self.cluster.active:  # each rank its own dropout masks (the weights came from one seed)
            torch.manual_seed(self.t.seed + 1000 * self.cluster.rank)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %s, %.2fM parameters", self.cfg.kind, self.n_params / 1e6)

    def _build_optimizer(self) -> None:
        """AdamW over the model, once the disk is known to hold the run's files."""
        output = self.output
        # best and latest weights, Adam's two moments, and a temporary copy of the largest while it
        # is written; a resumed run replaces its own files, so those already there count as room
        present = sum((output / name).stat().st_size for name in (checkpoint.BEST, checkpoint.LAST, checkpoint.STATE)
                      if (output / name).is_file())
        if self.cluster.main:
            check_free_space(output, self.n_params * 4 * 6 + 2**20 - present)
        # fused: one kernel for all parameters instead of a dozen ops per tensor. AdamW: weight
        # decay shrinks the weights apart from the gradient's moments; Adam's L2 term, normalised
        # by them, stopped a char LM from learning at all at weight_decay 0.1 (3.36 nats/char)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.t.lr, betas=(0.9, 0.98),
                                           weight_decay=self.t.weight_decay, fused=True)

    def _start_counters(self) -> None:
        """The clocks, marks and flags of this process's part of the run (none survive a resume)."""
        self.eval_seconds = 0.0  # wall clock spent evaluating and saving since the run (or resume) started
        self.window_started = self.training_seconds() - self.progress["window_s"]  # the log window's start
        self.measure_from: tuple[int, float] | None = None  # (step, training seconds): the plan's speed from here
        self.speed_mark: tuple[int, float] | None = None  # the same, from the plan or the last evaluation on
        self.last_eval_s: float | None = None
        self.recent_norms: deque[float] = deque(maxlen=GRADIENT_WINDOW)
        self.warned: set[str] = set()
        self.interrupted: str | None = None
        self.stop: str | None = None
        self.since_eval = 0
        self.elapsed_s = 0.0  # wall clock since the start, rank 0's: what budget decisions read
        # How far a replan may lengthen the plan: the ceiling in the session that made it; a resumed
        # session keeps to the plan it resumed with, so that it continues as the run would have
        planned = self.progress["total_steps"]
        self.plan_cap = self.ceiling if planned is None else min(self.ceiling, planned)

    def _open_log(self, resume: bool, init_from: Path | None) -> None:
        """metrics.jsonl, cut back to the saved state on resume; a new run also saves its first state."""
        self.metrics_log = None
        if self.cluster.main:
            if resume:
                self._truncate_log(self.progress["step"])
            self.metrics_log = open(self.output / "metrics.jsonl", "a", encoding="utf-8")
        if not resume:
            if init_from is not None:  # the log says where the weights came from
                self.write_log({"type": "init", "step": 0, "from": str(Path(init_from).resolve())})
            self.save_resume_state()

    def _load_resume_state(self, state: dict, data_dir: Path) -> None:
        checkpoint.load_weights(self.model, self.output / checkpoint.LAST)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise UserError(f"{self.output / checkpoint.STATE}: does not match the model ({e})") from None
        progress = dict(json.loads(state["progress"]), data_dir=str(data_dir.resolve()))
        progress["best_score"] = -math.inf if progress["best_score"] is None else progress["best_score"]
        progress["nonfinite_in_row"] = 0  # a resumed run gets a fresh allowance (after a fix, say bf16=false)
        self.progress.update(progress)
        mine = state
        if self.cluster.active or "rank_states" in state:
            ranks = state.get("rank_states", [state])
            if len(ranks) != self.cluster.world:
                raise UserError(f"{self.output}: the run used {len(ranks)} process(es); resume it with as many "
                                f"(this one has {self.cluster.world})")
            mine = ranks[self.cluster.rank]
        torch.set_rng_state(mine["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in mine:
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self.task.load_extra_state(mine.get("task", {}))
        log.info("resuming %s at epoch %d, step %d", self.output, self.progress["epoch"] + 1, self.progress["step"])

    def _truncate_log(self, step: int) -> None:
        """Drop the records a killed run wrote after its last saved state: the resumed run writes
        them again, so the log reads as one uninterrupted run."""
        path = self.output / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # the half line of a killed write
                pass
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    # -- files -------------------------------------------------------------------------------
    def write_log(self, record: dict) -> None:
        if self.metrics_log is not None:
            self.metrics_log.write(json.dumps(record) + "\n")
            self.metrics_log.flush()

    def save_resume_state(self) -> None:
        """Every rank calls it (each adds its random state); rank 0 writes."""
        p = self.progress
        p["window_s"] = self.training_seconds() - self.window_started
        mine = {"torch_rng": torch.get_rng_state(), "task": self.task.extra_state()}
        if self.device.type == "cuda":  # dropout masks on the GPU come from its own generator
            mine["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        ranks = self.cluster.gather(mine)
        if not self.cluster.main:
            return
        checkpoint.save_weights(self.model, self.output / checkpoint.LAST)
        saved = dict(p, best_score=None if p["best_score"] == -math.inf else p["best_score"])
        os.fsync(self.metrics_log.fileno())  # the log as far as this state: what a resume keeps
        state = {"optimizer": self.optimizer.state_dict(), "progress": json.dumps(saved), **ranks[0]}
        if self.cluster.active:
            state["rank_states"] = ranks
        checkpoint.save_state(state, self.output / checkpoint.STATE)

    # -- the parts of a run ------------------------------------------------------------------
    def train_step(self, batch) -> tuple[float, int, float, float]:
        """One update; returns (summed loss, target count, pre-clip gradient norm, learning rate),
        loss and count summed over the ranks. A non-finite loss or gradient skips the update
        (counted, logged): one bad batch, or a bf16 overflow, should not end an hours-long run;
        MAX_NONFINITE_IN_ROW of them do."""
        p, t = self.progress, self.t
        total = p["total_steps"] if self.budget_s is not None or p["total_steps"] is not None else self.ceiling
        lr = learning_rate(t, p["step"], total, p["plateau_scale"], p["anneal_start"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, count = self.task.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cluster.active:
            # DDP averages the ranks' gradients: scaling each rank's sum by world / (all ranks'
            # count) makes that average the gradient of the mean over every rank's tokens
            total_loss, total_count = self.cluster.sum(float(loss.detach()), count)
            (loss * (self.cluster.world / max(total_count, 1))).backward()
            loss, count = total_loss, int(total_count)
        else:
            (loss / max(count, 1)).backward()
            loss = float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm, foreach=True))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            p["nonfinite_in_row"] = 0
            self.watch_gradients(grad_norm)
        else:
            self.skip_step(loss, grad_norm, count)
        p["step"] += 1
        p["batch"] += 1
        return loss, count, grad_norm, lr

    def skip_step(self, loss: float, grad_norm: float, count: int) -> None:
        p = self.progress
        p["skipped_steps"] += 1
        p["nonfinite_in_row"] += 1
        self.write_log({"type": "skip", "step": p["step"] + 1, "loss": str(loss / max(count, 1)),
                        "grad_norm": str(grad_norm), "skipped_steps": p["skipped_steps"]})
        log.warning("step %d: non-finite %s, update skipped (%d so far)", p["step"] + 1,
                    "loss" if not math.isfinite(loss) else "gradient", p["skipped_steps"])
        self.task.forget_state()  # a carried state that went non-finite would poison the next steps
        if p["nonfinite_in_row"] >= MAX_NONFINITE_IN_ROW:
            p["step"] += 1
            p["batch"] += 1
            self.save_resume_state()
            best = p["best"]["step"] if p["best"] else None
            raise UserError(f"training diverged: {MAX_NONFINITE_IN_ROW} steps in a row had a non-finite loss or "
                            f"gradient (up to step {p['step']}); {self.output} keeps the best model"
                            f"{f' (step {best})' if best else ''}; --resume continues on the next batches, best "
                            "with --set train.bf16=false (bf16 overflows) or a lower train.lr")

    def watch_gradients(self, grad_norm: float) -> None:
        """Warn once each when the window's median pre-clip norm says gradients vanish or explode."""
        self.recent_norms.append(grad_norm)
        if len(self.recent_norms) < GRADIENT_WINDOW:
            return
        median = sorted(self.recent_norms)[GRADIENT_WINDOW // 2]
        if median < VANISHING_BELOW and "vanishing" not in self.warned:
            self.warned.add("vanishing")
            log.warning("gradients are vanishing: median pre-clip norm %.2g over the last %d steps (below %g); "
                        "an lstm or gru cell, model.forget_bias=1 or a higher train.lr may help "
                        "(see scripts/gradient_flow.py)", median, GRADIENT_WINDOW, VANISHING_BELOW)
        if median > EXPLODING_ABOVE and "exploding" not in self.warned:
            self.warned.add("exploding")
            log.warning("gradients are exploding: median pre-clip norm %.3g over the last %d steps (above %g); "
                        "keep train.clip_norm set and lower train.lr", median, GRADIENT_WINDOW, EXPLODING_ABOVE)

    def evaluate(self) -> bool:
        """Validate, keep the best model, save the resume state; True when patience has run out."""
        p, t = self.progress, self.t
        eval_start, trained_s = clock(), self.training_seconds()
        result = self.task.validate()
        validate_s = clock() - eval_start
        improved = result["score"] > p["best_score"]
        record = {"type": "eval", "step": p["step"], "epoch": round(p["epoch"] + p["batch"] / max(len(self.batches), 1), 2),
                  "elapsed_s": round(clock() - self.started, 1), "eval_s": round(validate_s, 1),
                  **{k: v for k, v in result.items() if k != "score"}, "best": improved}
        self.write_log(record)
        shown = ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("type", "best"))
        log.info("eval: %s%s", shown, " (best)" if improved else "")
        if improved:
            p.update(best_score=result["score"], best=record, bad_evals=0)
            if self.cluster.main:
                checkpoint.save_weights(self.model, self.output / checkpoint.BEST)
                checkpoint.save_json({"best": record, "parameters": self.n_params}, self.output / "metrics.json")
        else:
            p["bad_evals"] += 1
            if t.lr_schedule == "plateau":
                p["plateau_scale"] = max(p["plateau_scale"] * 0.5, t.min_lr_ratio)
        self.replan(trained_s)
        self.save_resume_state()
        # what the plan counts per evaluation, saves included (rank 0's, so every rank plans alike)
        self.last_eval_s = self.cluster.from_main(clock() - eval_start)
        self.eval_seconds += self.last_eval_s
        return p["bad_evals"] >= t.patience

    def elapsed(self) -> float:
        """Wall clock since the start; in a distributed run rank 0's, as of the last step's sync."""
        return self.elapsed_s if self.cluster.active else clock() - self.started

    def training_seconds(self) -> float:
        """Wall clock since the start, evaluations and saves excluded: what throughput counts."""
        return clock() - self.started - self.eval_seconds

    def plan_share(self) -> float:
        """How far the run is: its share of the budget, or of its step ceiling (max_steps, else
        max_epochs) where it gets there first."""
        return max(self.elapsed() / self.budget_s, self.progress["step"] / self.ceiling)

    def plan_due(self) -> bool:
        """Starts the speed measurement when its time comes; True once the plan can be made."""
        share = self.plan_share()
        if self.measure_from is None and share >= PLAN_MEASURE_FROM:
            self.measure_from = (self.progress["step"], self.training_seconds())
        return (self.measure_from is not None and share >= PLAN_AT
                and self.progress["step"] >= max(self.t.warmup_steps, self.measure_from[0] + 5))

    def plan(self) -> None:
        """Fix the run's total step count from the measured speed so the budget is just used."""
        p = self.progress
        step_s = (self.training_seconds() - self.measure_from[1]) / (p["step"] - self.measure_from[0])
        steps_per_eval = self.t.eval_every or len(self.batches)
        p["total_steps"] = self.cluster.from_main(plan_total_steps(self.budget_s, self.elapsed(), p["step"], step_s,
                                                                   self.last_eval_s, steps_per_eval, self.ceiling))
        p["anneal_start"] = p["step"]
        self.speed_mark = (p["step"], self.training_seconds())
        record = {"type": "plan", "step": p["step"], "total_steps": p["total_steps"],
                  "epochs": round(p["total_steps"] / max(len(self.batches), 1), 2), "step_s": round(step_s, 4),
                  "eval_s": round(self.last_eval_s, 2), "budget_s": self.budget_s, "ceiling": self.ceiling}
        self.write_log(record)
        log.info("plan: %d steps (%.1f epochs) in the %g-minute budget, at %.3f s a step and %.1f s an evaluation",
                 p["total_steps"], record["epochs"], self.budget_s / 60, step_s, self.last_eval_s)
        self.save_resume_state()

    def replan(self, trained_s: float) -> None:
        """At each evaluation of a budget run, fit the plan to the speed of the steps since the last
        one when it has drifted: shorter when at that speed the run would overrun the whole budget
        (another process, a throttled CPU), so it still ends annealed; longer when it would leave
        more than twice the margin unused (a slowdown has passed, or the plan's measurement caught
        a slow spell), so the budget is spent training. In between the plan stands: a steady
        machine keeps it. A resumed session never lengthens the plan it resumed with (see
        `plan_cap`), so it follows it exactly unless its new budget is too short. `trained_s`:
        training seconds as the evaluation began."""
        p = self.progress
        mark, self.speed_mark = self.speed_mark, (p["step"], trained_s)
        if self.budget_s is None or p["total_steps"] is None or mark is None or p["step"] <= mark[0]:
            return
        step_s = (trained_s - mark[1]) / (p["step"] - mark[0])
        args = (self.budget_s, self.elapsed(), p["step"], step_s, self.last_eval_s or 0.0,
                self.t.eval_every or len(self.batches), self.plan_cap)
        overruns = plan_total_steps(*args, margin=0.0) < p["total_steps"]
        idles = p["total_steps"] < plan_total_steps(*args, margin=2 * BUDGET_MARGIN)
        total = self.cluster.from_main(plan_total_steps(*args) if overruns or idles else p["total_steps"])
        if total != p["total_steps"]:
            self.write_log({"type": "replan", "step": p["step"], "total_steps": total, "was": p["total_steps"],
                            "step_s": round(step_s, 4)})
            log.info("replan: %d steps instead of %d, at %.3f s a step since the last evaluation", total,
                     p["total_steps"], step_s)
            p["total_steps"] = total

    def out_of_time(self) -> bool:
        """True when the budget could not also cover one more evaluation."""
        return self.budget_s is not None and self.elapsed() + (self.last_eval_s or 0) >= self.budget_s

    def stop_reason(self) -> str | None:
        p, t = self.progress, self.t
        if t.max_steps and p["step"] >= t.max_steps:
            return f"reached max_steps {t.max_steps}"
        if p["total_steps"] is not None and p["step"] >= p["total_steps"]:
            return f"completed the {p['total_steps']} steps planned for the budget"
        if self.out_of_time():
            return f"time budget of {self.budget_s / 60:g} min used"
        return None

    def run(self) -> dict:
        """Epochs until a stop; SIGINT or SIGTERM finishes the current step, saves and stops."""
        p, t = self.progress, self.t
        self.model.train()
        self.stop = self.stop_reason()  # a run resumed at its last step has nothing left to train
        previous = self._catch_signals()
        together = False  # whether every rank ends here in step (not after one rank's own error)
        try:
            while self.stop is None and p["epoch"] < t.max_epochs:
                self.run_epoch()
            if self.since_eval:
                self.evaluate()
            together = True
        except Interrupted:
            together = True
            raise
        finally:
            if self.metrics_log is not None:
                self.metrics_log.close()
            if together:
                self.cluster.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        log.info("finished: %s; best %s", self.stop or f"{t.max_epochs} epochs", p["best"])
        return p["best"]

    def run_epoch(self) -> None:
        p, t = self.progress, self.t
        if self.batches_epoch != p["epoch"]:
            self.batches, self.batches_epoch = self.task.batches(p["epoch"]), p["epoch"]
        bar = tqdm(total=len(self.batches), initial=p["batch"], desc=f"epoch {p['epoch'] + 1}",
                   unit="batch", disable=None if self.cluster.main else True, mininterval=2, leave=False)
        while p["batch"] < len(self.batches) and self.stop is None:
            loss, count, grad_norm, lr = self.train_step(self.batches[p["batch"]])
            self.since_eval += 1
            if math.isfinite(loss):
                p["window_tokens"] += count
                p["window_loss"] += loss
            bar.update(1)
            if p["step"] % t.log_every == 0:
                record = self.log_train(grad_norm, lr)
                bar.set_postfix(loss=record["loss"], tok_s=int(record["tokens_per_s"]))
            self.after_step()
        bar.close()
        if p["batch"] >= len(self.batches):
            p["epoch"] += 1
            p["batch"] = 0
            if self.stop is None and self.out_of_time():
                self.stop = f"time budget of {self.budget_s / 60:g} min used"
            if not t.eval_every and self.stop is None:
                self.evaluate_or_stop()

    def after_step(self) -> None:
        """The plan, the stops and the step-count evaluations that may follow a step."""
        p, t = self.progress, self.t
        if self.cluster.active:  # one signal or clock for all ranks, so they stop and plan alike
            signalled, self.elapsed_s = self.cluster.max(self.interrupted is not None,
                                                         clock() - self.started if self.cluster.main else -1.0)
            if signalled and not self.interrupted:
                self.interrupted = "SIGTERM"
        if self.budget_s is not None and p["total_steps"] is None and self.plan_due():
            if self.last_eval_s is None and self.evaluate_or_stop():  # the plan needs an evaluation's cost
                return
            self.plan()
        self.stop = self.stop_reason()
        if self.interrupted and self.stop is None:  # a run at its end finishes instead: final evaluation, saves
            self.save_resume_state()
            raise Interrupted(f"{self.interrupted}: state saved at step {p['step']}; continue with --resume",
                              128 + signal.Signals[self.interrupted].value)
        if self.stop is None and t.eval_every and p["step"] % t.eval_every == 0:
            self.evaluate_or_stop()

    def evaluate_or_stop(self) -> bool:
        self.since_eval = 0
        if self.evaluate():
            self.stop = f"no improvement in {self.t.patience} evaluations"
        return self.stop is not None

    def _catch_signals(self) -> dict:
        """SIGINT and SIGTERM set a flag the loop reads after each step, so the saved state is one
        between steps (a second signal stops at once, keeping the last saved state)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = signal.Signals(signum).name
            log.info("%s: saving after this step (send it again to stop at once)", self.interrupted)

        return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}

    def log_train(self, grad_norm: float, lr: float) -> dict:
        """A train record over the steps since the last one (throughput: training time only)."""
        p = self.progress
        seconds = self.training_seconds() - self.window_started
        record = {"type": "train", "step": p["step"], "epoch": p["epoch"] + 1,
                  "loss": round(p["window_loss"] / max(p["window_tokens"], 1), 4), "lr": lr,
                  "grad_norm": round(grad_norm, 3) if math.isfinite(grad_norm) else str(grad_norm), "tokens_per_s": round(p["window_tokens"] / max(seconds, 1e-9), 1),
                  "elapsed_s": round(clock() - self.started, 1)}
        if p["skipped_steps"]:
            record["skipped_steps"] = p["skipped_steps"]
        self.write_log(record)
        p.update(window_tokens=0, window_loss=0.0)
        self.window_started = self.training_seconds()
        return record
