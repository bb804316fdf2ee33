"""Using trained models: translate sentences, draw attention, generate and score text.

Each function takes a `precision` ("auto", "bf16", "fp32", "int8" or a resolved
`seq2seq.device.Precision`) and decodes through `fast.for_decoding`'s twin of the model.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from seq2seq import fast, search, sentences
from seq2seq.data import pad
from seq2seq.device import Precision, autocast, resolve_precision
from seq2seq.device import of as device_of
from seq2seq.limits import check_limits
from seq2seq.metrics import char_scores
from seq2seq.models.charlm import CharLM
from seq2seq.models.rnn import detach
from seq2seq.models.translator import Translator
from seq2seq.tokenizer import BOS, EOS, PAD, CharVocab, SubwordTokenizer

# Sentences a batch, and at most this many decoder rows (sentences x beam): the encoder runs on
# sentences, not rows, and its products want the larger batch (docs/performance.md).
BATCH_SENTENCES, BATCH_ROWS = 320, 1600

@contextmanager
def decoding(model, precision: Precision):
    """Eval mode, no autograd; yields the model's decoding twin (see `seq2seq.fast`), which a region
    should use for a whole call. bf16 autocast where the model runs as it is (a GPU): a CPU twin
    computes its products in bf16 itself and the rest in fp32, which spares every small operation
    of a one-sentence step autocast's dispatch. Not inference_mode: under it autocast casts the
    encoder's weights again at every call."""
    model.eval()
    twin = fast.for_decoding(model, precision)
    with torch.no_grad(), autocast(precision.bf16 and twin is model, device_of(model)):
        yield twin


