"""One training loop for both models; a task object supplies the model-specific parts.

A task has: `model`, `tokenizer`, `batches(epoch)` (deterministic given the seed and epoch),
`loss(batch) -> (summed loss, target count)`, `validate() -> metrics with a "score" (higher is
better)`, and `extra_state()` / `load_extra_state()` for what must survive a resume.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from seq2seq import checkpoint, inference
from seq2seq.config import Config
from seq2seq.data import (char_streams, drop_empty, load_pairs, within_length, pad, read_text, resolve,
                          token_batches)
from seq2seq.errors import UserError
from seq2seq.loss import smoothed_cross_entropy
from seq2seq.metrics import bleu_chrf
from seq2seq.models.rnn import detach
from seq2seq.tokenizer import BOS, EOS, PAD, CharVocab, SubwordTokenizer

log = logging.getLogger("seq2seq")


class TranslationTask:
    def __init__(self, cfg: Config, data_dir: Path, tokenizer: SubwordTokenizer | None = None):
        d, self.cfg = cfg.data, cfg
        train = drop_empty(load_pairs(d, data_dir, "train"), "train")
        dev = drop_empty(load_pairs(d, data_dir, "dev"), "dev")
        if not train:
            raise UserError(f"data.train {d.train!r}: no sentence pairs")
        if tokenizer is None:
            log.info("training SentencePiece (%s, vocabulary %d) on %d pairs", d.spm_model_type, d.vocab_size, len(train))
            tokenizer = SubwordTokenizer.train([s for s, _ in train] + [t for _, t in train], d.vocab_size,
                                               d.spm_model_type)
        self.tokenizer = tokenizer
        self.train_src = [s for s, _ in train]
        self.train_tgt = [t for _, t in train]
        src_ids, tgt_ids = tokenizer.encode(self.train_src), tokenizer.encode(self.train_tgt)
        keep = within_length(src_ids, tgt_ids, d.max_tokens, "train")
        self.train_src = [self.train_src[i] for i in keep]
        self.train_tgt = [self.train_tgt[i] for i in keep]
        self.src_ids, self.tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
        if not self.src_ids:
            raise UserError(f"data.train {d.train!r}: no pair is within data.max_tokens = {d.max_tokens}")
        if not dev:
            raise UserError(f"data.dev {d.dev!r}: no sentence pairs")
        if d.dev_max_sentences:
            dev = dev[: d.dev_max_sentences]
        self.dev_src, self.dev_ref = [s for s, _ in dev], [t for _, t in dev]
        dev_src_ids, dev_tgt_ids = tokenizer.encode(self.dev_src), tokenizer.encode(self.dev_ref)
        keep = within_length(dev_src_ids, dev_tgt_ids, d.max_tokens, "dev")  # for dev loss; BLEU uses all
        self.dev_src_ids, self.dev_tgt_ids = [dev_src_ids[i] for i in keep], [dev_tgt_ids[i] for i in keep]
        log.info("train: %d pairs, %d target tokens; dev: %d pairs", len(self.src_ids),
                 sum(map(len, self.tgt_ids)), len(self.dev_src))
        self.model = checkpoint.build(cfg, tokenizer)

    def batches(self, epoch: int) -> list:
        d, t = self.cfg.data, self.cfg.train
        src_ids, tgt_ids = self.src_ids, self.tgt_ids
        if d.sample_alpha > 0:  # subword regularization: a fresh segmentation each epoch
            import sentencepiece as spm
            spm.set_random_generator_seed(t.seed * 1000 + epoch)
            src_ids = self.tokenizer.encode(self.train_src, d.sample_alpha)
            tgt_ids = self.tokenizer.encode(self.train_tgt, d.sample_alpha)
        order = token_batches([len(s) + 1 for s in src_ids], [len(s) + 1 for s in tgt_ids], t.batch_tokens,
                              seed=t.seed * 1000 + epoch)
        return [([src_ids[i] for i in b], [tgt_ids[i] for i in b]) for b in order]

    def loss(self, batch, smoothing: float | None = None, teacher_forcing: float | None = None) -> tuple[torch.Tensor, int]:
        src, src_len = pad(batch[0], PAD, eos=EOS)
        tgt, _ = pad(batch[1], PAD, bos=BOS, eos=EOS)
        ratio = self.cfg.train.teacher_forcing if teacher_forcing is None else teacher_forcing
        with inference.autocast(self.cfg.train.bf16):
            logits = self.model(src, src_len, tgt[:, :-1], teacher_forcing=ratio)
        target = tgt[:, 1:]
        smoothing = self.cfg.train.label_smoothing if smoothing is None else smoothing
        loss = smoothed_cross_entropy(logits.flatten(0, 1), target.flatten(), smoothing, ignore_index=PAD)
        return loss, int((target != PAD).sum())

    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        total, count = 0.0, 0
        order = token_batches([len(s) + 1 for s in self.dev_src_ids], [len(s) + 1 for s in self.dev_tgt_ids],
                              self.cfg.train.batch_tokens, seed=0)
        for b in order:
            loss, n = self.loss(([self.dev_src_ids[i] for i in b], [self.dev_tgt_ids[i] for i in b]),
                                smoothing=0.0, teacher_forcing=1.0)
            total, count = total + float(loss), count + n
        hyps = inference.translate(self.model, self.tokenizer, self.dev_src, beam=self.cfg.train.dev_beam,
                                   bf16=self.cfg.train.bf16)
        scores = bleu_chrf([h[0][0] for h in hyps], self.dev_ref)
        self.model.train()
        dev_loss = total / max(count, 1)
        return {"dev_loss": round(dev_loss, 4), "dev_ppl": round(math.exp(dev_loss), 2),
                "dev_bleu": scores["bleu"], "dev_chrf": scores["chrf"], "score": scores["bleu"]}

    def extra_state(self) -> dict:
        return {}

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
        self.streams = char_streams(self.train_ids, cfg.train.batch_size)
        log.info("text: %d characters, vocabulary %d; train %d, validation %d characters",
                 len(text), len(self.tokenizer), split, len(text) - split)
        self.model = checkpoint.build(cfg, self.tokenizer)
        self.hidden = None

    def batches(self, epoch: int) -> list:
        return list(range(0, self.streams.size(1) - 1, self.cfg.train.bptt))

    def loss(self, start: int) -> tuple[torch.Tensor, int]:
        if start == 0:
            self.hidden = None  # each epoch reads the streams from their start
        x = self.streams[:, start : start + self.cfg.train.bptt]
        y = self.streams[:, start + 1 : start + 1 + self.cfg.train.bptt]
        x = x[:, : y.size(1)]
        with inference.autocast(self.cfg.train.bf16):
            logits, hidden = self.model(x, self.hidden)
        self.hidden = detach(hidden)  # truncated BPTT: carry the state, not its graph
        loss = smoothed_cross_entropy(logits.flatten(0, 1), y.flatten())
        return loss, y.numel()

    def validate(self) -> dict:
        # fp32 even when training in bf16: this is the number reported against quality bars
        scores = inference.score_text(self.model, self.valid_ids, context=self.train_ids[-256:])
        self.model.train()
        return {"valid_nats_per_char": round(scores["nats_per_char"], 4),
                "valid_bits_per_char": round(scores["bits_per_char"], 4), "score": -scores["nats_per_char"]}

    def extra_state(self) -> dict:
        if self.hidden is None:
            return {}
        hidden = self.hidden if isinstance(self.hidden, tuple) else (self.hidden,)
        return {f"hidden{i}": h for i, h in enumerate(hidden)}

    def load_extra_state(self, state: dict) -> None:
        parts = [state[f"hidden{i}"] for i in range(2) if f"hidden{i}" in state]
        self.hidden = None if not parts else (tuple(parts) if len(parts) == 2 else parts[0])


TASKS = {"translator": TranslationTask, "charlm": CharLMTask}


def learning_rate(cfg, step: int, total_steps: int, plateau_scale: float) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, step / max(total_steps, 1))
        factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.lr_schedule == "plateau":
        factor = plateau_scale
    elif cfg.lr_schedule == "constant":
        factor = 1.0
    else:
        raise UserError(f"train.lr_schedule must be cosine, plateau or constant, got {cfg.lr_schedule!r}")
    return cfg.lr * warm * factor


def train(cfg: Config, data_dir: Path | None, output: Path, time_budget: float | None = None,
          resume: bool = False) -> dict:
    """Train into `output`; returns the best evaluation. `time_budget` is in minutes of wall clock.
    On resume, `data_dir` None means the folder the run was started with."""
    started = time.monotonic()
    t = cfg.train
    output = Path(output)
    if resume and not (output / checkpoint.STATE).is_file():
        raise UserError(f"{output}: nothing to resume ({checkpoint.STATE} not found)")
    if not resume and (output / "config.json").exists():
        raise UserError(f"{output} already holds a model: pass --resume to continue it, or choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(t.threads or os.cpu_count() or 1)
    torch.manual_seed(t.seed)
    learning_rate(t, 0, 1, 1.0)  # a bad schedule name fails now, before anything is written

    tokenizer, state = None, None
    if resume:
        tokenizer = (SubwordTokenizer if cfg.kind == "translator" else CharVocab).load(output)
        state = checkpoint.load_state(output / checkpoint.STATE)
        data_dir = data_dir or Path(json.loads(state["progress"])["data_dir"])
    data_dir = Path(data_dir)
    task = TASKS[cfg.kind](cfg, data_dir, tokenizer)
    model = task.model
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters", cfg.kind, n_params / 1e6)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=(0.9, 0.98), weight_decay=t.weight_decay)

    progress = {"step": 0, "epoch": 0, "batch": 0, "best_score": -math.inf, "best": None,
                "bad_evals": 0, "plateau_scale": 1.0, "data_dir": str(data_dir.resolve())}
    if resume:
        checkpoint.load_weights(model, output / checkpoint.LAST)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise UserError(f"{output / checkpoint.STATE}: does not match the model ({e})") from None
        progress = dict(json.loads(state["progress"]), data_dir=str(data_dir.resolve()))
        progress["best_score"] = -math.inf if progress["best_score"] is None else progress["best_score"]
        torch.set_rng_state(state["torch_rng"])
        task.load_extra_state(state.get("task", {}))
        log.info("resuming %s at epoch %d, step %d", output, progress["epoch"] + 1, progress["step"])
    else:
        task.tokenizer.save(output)
    cfg.save(output / "config.json")  # on resume too: --set train.* overrides are kept

    metrics_log = open(output / "metrics.jsonl", "a", encoding="utf-8")

    def write_log(record: dict) -> None:
        metrics_log.write(json.dumps(record) + "\n")
        metrics_log.flush()

    def save_resume_state() -> None:
        checkpoint.save_weights(model, output / checkpoint.LAST)
        saved = dict(progress, best_score=None if progress["best_score"] == -math.inf else progress["best_score"])
        checkpoint.save_state({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                               "progress": json.dumps(saved), "task": task.extra_state()}, output / checkpoint.STATE)

    last_eval_seconds = 0.0

    def out_of_time() -> bool:
        """True when the budget could not also cover one more evaluation."""
        return bool(time_budget) and time.monotonic() - started + last_eval_seconds >= time_budget * 60

    if not resume:
        save_resume_state()

    def evaluate() -> bool:
        """Validate, keep the best model, save the resume state; True when patience has run out."""
        nonlocal last_eval_seconds, window_start
        eval_start = time.monotonic()
        result = task.validate()
        last_eval_seconds = time.monotonic() - eval_start
        window_start += last_eval_seconds  # throughput counts training time only
        improved = result["score"] > progress["best_score"]
        epochs_done = progress["epoch"] + progress["batch"] / max(len(batches), 1)
        record = {"type": "eval", "step": progress["step"], "epoch": round(epochs_done, 2),
                  "elapsed_s": round(time.monotonic() - started, 1), "eval_s": round(last_eval_seconds, 1),
                  **{k: v for k, v in result.items() if k != "score"}, "best": improved}
        write_log(record)
        shown = ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("type", "best"))
        log.info("eval: %s%s", shown, " (best)" if improved else "")
        if improved:
            progress.update(best_score=result["score"], best=record, bad_evals=0)
            checkpoint.save_weights(model, output / checkpoint.BEST)
            checkpoint.save_json({"best": record, "parameters": n_params}, output / "metrics.json")
        else:
            progress["bad_evals"] += 1
            if t.lr_schedule == "plateau":
                progress["plateau_scale"] = max(progress["plateau_scale"] * 0.5, t.min_lr_ratio)
        save_resume_state()
        return progress["bad_evals"] >= t.patience

    batches, batches_epoch = task.batches(progress["epoch"]), progress["epoch"]
    total_steps = t.max_steps or t.max_epochs * len(batches)
    model.train()
    stop_reason, since_eval = None, 0
    tokens_seen, window_start, loss_sum, loss_count = 0, time.monotonic(), 0.0, 0
    try:
        while stop_reason is None and progress["epoch"] < t.max_epochs:
            if batches_epoch != progress["epoch"]:
                batches, batches_epoch = task.batches(progress["epoch"]), progress["epoch"]
            bar = tqdm(total=len(batches), initial=progress["batch"], desc=f"epoch {progress['epoch'] + 1}",
                       unit="batch", disable=None, mininterval=2, leave=False)
            while progress["batch"] < len(batches):
                lr = learning_rate(t, progress["step"], total_steps, progress["plateau_scale"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, count = task.loss(batches[progress["batch"]])
                optimizer.zero_grad(set_to_none=True)
                (loss / max(count, 1)).backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm))
                optimizer.step()
                progress["step"] += 1
                progress["batch"] += 1
                since_eval += 1
                tokens_seen += count
                loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + count
                bar.update(1)
                if progress["step"] % t.log_every == 0:
                    now = time.monotonic()
                    record = {"type": "train", "step": progress["step"], "epoch": progress["epoch"] + 1,
                              "loss": round(loss_sum / max(loss_count, 1), 4), "lr": lr, "grad_norm": round(grad_norm, 3),
                              "tokens_per_s": round(tokens_seen / max(now - window_start, 1e-9), 1),
                              "elapsed_s": round(now - started, 1)}
                    write_log(record)
                    bar.set_postfix(loss=record["loss"], tok_s=int(record["tokens_per_s"]))
                    tokens_seen, window_start, loss_sum, loss_count = 0, now, 0.0, 0
                if t.max_steps and progress["step"] >= t.max_steps:
                    stop_reason = f"reached max_steps {t.max_steps}"
                elif out_of_time():
                    stop_reason = f"time budget of {time_budget:g} min used"
                if stop_reason:
                    break
                if t.eval_every and progress["step"] % t.eval_every == 0:
                    since_eval = 0
                    if evaluate():
                        stop_reason = f"no improvement in {t.patience} evaluations"
                        break
            bar.close()
            if progress["batch"] >= len(batches):
                progress["epoch"] += 1
                progress["batch"] = 0
                if stop_reason is None and out_of_time():
                    stop_reason = f"time budget of {time_budget:g} min used"
                if not t.eval_every and stop_reason is None:
                    since_eval = 0
                    if evaluate():
                        stop_reason = f"no improvement in {t.patience} evaluations"
        if since_eval:
            evaluate()
    except KeyboardInterrupt:
        save_resume_state()
        log.info("interrupted: state saved at step %d; continue with --resume", progress["step"])
        raise
    finally:
        metrics_log.close()
    log.info("finished: %s; best %s", stop_reason or f"{t.max_epochs} epochs", progress["best"])
    return progress["best"]
