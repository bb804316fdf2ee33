"""Greedy search, beam search and sampling, written once for both models.

A model offers three things (see `Translator` and `CharLM`):
  `step(tokens (N,), state) -> (logits (N, V), state)` (in the model's compute dtype),
  `reorder_state(state, rows, sentences) -> state` (select/repeat batch rows; what a model keeps
  once per input, such as the translator's encoder states, by `sentences`, None for unchanged),
  and a start state built by the caller with the first input tokens (BOS for the translator, the
  prompt's last character for the language model).

Decoding runs one model step per output position, so the work around each step is kept to a
few tensor operations: tokens are recorded per step and cut at EOS once at the end, and rows
whose sentence has finished stay in the batch (their outputs ignored) until a quarter of the
batch has finished, instead of a state copy at every finish.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Finished rows are dropped from the state once they are this share of it.
SHRINK_SHARE = 0.25
# A temperature below this samples as temperature 0 (greedy): log-probabilities divided by less
# overflow float32, and the softmax of the result is greedy's choice anyway.
GREEDY_BELOW = 1e-6


class Stopped(Exception):
    """A search's `stop()` said to stop: nobody waits for its result any more."""


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # log-probability; for beam search divided by length ** length_penalty


def _as_lengths(max_lens, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(max_lens, int):
        return torch.full((batch,), max_lens, dtype=torch.long, device=device)
    return torch.as_tensor(max_lens, dtype=torch.long).to(device, copy=True)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities, which every search reads (so no logsumexp pass of its own). Cast
    first: on a CPU, .float() then log_softmax is faster than log_softmax(dtype=float32)."""
    return torch.log_softmax(logits.float(), dim=-1)


def _groups(vocab: int) -> int:
    """How many strided groups the two-stage reductions split a vocabulary into (8000 -> 64: group
    g holds tokens g, g + 64, g + 128, ...), or 0 when the vocabulary is small or has no such
    divisor, and torch's own reductions do. A multiple of 16 (one 512-bit vector of fp32), so the
    group maxima are taken down contiguous columns, which a CPU reduces many at a time, where
    contiguous blocks of 125 or 100 would be short rows reduced one at a time."""
    if vocab < 1024:
        return 0
    return next((g for g in (64, 48, 80, 32, 96, 112, 128, 16) if vocab % g == 0), 0)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of (rows, vocabulary) in two stages: each group's maximum, then the first
    maximum within the first group holding the row's maximum. A row whose maximum lies in more
    than one group is redone with argmax, so the first maximum is kept, as argmax keeps it."""
    n, vocab = x.shape
    groups = _groups(vocab)
    if not groups or not n:
        return x.argmax(-1)
    columns = x.view(n, vocab // groups, groups)
    group_max = columns.amax(1)
    best_max, best_group = group_max.max(1)
    index = columns[torch.arange(n, device=x.device), :, best_group].argmax(-1) * groups + best_group
    tied = (group_max == best_max.unsqueeze(1)).sum(1) > 1
    if tied.any():
        index[tied] = x[tied].argmax(-1)
    return index


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k, dim=1) of (rows, vocabulary), sorted, in two stages: the k best values of a row lie
    in the k groups with the best maxima (a value outside them has k group maxima above it), so
    the exact top k is taken over those k groups only. Equal values may be chosen in another
    order than torch.topk's."""
    n, vocab = x.shape
    groups = _groups(vocab)
    if not groups or k >= groups or not n:
        return x.topk(k, dim=1)
    columns = x.view(n, vocab // groups, groups)
    best_groups = columns.amax(1).topk(k, dim=1).indices  # (n, k)
    candidates = columns.gather(2, best_groups.unsqueeze(1).expand(-1, vocab // groups, -1)).view(n, -1)
    values, at = candidates.topk(k, dim=1)  # candidate at = i * k + j: token i * groups + best_groups[j]
    return values, (at // k) * groups + best_groups.gather(1, at % k)


def output_ids(state) -> torch.Tensor | None:
    """The vocabulary ids of the logits' columns where a model scores a shortlist of its
    vocabulary (the translator's `state["output_ids"]`), else None: column i is token i."""
    return state.get("output_ids") if isinstance(state, dict) else None


def restricted(log_probs: torch.Tensor, allowed: torch.Tensor | None, sentences: torch.Tensor, step: int,
               vocab: torch.Tensor | None) -> torch.Tensor:
    """`log_probs` (rows, columns) with the tokens that `allowed` (sentences, steps, vocabulary; bool)
    forbids at `step` set to -inf, each row by its sentence; unchanged past the allowed steps. The
    tokens kept keep their own log-probabilities, so scores stay the model's."""
    if allowed is None or step >= allowed.size(1):
        return log_probs
    mask = allowed[sentences, step]
    return log_probs.masked_fill(~(mask if vocab is None else mask[:, vocab]), float("-inf"))


def _decode(model, state, first_tokens: torch.Tensor, max_lens, eos: int | None,
            choose: Callable[[torch.Tensor], torch.Tensor],
            on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
            stop: Callable[[], bool] | None = None, allowed: torch.Tensor | None = None) -> list[Hypothesis]:
    """One token per step per row, `choose(log_probs) -> tokens`, until EOS or the row's max length.
    `stop()`, asked before each step, ends the search with `Stopped`; `allowed` (sentences, steps,
    vocabulary) limits the first steps' tokens (a prefix: one token a step)."""
    batch, device = first_tokens.size(0), first_tokens.device
    max_lens = _as_lengths(max_lens, batch, device)
    steps = int(max_lens.max()) if batch else 0
    rows = torch.arange(batch, device=device)  # the sentence each row of the state decodes
    row_max = max_lens.clone()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    n_finished = 0
    record: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = []  # rows, tokens, log-probs
    tokens = first_tokens
    first_limit = int(row_max.min()) if batch else 0  # without EOS no row ends before this step
    vocab = output_ids(state)
    for t in range(steps):
        if stop is not None and stop():
            raise Stopped
        logits, state = model.step(tokens, state)
        step_log_probs = restricted(log_probs(logits), allowed, rows, t, vocab)
        columns = choose(step_log_probs)
        tokens = columns if vocab is None else vocab[columns]
        if not record or record[-1][0] is not rows:
            record.append((rows, [], []))
        record[-1][1].append(tokens)
        record[-1][2].append(step_log_probs.gather(1, columns.unsqueeze(1)).squeeze(1))
        if on_step is not None:
            live = (~finished).nonzero().squeeze(1) if n_finished else slice(None)
            on_step(rows[live], tokens[live])
        if eos is None and t + 1 < first_limit:
            continue
        finished |= t + 1 >= row_max
        if eos is not None:
            finished |= tokens == eos
        n_finished = int(finished.sum())
        if n_finished == rows.numel():
            break
        if n_finished >= SHRINK_SHARE * rows.numel():
            keep = (~finished).nonzero().squeeze(1)
            rows, row_max, tokens, finished = rows[keep], row_max[keep], tokens[keep], finished[keep]
            state = model.reorder_state(state, keep, keep)
            n_finished, first_limit = 0, int(row_max.min())

    return _hypotheses(record, batch, steps, max_lens, eos)


def _hypotheses(record, batch: int, steps: int, max_lens: torch.Tensor, eos: int | None) -> list[Hypothesis]:
    """`_decode`'s recorded steps put together: every step's tokens, then each row cut after its
    first EOS or at its max length."""
    seqs = torch.full((batch, max(steps, 1)), -1, dtype=torch.long)
    log_probs = torch.zeros(batch, max(steps, 1), dtype=torch.float64)
    t = 0
    for rows_then, token_steps, logp_steps in record:
        span = slice(t, t + len(token_steps))
        seqs[rows_then.cpu(), span] = torch.stack(token_steps, 1).cpu()
        log_probs[rows_then.cpu(), span] = torch.stack(logp_steps, 1).double().cpu()
        t += len(token_steps)
    out = []
    for row, logp, limit in zip(seqs.tolist(), log_probs.tolist(), max_lens.tolist()):
        kept = scored = min(limit, len(row))
        if eos is not None and eos in row[:scored]:
            scored = row.index(eos) + 1  # the EOS's log-probability counts, the token is not output
            kept = scored - 1
        out.append(Hypothesis(row[:kept], sum(logp[:scored])))
    return out


@torch.no_grad()
def greedy(model, state, first_tokens, max_lens, eos: int | None = None, stop=None, allowed=None) -> list[Hypothesis]:
    return _decode(model, state, first_tokens, max_lens, eos, _argmax, stop=stop, allowed=allowed)


@torch.no_grad()
def sample(model, state, first_tokens, max_lens, eos: int | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
           on_step=None) -> list[Hypothesis]:
    """Ancestral sampling with temperature, top-k and nucleus (top-p) filtering; temperature 0 is greedy."""
    return _decode(model, state, first_tokens, max_lens, eos, sampler(temperature, top_k, top_p, generator), on_step)


def sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`choose(log_probs) -> tokens`, one per row: `sample`'s rule (temperature 0: greedy)."""
    if temperature < GREEDY_BELOW:
        return _argmax

    def choose(log_probs: torch.Tensor) -> torch.Tensor:
        probs = sampling_probs(log_probs, temperature, top_k, top_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return choose


def sampling_probs(log_probs: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution each row's token is drawn from (temperature > 0): callers that draw each row
    with its own generator (the server's streams) share this one pass over their rows. The row's
    best token is always kept, so no setting leaves a row nothing to draw."""
    if temperature < GREEDY_BELOW:
        return torch.zeros_like(log_probs).scatter_(1, _argmax(log_probs).unsqueeze(1), 1.0)
    logits = log_probs / temperature  # the softmax of logits shifted by a row's constant
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False  # a top_p that rounds to 0 in float32 would drop every token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def _best_continuations(log_probs: torch.Tensor, scores: torch.Tensor, width: int):
    """The best `width` continuations of each sentence's beams, from the beams' log-probabilities
    (sentences * K, V) and scores (sentences, K): their scores, the beam each extends and its
    token, each (sentences, width). The best of a sentence are among the best `width` of each
    beam, so each row is cut to its own top `width` before the sentence-wide choice."""
    n = scores.size(0)
    row_log_probs, row_tokens = _topk(log_probs, min(width, log_probs.size(-1)))
    top_scores, top_ids = (scores.view(-1, 1) + row_log_probs).view(n, -1).topk(width, dim=1)
    return top_scores, top_ids // row_tokens.size(1), row_tokens.view(n, -1).gather(1, top_ids)


@torch.no_grad()
def beam_search(model, state, first_tokens, max_lens, beam_size: int, eos: int | None = None,
                length_penalty: float = 1.0, nbest: int = 1, stop=None, allowed=None) -> list[list[Hypothesis]]:
    """Batched beam search over (batch x beam) rows; returns the `nbest` best hypotheses per input.

    Each step takes the best 2K continuations of a sentence's K beams; those ending in EOS among
    the top K are set aside as finished (fairseq's rule), the best K others go on. A sentence is
    done when K hypotheses have finished or it reaches its max length (then its top K are
    finished as they are). Scores are log-probabilities divided by length ** length_penalty,
    the length counting the EOS. `stop` and `allowed` as in `_decode`.
    """
    if nbest > beam_size:
        raise ValueError(f"nbest ({nbest}) cannot exceed the beam size ({beam_size})")
    batch, k, device = first_tokens.size(0), beam_size, first_tokens.device
    max_lens = _as_lengths(max_lens, batch, device)
    expand = torch.arange(batch, device=device).repeat_interleave(k)
    state = model.reorder_state(state, expand, None)
    tokens = first_tokens.index_select(0, expand)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    seqs = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    n_finished = torch.zeros(batch, dtype=torch.long, device=device)
    length, vocab = 0, output_ids(state)
    while active.numel():
        if stop is not None and stop():
            raise Stopped
        length += 1
        logits, state = model.step(tokens, state)
        n, width = active.numel(), min(2 * k, k * logits.size(-1))
        step_log_probs = restricted(log_probs(logits), allowed, active.repeat_interleave(k), length - 1, vocab)
        top_scores, origin, top_tokens = _best_continuations(step_log_probs, scores, width)
        if vocab is not None:
            top_tokens = vocab[top_tokens]
        is_eos = top_tokens == eos if eos is not None else torch.zeros_like(top_tokens, dtype=torch.bool)
        last_step = length >= max_lens[active]
        in_top_k = torch.arange(width, device=device) < k
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
        state = model.reorder_state(state, rows_kept, keep if keep.numel() < n else None)
        seqs = torch.cat([seqs[rows_kept], next_tokens.view(-1, 1)], dim=1)
        tokens = next_tokens.view(-1)
    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]


@dataclass(frozen=True)
class Progress:
    """A hypothesis's way through its sentence's constraints: those met, and the one under way
    with how many of its tokens are out."""
    met: frozenset = frozenset()
    current: int = -1
    position: int = 0
    closed: bool = False  # the last token completed a constraint: the next may not glue onto its word

    def tokens_out(self, constraints: list[list[int]]) -> int:
        return sum(len(constraints[c]) for c in self.met) + self.position

    def advance(self, token: int, constraints: list[list[int]]) -> "Progress":
        """After `token`: the constraint under way goes on or is dropped (its tokens no longer
        count), and a token that starts an unmet constraint starts it."""
        if self.current >= 0 and constraints[self.current][self.position] == token:
            return self._step(self.current, self.position + 1, constraints)
        for c, phrase in enumerate(constraints):
            if c not in self.met and phrase[0] == token:
                return Progress(self.met)._step(c, 1, constraints)
        return Progress(self.met)

    def _step(self, c: int, position: int, constraints) -> "Progress":
        if position == len(constraints[c]):
            return Progress(self.met | {c}, closed=True)
        return Progress(self.met, c, position)

    def wanted(self, constraints: list[list[int]]) -> set[int]:
        """The tokens that would take it further: the next of the constraint under way, or the
        first of each unmet one."""
        if self.current >= 0:
            return {constraints[self.current][self.position]}
        return {phrase[0] for c, phrase in enumerate(constraints) if c not in self.met}


@torch.no_grad()
def constrained_beam_search(model, state, first_tokens, max_lens, beam_size: int, constraints: list[list[list[int]]],
                            eos: int, length_penalty: float = 1.0, nbest: int = 1, stop=None,
                            allowed=None, glue: frozenset = frozenset()) -> list[list[Hypothesis]]:
    """Beam search in which a hypothesis may end only once it holds each of its sentence's
    constraints (token sequences), with dynamic beam allocation (Post & Vilar 2018): each step's
    candidates are the best 2K continuations of the K beams plus, for every beam, the tokens that
    advance its constraints; the K slots are shared out among banks of hypotheses by how many
    constraint tokens they hold, fullest first, so that hypotheses that took a constraint are not
    crowded out by those that have not. The choice runs in Python per sentence: its cost grows
    with K and the constraints, not with the vocabulary. `glue`: the tokens that continue a word
    (not one that starts one), which may not follow a completed constraint, so that a term is
    not turned into a longer word. `stop` and `allowed` as in `_decode`."""
    batch, k, device = first_tokens.size(0), beam_size, first_tokens.device
    max_lens = _as_lengths(max_lens, batch, device).tolist()
    state = model.reorder_state(state, torch.arange(batch, device=device).repeat_interleave(k), None)
    tokens = first_tokens.repeat_interleave(k)
    beams = [[(0.0, [], Progress())] + [(float("-inf"), [], Progress())] * (k - 1) for _ in range(batch)]
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    active, vocab, length = list(range(batch)), output_ids(state), 0
    table = None if vocab is None else vocab.tolist()
    column = None if vocab is None else {v: i for i, v in enumerate(table)}
    while active:
        if stop is not None and stop():
            raise Stopped
        length += 1
        logits, state = model.step(tokens, state)
        step_log_probs = restricted(log_probs(logits), allowed, torch.tensor(active, device=device).repeat_interleave(k),
                                    length - 1, vocab)
        options = _options(step_log_probs, beams, active, constraints, k, eos, table, column, glue)
        next_beams, rows, kept = [], [], []
        for s, sent in enumerate(active):
            candidates = [(beams[sent][b][0] + value, b, token, beams[sent][b][2].advance(token, constraints[sent]))
                          for (b, token), value in options[s].items()]
            candidates.sort(key=lambda c: -c[0])
            ending, going = _allocate(candidates, k, constraints[sent], eos)
            finished[sent] += [Hypothesis(beams[sent][b][1], score / length ** length_penalty)
                               for score, b, _, _ in ending]
            if length >= max_lens[sent]:
                finished[sent] += [Hypothesis(beams[sent][b][1] + [token], score / length ** length_penalty)
                                   for score, b, token, _ in _out_of_length(candidates, going, k, constraints[sent],
                                                                            eos, finished[sent])]
            if len(finished[sent]) >= k or length >= max_lens[sent] or not going:
                continue
            going += [(float("-inf"),) + going[0][1:]] * (k - len(going))
            next_beams.append((sent, [(score, beams[sent][b][1] + [token], p) for score, b, token, p in going]))
            rows += [s * k + b for _, b, _, _ in going]
            kept.append(s)
        if not next_beams:
            break
        for sent, new in next_beams:
            beams[sent] = new
        state = model.reorder_state(state, torch.tensor(rows, device=device),
                                    torch.tensor(kept, device=device) if len(kept) < len(active) else None)
        tokens = torch.tensor([seq[-1] for sent, new in next_beams for _, seq, _ in new], device=device)
        active = [sent for sent, _ in next_beams]
    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]


def _options(step_log_probs: torch.Tensor, beams, active: list[int], constraints, k: int, eos: int, table, column,
             glue: frozenset):
    """Per active sentence, {(beam, token): log-probability} of the continuations worth weighing:
    each live beam's best 2K tokens, the tokens that advance its constraints, and EOS; after a
    completed constraint, no token of `glue`."""
    top_values, top_columns = (x.tolist() for x in _topk(step_log_probs, min(2 * k, step_log_probs.size(-1))))
    wanted = [(s, b, token) for s, sent in enumerate(active) for b, (score, _, progress) in enumerate(beams[sent])
              if score > float("-inf") for token in progress.wanted(constraints[sent]) | {eos}]
    cols = [token if column is None else column.get(token, -1) for _, _, token in wanted]
    values = step_log_probs[[s * k + b for s, b, _ in wanted], [max(c, 0) for c in cols]].tolist() if wanted else []
    options = [{} for _ in active]
    for s, sent in enumerate(active):
        for b, (score, _, _) in enumerate(beams[sent]):
            if score > float("-inf"):
                row = s * k + b
                options[s].update({(b, c if table is None else table[c]): v
                                   for v, c in zip(top_values[row], top_columns[row])})
    for (s, b, token), c, v in zip(wanted, cols, values):
        options[s][(b, token)] = v if c >= 0 else float("-inf")
    for s, sent in enumerate(active):
        options[s] = {(b, token): v for (b, token), v in options[s].items()
                      if v > float("-inf") and not (beams[sent][b][2].closed and token in glue)}
    return options


def _out_of_length(candidates: list, going: list, k: int, constraints: list[list[int]], eos: int,
                   finished: list) -> list:
    """The hypotheses that end as they are at the length limit: without constraints, the best K
    (as `beam_search` ends them); with them, if none has ended, those holding the most."""
    if not constraints:
        return [c for c in candidates[:k] if c[2] != eos]
    if finished or not going:
        return []
    most = max(c[3].tokens_out(constraints) for c in going)
    return [c for c in going if c[3].tokens_out(constraints) == most]


def _allocate(candidates: list, k: int, constraints: list[list[int]], eos: int) -> tuple[list, list]:
    """From `candidates` (score, beam, token, progress), best first: those that end, and K that go
    on. EOS is allowed only to hypotheses holding every constraint; one ends where it ranks among
    the best K (beam search's rule) or where dynamic beam allocation over the banks of constraint
    tokens held would give it a slot. The K going on are chosen by that allocation among the
    others: each bank its share, fullest first, then the best of the rest. Without constraints
    this is `beam_search`'s choice."""
    candidates = [c for c in candidates if c[2] != eos or len(c[3].met) == len(constraints)]
    allocated = _banks(candidates, k, constraints)
    ending = [c for rank, c in enumerate(candidates) if c[2] == eos and (rank < k or c in allocated)]
    return ending, _banks([c for c in candidates if c[2] != eos], k, constraints)


def _banks(candidates: list, k: int, constraints: list[list[int]]) -> list:
    banks: list[list] = [[] for _ in range(sum(map(len, constraints)) + 1)]
    for candidate in candidates:
        banks[candidate[3].tokens_out(constraints)].append(candidate)
    share = max(1, k // len(banks))
    chosen = [c for bank in reversed(banks) for c in bank[:share]][:k]  # more banks than K: the fullest
    rest = sorted((c for bank in banks for c in bank[share:]), key=lambda c: -c[0])
    return sorted(chosen + rest[: k - len(chosen)], key=lambda c: -c[0])
