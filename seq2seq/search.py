"""Greedy search, beam search and sampling, written once for both models.

A model offers three things (see `Translator` and `CharLM`):
  `step(tokens (N,), state) -> (log_probs (N, V), state)`,
  `reorder_state(state, index) -> state` (select/repeat batch rows), and a start state built by
  the caller with the first input tokens (BOS for the translator, the prompt's last character
  for the language model). Rows whose sentence is finished are dropped from the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # log-probability; for beam search divided by length ** length_penalty


def _as_lengths(max_lens, batch: int) -> torch.Tensor:
    if isinstance(max_lens, int):
        return torch.full((batch,), max_lens, dtype=torch.long)
    return torch.as_tensor(max_lens, dtype=torch.long).clone()


def _decode(model, state, first_tokens: torch.Tensor, max_lens, eos: int | None,
            choose: Callable[[torch.Tensor], torch.Tensor],
            on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> list[Hypothesis]:
    """One token per step per row, `choose(log_probs) -> tokens`, until EOS or the row's max length."""
    batch = first_tokens.size(0)
    max_lens = _as_lengths(max_lens, batch)
    steps = int(max_lens.max()) if batch else 0
    seqs = torch.full((batch, max(steps, 1)), -1, dtype=torch.long)
    scores = torch.zeros(batch, dtype=torch.float64)
    active, tokens = torch.arange(batch), first_tokens
    for t in range(steps):
        log_probs, state = model.step(tokens, state)
        tokens = choose(log_probs)
        seqs[active, t] = tokens
        scores[active] += log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1).double()
        if on_step is not None:
            on_step(active, tokens)
        done = t + 1 >= max_lens[active]
        if eos is not None:
            done |= tokens == eos
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            active, tokens = active[keep], tokens[keep]
            if not active.numel():
                break
            state = model.reorder_state(state, keep)
    out = []
    for row, score in zip(seqs.tolist(), scores.tolist()):
        row = [tok for tok in row if tok >= 0]
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        out.append(Hypothesis(row, score))
    return out


@torch.no_grad()
def greedy(model, state, first_tokens, max_lens, eos: int | None = None) -> list[Hypothesis]:
    return _decode(model, state, first_tokens, max_lens, eos, lambda lp: lp.argmax(-1))


@torch.no_grad()
def sample(model, state, first_tokens, max_lens, eos: int | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
           on_step=None) -> list[Hypothesis]:
    """Ancestral sampling with temperature, top-k and nucleus (top-p) filtering; temperature 0 is greedy."""
    if temperature <= 0:
        return _decode(model, state, first_tokens, max_lens, eos, lambda lp: lp.argmax(-1), on_step)

    def choose(log_probs: torch.Tensor) -> torch.Tensor:
        logits = log_probs / temperature
        if 0 < top_k < logits.size(-1):
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the tokens before it already hold top_p of the mass
            drop = probs.cumsum(-1) - probs >= top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)

    return _decode(model, state, first_tokens, max_lens, eos, choose, on_step)


@torch.no_grad()
def beam_search(model, state, first_tokens, max_lens, beam_size: int, eos: int | None = None,
                length_penalty: float = 1.0, nbest: int = 1) -> list[list[Hypothesis]]:
    """Batched beam search over (batch x beam) rows; returns the `nbest` best hypotheses per input.

    Each step takes the best 2K continuations of a sentence's K beams; those ending in EOS among
    the top K are set aside as finished (fairseq's rule), the best K others go on. A sentence is
    done when K hypotheses have finished or it reaches its max length (then its top K are
    finished as they are). Scores are log-probabilities divided by length ** length_penalty,
    the length counting the EOS.
    """
    if nbest > beam_size:
        raise ValueError(f"nbest ({nbest}) cannot exceed the beam size ({beam_size})")
    batch, k = first_tokens.size(0), beam_size
    max_lens = _as_lengths(max_lens, batch)
    expand = torch.arange(batch).repeat_interleave(k)
    state = model.reorder_state(state, expand)
    tokens = first_tokens.index_select(0, expand)
    scores = torch.full((batch, k), float("-inf"))
    scores[:, 0] = 0.0
    seqs = torch.zeros(batch * k, 0, dtype=torch.long)
    active = torch.arange(batch)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    n_finished = torch.zeros(batch, dtype=torch.long)
    length = 0
    while active.numel():
        length += 1
        log_probs, state = model.step(tokens, state)
        n, vocab = active.numel(), log_probs.size(-1)
        candidates = (scores.view(-1, 1) + log_probs).view(n, k * vocab)
        width = min(2 * k, k * vocab)
        top_scores, top_ids = candidates.topk(width, dim=1)
        origin, top_tokens = top_ids // vocab, top_ids % vocab
        is_eos = top_tokens == eos if eos is not None else torch.zeros_like(top_tokens, dtype=torch.bool)
        last_step = length >= max_lens[active]
        in_top_k = torch.arange(width) < k
        finishing = (is_eos | last_step.unsqueeze(1)) & in_top_k & (top_scores > float("-inf"))
        rows, cols = finishing.nonzero(as_tuple=True)
        if rows.numel():
            prefixes = seqs.view(n, k, -1)[rows, origin[rows, cols]].tolist()
            normalised = (top_scores[rows, cols] / length ** length_penalty).tolist()
            ended = is_eos[rows, cols].tolist()
            last = top_tokens[rows, cols].tolist()
            sentences = active[rows].tolist()
            for sent, prefix, score, was_eos, tok in zip(sentences, prefixes, normalised, ended, last):
                finished[sent].append(Hypothesis(prefix if was_eos else prefix + [tok], score))
            n_finished.index_add_(0, active[rows], torch.ones_like(rows))
        done = last_step | (n_finished[active] >= k)
        alive_scores, pick = top_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=1)
        keep = (~done).nonzero().squeeze(1)
        rows_kept = (keep.unsqueeze(1) * k + origin.gather(1, pick)[keep]).view(-1)
        next_tokens = top_tokens.gather(1, pick)[keep]
        active, scores = active[keep], alive_scores[keep]
        if not active.numel():
            break
        state = model.reorder_state(state, rows_kept)
        seqs = torch.cat([seqs[rows_kept], next_tokens.view(-1, 1)], dim=1)
        tokens = next_tokens.view(-1)
    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]
