"""What each model kind brings to the one training loop, behind one protocol (`Task`).

A task has `model` and `tokenizer`; `batches(epoch)` (deterministic given the seed and epoch, this
rank's share); `loss(batch) -> (summed loss, target count)`; `validate() -> metrics with a
"score"` (higher is better); `test()` -> the test split's scores, or {} where there is none;
`extra_state()` / `load_extra_state()` for what must survive a resume; and `forget_state()` to
drop a carried state after a non-finite step. The trainer moves the model with `to(device)`,
wraps it for several processes through `forward`, and shards the data with `shard(rank, world)`.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from seq2seq import checkpoint, inference
from seq2seq.config import Config
from seq2seq.corpus import TokenizedCorpus
from seq2seq.data import (char_streams, corpus_file, corpus_files, load_labelled, load_pairs, non_empty, normalize_text, pad,
                          read_sentences, read_text, token_batches, within_length)
from seq2seq.device import Precision, autocast
from seq2seq.errors import UserError
from seq2seq.loss import smoothed_cross_entropy
from seq2seq.metrics import bleu_chrf, classification_scores
from seq2seq.models.rnn import detach
from seq2seq.shortlist import Shortlist
from seq2seq.tokenizer import BOS, EOS, PAD, CharVocab, LabelledTokenizer, SubwordTokenizer

log = logging.getLogger("seq2seq")

TEST_BEAM = 5


class Task(Protocol):
    model: torch.nn.Module
    forward: torch.nn.Module
    tokenizer: object

    def to(self, device: torch.device) -> None: ...
    def shard(self, rank: int, world: int) -> None: ...
    def batches(self, epoch: int) -> list: ...
    def loss(self, batch) -> tuple[torch.Tensor, int]: ...
    def validate(self) -> dict: ...
    def test(self) -> dict: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...
    def forget_state(self) -> None: ...


class Stateless:
    """A task that carries nothing from one batch to the next."""

    def extra_state(self) -> dict:
        return {}

    def forget_state(self) -> None:
        pass

    def load_extra_state(self, state: dict) -> None:
        pass


class TranslationTask(Stateless):
    def __init__(self, cfg: Config, data_dir: Path, tokenizer: SubwordTokenizer | None = None):
        d, self.cfg, self.data_dir = cfg.data, cfg, data_dir
        dev = list(non_empty(load_pairs(d, data_dir, "dev"), "dev"))  # first: a wrong dev path fails in seconds
        missing = [path for path in (corpus_files(d, data_dir, "test") if d.test else []) if not path.exists()]
        if missing:  # now, not when the test split is scored after training
            raise UserError(f"data.test: {missing[0]}: file not found")
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
        if len(order) < self.world:
            raise UserError(f"data.train: {len(order)} batch(es) an epoch cannot be shared by {self.world} processes: "
                            "lower train.batch_tokens, add data or run fewer processes")
        return order[self.rank :: self.world][: len(order) // self.world]  # as many for every rank: they step together

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

    def save_shortlist(self, folder: Path) -> None:
        """The vocabulary shortlist of the pairs trained on, kept with the model (`seq2seq.shortlist`)
        and used by `test`, as a loaded model uses it."""
        self.shortlist = Shortlist.of_corpus(self.train, self.rows, len(self.tokenizer))
        self.shortlist.save(folder)

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
                                   precision=Precision(bf16=self.cfg.train.bf16))  # the weights as trained
        scores = bleu_chrf([h[0][0] for h in hyps], self.dev_ref)
        self.model.train()
        dev_loss = total / max(count, 1)
        return {"dev_loss": round(dev_loss, 4), "dev_ppl": round(math.exp(dev_loss), 2),
                "dev_bleu": scores["bleu"], "dev_chrf": scores["chrf"], "score": scores["bleu"]}

    def test(self) -> dict:
        """BLEU and chrF of data.test at beam TEST_BEAM, in the precision `translate` picks, as
        `seq2seq evaluate` scores it; {} without a test split."""
        if not self.cfg.data.test:
            return {}
        pairs = list(non_empty(load_pairs(self.cfg.data, self.data_dir, "test"), "test"))
        if not pairs:
            raise UserError(f"data.test {self.cfg.data.test!r}: no sentence pairs")
        self.model.shortlist = getattr(self, "shortlist", None)
        try:
            hyps = inference.translate(self.model, self.tokenizer, [s for s, _ in pairs], beam=TEST_BEAM)
        finally:
            self.model.shortlist = None
        scores = bleu_chrf([h[0][0] for h in hyps], [t for _, t in pairs])
        self.model.train()
        return {"test_bleu": scores["bleu"], "test_chrf": scores["chrf"], "test_beam": TEST_BEAM,
                "test_sentences": len(pairs)}


class CharLMTask:
    def __init__(self, cfg: Config, data_dir: Path, tokenizer: CharVocab | None = None):
        self.cfg = cfg
        text = read_text(corpus_file(data_dir, cfg.data.text))
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

    def test(self) -> dict:
        return {}  # the held-out text is the validation split

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


class ClassifierTask(Stateless):
    """Labelled sentences: a SentencePiece model trained on the (normalised) training text, the
    label set read from the training split, batches of similar lengths within train.batch_tokens."""

    def __init__(self, cfg: Config, data_dir: Path, tokenizer: LabelledTokenizer | None = None):
        d, self.cfg, self.data_dir = cfg.data, cfg, data_dir
        dev = load_labelled(d, data_dir, "dev")  # first: a wrong dev path fails in seconds
        train = [(label, normalize_text(text, d.normalize)) for label, text, _ in load_labelled(d, data_dir, "train")]
        train = [(label, text) for label, text in train if text]
        if not train:
            raise UserError(f"data.train {d.train!r}: no labelled text")
        if tokenizer is None:
            tokenizer = LabelledTokenizer(SubwordTokenizer.train([t for _, t in train], d.vocab_size,
                                                                 d.spm_model_type).sp)
        if not tokenizer.labels:  # a new run, or a translator's tokenizer taken over (--init-from)
            tokenizer.labels, tokenizer.names = label_order({label for label, _ in train}), label_names(d.label_names)
        self.tokenizer = tokenizer
        self.train_ids, self.train_y = self.encode(train, f"data.train {d.train}")
        self.dev_ids, self.dev_y = self.encode([(label, normalize_text(text, d.normalize)) for label, text, _ in dev],
                                               f"data.dev {d.dev}", [n for *_, n in dev])
        self.lengths = np.array([len(ids) for ids in self.train_ids])
        self.probe = np.random.default_rng(cfg.train.seed).permutation(len(self.train_ids))[:2000]
        log.info("train: %d examples, labels %s; dev: %d", len(self.train_ids),
                 ", ".join(tokenizer.shown(i) for i in range(len(tokenizer.labels))), len(self.dev_ids))
        self.model = checkpoint.build(cfg, self.tokenizer)
        self.forward = self.model  # what training calls: the model, or its DistributedDataParallel wrapper
        self.device, self.rank, self.world = torch.device("cpu"), 0, 1

    def encode(self, examples: list[tuple[str, str]], where: str, numbers: list[int] | None = None):
        """Token ids (cut to data.max_tokens; an empty text is one PAD) and label indices; a label
        the model does not know is an error naming its line."""
        index = {label: i for i, label in enumerate(self.tokenizer.labels)}
        for k, (label, _) in enumerate(examples):
            if label not in index:
                line = f":{numbers[k]}" if numbers else ""
                raise UserError(f"{where}{line}: label {label!r} is not one of the training labels "
                                f"({', '.join(self.tokenizer.labels)})")
        ids = self.tokenizer.encode([text for _, text in examples])
        return [i[: self.cfg.data.max_tokens] or [PAD] for i in ids], np.array([index[label] for label, _ in examples])

    def to(self, device: torch.device) -> None:
        self.device = device
        self.model.to(device)

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def batches(self, epoch: int) -> list[np.ndarray]:
        order = token_batches(self.lengths, np.zeros_like(self.lengths), self.cfg.train.batch_tokens,
                              self.cfg.train.seed * 1000 + epoch)
        if len(order) < self.world:
            raise UserError(f"data.train: {len(order)} batch(es) an epoch cannot be shared by {self.world} processes")
        return order[self.rank :: self.world][: len(order) // self.world]

    def loss(self, rows: np.ndarray) -> tuple[torch.Tensor, int]:
        return self.rows_loss([self.train_ids[i] for i in rows], self.train_y[rows])

    def rows_loss(self, ids: list[list[int]], labels: np.ndarray, smoothing: float | None = None):
        batch, lengths = pad(ids, PAD)
        target = torch.as_tensor(labels, device=self.device)
        net = self.forward if self.model.training else self.model
        with autocast(self.cfg.train.bf16, self.device):
            logits = net(batch.to(self.device), lengths)
        smoothing = self.cfg.train.label_smoothing if smoothing is None else smoothing
        return smoothed_cross_entropy(logits.float(), target, smoothing, grad_scale=1 / len(ids)), len(ids)

    @torch.no_grad()
    def scores(self, ids: list[list[int]], labels: np.ndarray) -> dict:
        """Loss (nats an example), accuracy, F1 and confusion of the model in eval mode."""
        probabilities = inference.class_probabilities(self.model, ids, precision=Precision(bf16=self.cfg.train.bf16))
        self.model.train()
        truth = torch.as_tensor(labels)
        loss = -probabilities[torch.arange(len(ids)), truth].clamp_min(1e-30).log().mean()  # one pass gives both
        predicted = probabilities.argmax(-1).tolist()
        return {"loss": round(float(loss), 4), **classification_scores(labels.tolist(), predicted, self.tokenizer.labels)}

    def validate(self) -> dict:
        dev = self.scores(self.dev_ids, self.dev_y)
        train = self.scores([self.train_ids[i] for i in self.probe], self.train_y[self.probe])
        return {"dev_loss": dev["loss"], "dev_accuracy": dev["accuracy"], "dev_macro_f1": dev["macro_f1"],
                **({"dev_f1": dev["f1"]} if "f1" in dev else {}), "train_loss": train["loss"],
                "train_accuracy": train["accuracy"], "score": dev["accuracy"]}

    def test(self) -> dict:
        d = self.cfg.data
        if not d.test:
            return {}
        test = load_labelled(d, self.data_dir, "test")
        ids, labels = self.encode([(label, normalize_text(text, d.normalize)) for label, text, _ in test],
                                  f"data.test {d.test}", [n for *_, n in test])
        scores = self.scores(ids, labels)
        return {"test_accuracy": scores["accuracy"], "test_macro_f1": scores["macro_f1"], "test_examples": len(ids)}


class EncoderLMTask(ClassifierTask):
    """A classifier's embedding and encoder pretrained as a language model (`model.head = "lm"`)
    on the training split's text and data.unlabelled, scored by the dev text's perplexity. The
    tokenizer and the label set are the classifier's, so that a classifier can start from it."""

    def __init__(self, cfg: Config, data_dir: Path, tokenizer: LabelledTokenizer | None = None):
        super().__init__(cfg, data_dir, tokenizer)
        d = cfg.data
        extra = [normalize_text(text, d.normalize) for text in read_sentences(data_dir, d.unlabelled)]
        extra = [ids[: d.max_tokens] for ids in self.tokenizer.encode(extra) if len(ids) > 1]
        self.train_ids = [ids for ids in self.train_ids if len(ids) > 1] + extra  # a one-piece text predicts nothing
        self.train_y = None  # no labels: what is learnt is the text
        self.dev_ids = [ids for ids in self.dev_ids if len(ids) > 1]
        self.lengths = np.array([len(ids) for ids in self.train_ids])
        self.probe = np.random.default_rng(cfg.train.seed).permutation(len(self.train_ids))[:2000]
        log.info("language model: %d sentences (%d from data.unlabelled), %d pieces", len(self.train_ids), len(extra),
                 int(self.lengths.sum()))

    def loss(self, rows: np.ndarray) -> tuple[torch.Tensor, int]:
        return self.text_loss([self.train_ids[i] for i in rows])

    def text_loss(self, ids: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Summed negative log-likelihood of both directions, and the pieces predicted."""
        batch, lengths = pad(ids, PAD)
        net = self.forward if self.model.training else self.model
        with autocast(self.cfg.train.bf16, self.device):
            loss, count = net(batch.to(self.device), lengths)
        return loss.float(), int(count)

    @torch.no_grad()
    def nats_per_piece(self, ids: list[list[int]]) -> float:
        self.model.eval()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        total = count = 0
        for start in range(0, len(order), 256):
            loss, n = self.text_loss([ids[i] for i in order[start : start + 256]])
            total, count = total + float(loss), count + n
        self.model.train()
        return round(total / max(count, 1), 4)

    def validate(self) -> dict:
        dev = self.nats_per_piece(self.dev_ids)
        train = self.nats_per_piece([self.train_ids[i] for i in self.probe])
        return {"dev_loss": dev, "dev_ppl": round(math.exp(dev), 2), "train_loss": train, "score": -dev}

    def test(self) -> dict:
        return {}


def task_class(cfg: Config) -> type:
    if cfg.kind == "classifier" and cfg.model.head == "lm":
        return EncoderLMTask
    return TASKS[cfg.kind]


def label_order(labels: set[str]) -> list[str]:
    """Integer labels in numeric order, others alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def label_names(spec: str) -> dict[str, str]:
    """data.label_names "0=negative,1=positive" as a dict."""
    names = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        label, sep, name = part.partition("=")
        if not sep or not label.strip() or not name.strip():
            raise UserError(f"data.label_names: expected label=name pairs separated by commas, got {part!r}")
        names[label.strip()] = name.strip()
    return names


TASKS = {"translator": TranslationTask, "charlm": CharLMTask, "classifier": ClassifierTask}