def max_output_lengths(src_lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    return (src_lengths.float() * ratio).long() + 10


def _search(decoder, ids: list[list[int]], beam: int, nbest: int, max_len_ratio: float,
            length_penalty: float, device: torch.device, stop=None, allowed: torch.Tensor | None = None,
            constraints: list[list[list[int]]] | None = None, vocab_size: int = 0, glue: frozenset = frozenset()):
    """The `nbest` best hypotheses of each source sentence of one batch (token ids, non-empty),
    and the encoder state the search began with. `allowed` (sentences, steps, vocabulary): what
    the first steps may produce (prefixes), whose steps add to the length limit; `constraints`:
    per sentence, token sequences its output must hold (`search.constrained_beam_search`)."""
    src, src_len = pad(ids, PAD, eos=EOS)
    keep = None if allowed is None else (allowed & ~allowed.all(2, keepdim=True)).any(1)
    if constraints is not None:  # a shortlist must keep the constraints' pieces
        keep = torch.zeros(len(ids), vocab_size, dtype=torch.bool) if keep is None else keep
        for i, phrases in enumerate(constraints):
            keep[i, [t for phrase in phrases for t in phrase]] = True
    state = decoder.start(src.to(device), src_len, keep)
    first = torch.full((len(ids),), BOS, dtype=torch.long, device=device)
    max_lens = max_output_lengths(src_len - 1, max_len_ratio)
    if allowed is not None:
        allowed = allowed.to(device)
        max_lens = max_lens + (~allowed.all(2)).sum(1).cpu()
    if constraints is not None:
        max_lens = max_lens + torch.tensor([sum(map(len, phrases)) for phrases in constraints])
        return search.constrained_beam_search(decoder, state, first, max_lens, beam, constraints, EOS, length_penalty,
                                              nbest, stop, allowed, glue), state
    if beam == 1:
        return [[h] for h in search.greedy(decoder, state, first, max_lens, eos=EOS, stop=stop,
                                           allowed=allowed)], state
    return search.beam_search(decoder, state, first, max_lens, beam, eos=EOS, length_penalty=length_penalty,
                              nbest=nbest, stop=stop, allowed=allowed), state


def glossary_terms(line: str, glossary: dict[str, str]) -> list[str]:
    """The target terms of the glossary entries whose source term occurs in `line` as whole words
    (case aside), each once, in the glossary's order."""
    found = [target for source, target in glossary.items()
             if source.strip() and target.strip() and re.search(rf"(?<!\w){re.escape(source.strip())}(?!\w)", line, re.I)]
    return list(dict.fromkeys(t.strip() for t in found))


def prefix_steps(tokenizer: SubwordTokenizer, prefix: str) -> list[list[int]]:
    """The pieces each of the first steps may produce for the output to start with `prefix`: one
    piece a step; where the prefix ends inside a word, the last step allows every piece that
    continues it (`Deux chie` -> `▁Deux`, then `▁chien`, `▁chiens`, ...)."""
    text = prefix.strip()
    if not text:
        return []
    if prefix[-1].isspace() or not text[-1].isalnum():
        return [[piece] for piece in tokenizer.encode([text])[0]]
    head, _, word = text.rpartition(" ")
    steps = [[piece] for piece in tokenizer.encode([head])[0]] if head else []
    pieces = _pieces(tokenizer)
    whole = [i for i, piece in enumerate(pieces) if piece.startswith("\u2581" + word)]
    if whole:
        return steps + [whole]
    word_pieces = tokenizer.encode([word])[0]  # no piece holds the word's start: end inside its last piece
    last = pieces[word_pieces[-1]]
    return steps + [[piece] for piece in word_pieces[:-1]] + [[i for i, p in enumerate(pieces) if p.startswith(last)]]


def _glue(tokenizer: SubwordTokenizer) -> frozenset:
    """The pieces that continue a word: no word-start mark, a letter or digit first (once a tokenizer)."""
    if not hasattr(tokenizer, "_glue_pieces"):
        tokenizer._glue_pieces = frozenset(i for i, p in enumerate(_pieces(tokenizer)) if p[:1].isalnum())
    return tokenizer._glue_pieces


def _pieces(tokenizer: SubwordTokenizer) -> list[str]:
    """Every piece's string, read from SentencePiece once a tokenizer."""
    if not hasattr(tokenizer, "_piece_strings"):
        tokenizer._piece_strings = [tokenizer.sp.id_to_piece(i) for i in range(len(tokenizer))]
    return tokenizer._piece_strings


def _allowed(steps: list[list[list[int]]], vocab: int) -> torch.Tensor | None:
    """(sentences, steps, vocabulary) bool from each sentence's allowed pieces a step."""
    width = max(map(len, steps), default=0)
    if not width:
        return None
    allowed = torch.ones(len(steps), width, vocab, dtype=torch.bool)
    for i, sentence in enumerate(steps):
        for t, pieces in enumerate(sentence):
            allowed[i, t] = False
            allowed[i, t, pieces] = True
    return allowed


@dataclass
class Attention:
    """Where each target piece looked: `weights` (target x source, each row sums to 1), with the
    source and target pieces (and </s>) that label them."""
    weights: torch.Tensor
    source: list[str]
    target: list[str]


def word_alignments(attention: Attention) -> list[tuple[int, int]]:
    """Source-target word pairs (i, j), as fast_align and Moses write `i-j`: each target word is
    aligned to the source word its pieces attended to most (summed over the pieces of both). Words
    are SentencePiece's: a piece starting with U+2581 starts one; `</s>` belongs to none."""
    def words(pieces: list[str]) -> list[int]:
        index, out = -1, []
        for piece in pieces:
            if piece == "</s>":
                out.append(-1)
                continue
            index += piece.startswith("\u2581") or index < 0
            out.append(index)
        return out

    source, target = torch.tensor(words(attention.source)), torch.tensor(words(attention.target))
    if not len(source) or not len(target) or source.max() < 0 or target.max() < 0:
        return []
    kept_source, kept_target = source >= 0, target >= 0
    weights = attention.weights.float()[kept_target][:, kept_source]
    rows = torch.zeros(int(target.max()) + 1, weights.size(1)).index_add_(0, target[kept_target], weights)
    by_word = torch.zeros(rows.size(0), int(source.max()) + 1).index_add_(1, source[kept_source], rows)
    return [(i, j) for j, i in enumerate(by_word.argmax(1).tolist())]


@dataclass
class Translation:
    nbest: list[tuple[str, float]]  # (text, score), best first
    attention: Attention | None = None  # of the best, where asked for and the source is not empty


def translations(model: Translator, tokenizer: SubwordTokenizer, lines: list[str], beam: int = 5, nbest: int = 1,
                 batch_size: int | None = None, max_len_ratio: float = 2.0, length_penalty: float = 1.0,
                 progress: bool = False, precision: str | Precision = "auto", attention: bool = False,
                 stop=None, split: str | None = None, prefixes: list[str] | None = None,
                 glossary: dict[str, str] | None = None) -> list[Translation]:
    """A `Translation` per input line, in input order; a line with no pieces (empty, or nothing
    SentencePiece keeps) gives empty text and no attention. `batch_size` None: BATCH_SENTENCES a
    batch, fewer where beam x that passes BATCH_ROWS. `attention`: the best translation is read
    back teacher-forced, one pass a batch, so the weights are those of the text returned.
    `stop()`, asked between batches and decoding steps, ends the call with `search.Stopped`.
    `split`: the source language: each line is split into sentences (`seq2seq.sentences`),
    translated in one batch with the rest and joined back. `prefixes`: per line, what its
    translation starts with (of a split line, its first sentence's). `glossary` {source term:
    target term}: where a line (a sentence, when split) holds a source term, its translation
    holds the target term (`search.constrained_beam_search`)."""
    if split:
        return _by_sentence(lambda texts, firsts: translations(
            model, tokenizer, texts, beam, nbest, batch_size, max_len_ratio, length_penalty, progress, precision,
            attention, stop, None, firsts, glossary), lines, split, prefixes, nbest)
    check_limits(beam=beam, nbest=nbest, batch_size=batch_size, max_len_ratio=max_len_ratio)
    if prefixes is not None and len(prefixes) != len(lines):
        raise ValueError(f"{len(prefixes)} prefixes for {len(lines)} lines")
    steps = [prefix_steps(tokenizer, p) for p in prefixes] if prefixes else [[] for _ in lines]
    terms = [[tokenizer.encode([target])[0] for target in glossary_terms(line, glossary)] for line in lines] \
        if glossary else None
    device = device_of(model)
    precision = resolve_precision(precision, device, "translator")
    batch_size = batch_size or max(1, min(BATCH_SENTENCES, BATCH_ROWS // beam))
    ids = tokenizer.encode([line.strip() for line in lines])
    results = [Translation([("", 0.0)] * nbest) for _ in lines]
    order = sorted((i for i in range(len(lines)) if ids[i]), key=lambda i: -len(ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with decoding(model, precision) as decoder:
        for batch in tqdm(batches, desc="translating", unit="batch", disable=not progress, leave=False):
            if stop is not None and stop():
                raise search.Stopped
            hyps, start = _search(decoder, [ids[i] for i in batch], beam, nbest, max_len_ratio, length_penalty,
                                  device, stop, _allowed([steps[i] for i in batch], len(tokenizer)),
                                  None if terms is None else [terms[i] for i in batch], len(tokenizer),
                                  _glue(tokenizer) if terms else frozenset())
            # one call for the batch: SentencePiece's batch decode has a fixed cost a call
            texts = iter(tokenizer.decode([h.tokens for sentence_hyps in hyps for h in sentence_hyps]))
            maps = _attention(decoder, tokenizer, start, [ids[i] for i in batch], [h[0].tokens for h in hyps],
                              device) if attention else [None] * len(batch)
            for i, sentence_hyps, weights in zip(batch, hyps, maps):
                results[i] = Translation([(next(texts), h.score) for h in sentence_hyps], weights)
    return results


def translate(model: Translator, tokenizer: SubwordTokenizer, lines: list[str], beam: int = 5, nbest: int = 1,
              batch_size: int | None = None, max_len_ratio: float = 2.0, length_penalty: float = 1.0,
              progress: bool = False, precision: str | Precision = "auto", split: str | None = None,
              prefixes: list[str] | None = None, glossary: dict[str, str] | None = None) -> list[list[tuple[str, float]]]:
    """`nbest` (text, score) pairs per input line, in input order; an empty line gives empty output.
    `split`, `prefixes` and `glossary` as in `translations`."""
    return [t.nbest for t in translations(model, tokenizer, lines, beam, nbest, batch_size, max_len_ratio,
                                          length_penalty, progress, precision, split=split, prefixes=prefixes,
                                          glossary=glossary)]


def _by_sentence(run, lines: list[str], lang: str, prefixes: list[str] | None, nbest: int) -> list[Translation]:
    """`run(sentences, prefixes)` over every line's sentences at once, joined back per line: the
    k-th of a line's n-best joins its sentences' k-th (score: their sum), and its attention is
    block-diagonal over its sentences."""
    parts = [sentences.split(line, lang) for line in lines]
    flat = [part.text for line_parts in parts for part in line_parts]
    firsts = None if prefixes is None else [p if j == 0 else "" for line_parts, p in zip(parts, prefixes)
                                             for j, _ in enumerate(line_parts)]
    found = iter(run(flat, firsts))
    out = []
    for line_parts in parts:
        got = [next(found) for _ in line_parts]
        ranked = [(sentences.join(line_parts, [g.nbest[k][0] for g in got]), sum(g.nbest[k][1] for g in got))
                  for k in range(nbest)]
        out.append(Translation(ranked, _joined_attention([g.attention for g in got])))
    return out


def _joined_attention(maps: list[Attention | None]) -> Attention | None:
    maps = [m for m in maps if m is not None]
    if len(maps) <= 1:
        return maps[0] if maps else None
    return Attention(torch.block_diag(*(m.weights for m in maps)), [p for m in maps for p in m.source],
                     [p for m in maps for p in m.target])


def _attention(decoder, tokenizer, start: dict, sources: list[list[int]], targets: list[list[int]],
               device: torch.device) -> list[Attention]:
    """The attention of each source's target, read back teacher-forced in one batched pass from
    the encoder state the search began with: with dropout off, the weights the search used."""
    tgt, _ = pad([[BOS] + t for t in targets], PAD)
    weights = decoder.attention_weights(start, tgt.to(device)).float().cpu()
    pieces = tokenizer.sp.id_to_piece
    return [Attention(weights[i, : len(target) + 1, : len(source) + 1],
                      [pieces(p) for p in source] + ["</s>"], [pieces(p) for p in target] + ["</s>"])
            for i, (source, target) in enumerate(zip(sources, targets))]


def read_back(model: Translator, tokenizer: SubwordTokenizer, sources: list[str], targets: list[str],
              precision: str | Precision = "auto") -> list[Attention]:
    """The attention of given translations (a reference, say), each source with its target read
    back teacher-forced, one batched pass; both sides must hold pieces."""
    device = device_of(model)
    ids, target_ids = tokenizer.encode([s.strip() for s in sources]), tokenizer.encode([t.strip() for t in targets])
    with decoding(model, resolve_precision(precision, device, "translator")) as decoder:
        src, src_len = pad(ids, PAD, eos=EOS)
        return _attention(decoder, tokenizer, decoder.start(src.to(device), src_len), ids, target_ids, device)


def attention_map(model: Translator, tokenizer: SubwordTokenizer, line: str, beam: int = 5,
                  max_len_ratio: float = 2.0, length_penalty: float = 1.0,
                  precision: str | Precision = "auto") -> tuple[torch.Tensor, list[str], list[str]]:
    """The attention weights (target x source, each row sums to 1) of `line`'s best translation,
    with the source and target subwords (and </s>) that label them."""
    found = translations(model, tokenizer, [line], beam, 1, None, max_len_ratio, length_penalty,
                         precision=precision, attention=True)[0].attention
    if found is None:
        raise ValueError("an empty sentence has no attention to draw")
    return found.weights, found.source, found.target


def generate(model: CharLM, vocab: CharVocab, prompts: list[str], max_chars: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, beam: int = 0, length_penalty: float = 1.0,
             seed: int | None = None, on_text=None, precision: str | Precision = "auto") -> list[str]:
    """A continuation of each prompt (prompts of one length, decoded as one batch).

    beam > 0 gives the length-normalised beam-search best; otherwise sampling (temperature 0:
    greedy). `on_text(piece)` receives the characters of a single prompt as they come. A seed
    repeats its sample within one precision.
    """
    check_limits(max_chars=max_chars, num_samples=len(prompts), top_k=top_k, beam=beam or None)
    prompts = [p or "\n" for p in prompts]  # an empty prompt starts as after a line break
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("prompts decoded together must have the same length")
    device = device_of(model)
    ids = torch.tensor([vocab.encode(p, warn=True) for p in prompts], dtype=torch.long, device=device)
    with decoding(model, resolve_precision(precision, device, "charlm")) as decoder:
        state, first = decoder.start(ids), ids[:, -1]
        if beam > 0:
            best = search.beam_search(decoder, state, first, max_chars, beam, length_penalty=length_penalty)
            return [vocab.decode(hyps[0].tokens) for hyps in best]
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        on_step = None
        if on_text is not None and len(prompts) == 1:
            on_step = lambda rows, tokens: on_text(vocab.decode(tokens.tolist()))  # noqa: E731
        hyps = search.sample(decoder, state, first, max_chars, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator, on_step=on_step)
    return [vocab.decode(h.tokens) for h in hyps]


def _scoring_rows(full: torch.Tensor, offset: int, n: int, streams: int, warmup: int):
    """The text cut into `streams` left-aligned rows, each first reading the `warmup` characters
    before its chunk, and which of their positions are scored: every row starts from a fresh
    state on real text, and the padding after a shorter row's end is read but never scored.
    Column 0 is only ever an input, so the text's very first character (without a context) is
    not scored."""
    bounds = [offset + n * s // streams for s in range(streams + 1)]
    starts = [max(0, bounds[s] - warmup - 1) for s in range(streams)]
    width = max(bounds[s + 1] - starts[s] for s in range(streams))
    inputs = torch.zeros(streams, width, dtype=torch.long)
    scored = torch.zeros(streams, width, dtype=torch.bool)
    for s in range(streams):
        piece = full[starts[s] : bounds[s + 1]]
        inputs[s, : piece.numel()] = piece
        scored[s, bounds[s] - starts[s] : piece.numel()] = True
    scored[:, 0] = False
    return inputs, scored


@torch.no_grad()
def score_text(model: CharLM, ids: torch.Tensor, context: torch.Tensor | None = None, streams: int = 32,
               warmup: int = 256, window: int = 512, precision: Precision | None = None) -> dict:
    """Bits/char and perplexity of every character of `ids` (1-D), each given the text before it.

    The text is cut into `streams` chunks scored in parallel; each chunk first reads the `warmup`
    characters before it (from `context` for the first chunk), unscored, so no chunk starts cold.
    `precision` None: the plain model in fp32, the reference number; else its decoding twin.
    """
    model.eval()
    device = device_of(model)
    context = torch.zeros(0, dtype=torch.long) if context is None else context.cpu()
    ids = ids.cpu()
    n = ids.numel()
    streams = max(1, min(streams, n // 64 or 1))
    inputs, scored = _scoring_rows(torch.cat([context, ids]), context.numel(), n, streams, warmup)
    total_nats, counted, hidden = 0.0, 0, None
    net = model if precision is None else fast.for_decoding(model, precision)
    with autocast(precision is not None and precision.bf16 and net is model, device):
        for t in range(0, inputs.size(1) - 1, window):
            x, y = inputs[:, t : t + window].to(device), inputs[:, t + 1 : t + window + 1].to(device)
            logits, hidden = net(x[:, : y.size(1)], hidden)
            hidden = detach(hidden)
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").cpu()
            mask = scored[:, t + 1 : t + 1 + y.size(1)]
            total_nats += float(nll[mask].double().sum())
            counted += int(mask.sum())
    return char_scores(total_nats, counted)


def continuation_passages(text: str, count: int, prompt_chars: int, max_chars: int) -> list[tuple[str, str]]:
    """`count` (prompt, true continuation) pairs evenly spaced through `text`."""
    span = prompt_chars + max_chars
    if len(text) < span:
        raise ValueError(f"text of {len(text)} characters is shorter than prompt + continuation ({span})")
    step = (len(text) - span) / max(count - 1, 1)
    starts = sorted({int(math.floor(i * step)) for i in range(count)})
    return [(text[s : s + prompt_chars], text[s + prompt_chars : s + span]) for s in starts]


def class_probabilities(model, ids: list[list[int]], batch_size: int = BATCH_SENTENCES, progress: bool = False,
                        precision: str | Precision = "auto") -> torch.Tensor:
    """(N, classes) probabilities of a classifier for N non-empty token id lists, in their order;
    batches of similar lengths (sorted), so little is padded."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    probabilities = torch.empty(len(ids), model.out.out_features)
    device = device_of(model)
    with decoding(model, resolve_precision(precision, device, "classifier")) as twin:
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="classifying", unit="batch"):
            chosen = order[start : start + batch_size]
            batch, lengths = pad([ids[i] for i in chosen], PAD)
            probabilities[chosen] = torch.softmax(twin(batch.to(device), lengths).float(), -1).cpu()
    return probabilities


def classify(model, tokenizer, lines: list[str], normalize: str = "lower-split", max_tokens: int = 128,
             batch_size: int = BATCH_SENTENCES, progress: bool = False,
             precision: str | Precision = "auto") -> list[tuple[str, float] | None]:
    """(label, probability) of each line, in order; None for an empty line. Lines are normalised as
    the training text was (`data.normalize_text`) and cut to `max_tokens` subwords."""
    from seq2seq.data import normalize_text

    check_limits(batch_size=batch_size)
    texts = [normalize_text(line, normalize) for line in lines]
    keep = [i for i, text in enumerate(texts) if text]
    ids = [i[:max_tokens] or [PAD] for i in tokenizer.encode([texts[i] for i in keep])]
    probabilities = class_probabilities(model, ids, batch_size, progress, precision)
    results: list[tuple[str, float] | None] = [None] * len(lines)
    for row, i in enumerate(keep):
        best = int(probabilities[row].argmax())
        results[i] = (tokenizer.shown(best), float(probabilities[row, best]))
    return results
