"""A vocabulary shortlist for the translator's output layer, as Marian's lexical shortlist and
CTranslate2's vocabulary mapping: a sentence's output layer scores only the target pieces its
source pieces translate to in the training corpus, the corpus's most frequent target pieces and
its own source pieces (names and numbers are copied), not the whole vocabulary. At one sentence
the output layer is a decoder step's largest product but one, and most of its rows are never chosen.

Each sentence is scored over its own list, alone or batched with others: a few sentences' output
layer computes the union of their lists on the selected rows, a larger batch's the whole packed
layer (per-batch packing would cost more than the rows it saves), and each row's logits outside its
own list are set to -inf (`Translator.start`). The list is kept in the model folder (`FILE`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from seq2seq.files import atomic_path
from seq2seq.tokenizer import EOS, PAD, UNK

FILE = "shortlist.safetensors"
# Marian's defaults are 50 and 100 words; subword pieces need more, and smaller lists moved the
# released en-fr model's BLEU (docs/performance.md).
PER_PIECE, FREQUENT = 200, 1000
MAX_PAIRS = 500_000  # a larger corpus is read at evenly spaced pairs: its counts need memory per pair


class Shortlist:
    """`candidates` (vocabulary, PER_PIECE): each source piece's best target pieces (-1: none);
    `frequent`: target pieces every sentence may produce (the specials and the most frequent)."""

    def __init__(self, candidates: torch.Tensor, frequent: torch.Tensor):
        self.candidates, self.frequent = candidates.long(), frequent.long()

    @classmethod
    def build(cls, src_ids, tgt_ids, vocab_size: int, specials: list[int], per_piece: int = PER_PIECE,
              frequent: int = FREQUENT) -> "Shortlist":
        """From a corpus's token ids (lists of lists): each source piece's `per_piece` target pieces
        of highest Dice coefficient 2 c(s, t) / (c(s) + c(t)) over sentence pairs (c: in how many
        pairs a piece, or both, occur), and the `frequent` target pieces in the most pairs."""
        pair_s, pair_t, pair_count, src_count, tgt_count = _cooccurrences(src_ids, tgt_ids, vocab_size)
        candidates = torch.full((vocab_size, per_piece), -1, dtype=torch.int32)
        for s in np.unique(pair_s):
            take = slice(*np.searchsorted(pair_s, [s, s + 1]))
            t, together = pair_t[take], pair_count[take]
            dice = 2 * together / (src_count[s] + tgt_count[t])
            best = t[np.argsort(-dice, kind="stable")[:per_piece]]
            candidates[s, : len(best)] = torch.from_numpy(best.astype(np.int32))
        top = np.argsort(-tgt_count, kind="stable")[:frequent]
        return cls(candidates, torch.tensor(sorted(set(specials) | set(top.tolist()))))

    @classmethod
    def of_corpus(cls, corpus, rows: np.ndarray, vocab_size: int) -> "Shortlist":
        """From the pairs `rows` of a `TokenizedCorpus` (at most MAX_PAIRS of them, evenly spaced)."""
        if len(rows) > MAX_PAIRS:
            rows = rows[np.linspace(0, len(rows) - 1, MAX_PAIRS).astype(np.int64)]
        return cls.build(*corpus.rows(rows), vocab_size, specials=[EOS, UNK])

    def allowed(self, src: torch.Tensor) -> torch.Tensor:
        """(B, vocabulary) true at the target pieces each source sentence may produce: src (B, S)
        padded token ids. One scatter for the batch: a loop over its sentences cost more than the
        search it serves."""
        src = src.cpu()
        vocab = len(self.candidates)
        pieces = torch.cat([src.masked_fill(src == PAD, vocab),  # padding to a column dropped below
                            self.candidates[src].masked_fill((src == PAD).unsqueeze(2), -1).flatten(1)], 1)
        allowed = torch.zeros(src.size(0), vocab + 1, dtype=torch.bool)
        allowed.scatter_(1, pieces.masked_fill(pieces < 0, vocab), True)
        allowed[:, self.frequent] = True
        return allowed[:, :vocab]

    def ids(self, src: torch.Tensor) -> list[torch.Tensor]:
        """Each source sentence's target pieces, sorted."""
        return [row.nonzero().squeeze(1) for row in self.allowed(src)]

    def restrict(self, src: torch.Tensor, columns: bool, extra: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For a batch of source sentences src (B, S): the vocabulary columns its output layer
        computes, the union of the sentences' lists, sorted (with `columns` false: None, every
        column), and a (B, columns) bias to add to each sentence's logits, 0 at its own pieces and
        -inf elsewhere (None for one sentence, whose list is the union). `extra` (B, vocabulary;
        bool): pieces each sentence must keep besides (those a prefix or a constraint asks for)."""
        allowed = self.allowed(src)
        if extra is not None:
            allowed |= extra.cpu()
        ids = allowed.any(0).nonzero().squeeze(1) if columns else None
        if ids is not None:
            if len(allowed) == 1:
                return ids.to(src.device), None
            allowed = allowed[:, ids]
        bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
        return None if ids is None else ids.to(src.device), bias.to(src.device)

    def save(self, folder: Path) -> None:
        small = len(self.candidates) <= torch.iinfo(torch.int16).max  # int16 halves the file
        dtype = torch.int16 if small else torch.int32
        tensors = {"candidates": self.candidates.to(dtype).contiguous(), "frequent": self.frequent.int().contiguous()}
        with atomic_path(Path(folder) / FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})

    @classmethod
    def load(cls, folder: Path) -> "Shortlist | None":
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        return cls(tensors["candidates"], tensors["frequent"])


def _cooccurrences(src_ids, tgt_ids, vocab_size: int):
    """The (source piece, target piece) pairs occurring together in some sentence pair, sorted,
    with in how many; and each piece's count of sentence pairs it occurs in."""
    src_sets = [np.unique(np.asarray(s, dtype=np.int64)) for s in src_ids]
    tgt_sets = [np.unique(np.asarray(t, dtype=np.int64)) for t in tgt_ids]
    src_count = np.bincount(np.concatenate(src_sets or [np.zeros(0, np.int64)]), minlength=vocab_size)
    tgt_count = np.bincount(np.concatenate(tgt_sets or [np.zeros(0, np.int64)]), minlength=vocab_size)
    keys = np.concatenate([(s[:, None] * vocab_size + t[None, :]).ravel() for s, t in zip(src_sets, tgt_sets)]
                          or [np.zeros(0, np.int64)])
    keys, together = np.unique(keys, return_counts=True)
    return keys // vocab_size, keys % vocab_size, together, src_count, tgt_count
