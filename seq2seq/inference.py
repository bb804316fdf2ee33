"""Using trained models: translate sentences, generate and score text."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from tqdm import tqdm

from seq2seq import search
from seq2seq.cpu import tune_allocator
from seq2seq.device import autocast, native_bf16, native_int8
from seq2seq.device import of as device_of
from seq2seq.data import pad
from seq2seq.metrics import char_scores
from seq2seq.models.charlm import CharLM
from seq2seq.models.translator import Translator
from seq2seq.models.rnn import detach, packed_for_decoding
from seq2seq.tokenizer import BOS, EOS, PAD, CharVocab, SubwordTokenizer


def decoding_bf16(bf16: bool | None, device: torch.device | str = "cpu") -> bool:
    """None picks the fastest mode of the device: bf16 where it computes bf16 natively (Multi30k
    test, released en-fr: 58.65 BLEU against fp32's 58.68 at beam 5), fp32 elsewhere, where
    emulated bf16 is slower."""
    return native_bf16(device) if bf16 is None else bf16


def decoding_int8(int8: bool | None, bf16: bool | None = None, device: torch.device | str = "cpu") -> bool:
    """Translation's int8 choice. None picks int8 products where the CPU runs them natively (VNNI,
    AMX: see `Int8Linear`), unless the caller chose bf16 or fp32 (`bf16` not None): the fastest
    mode there, at a BLEU within 0.1 of fp32's (Multi30k test, released en-fr, against bf16 on a
    2-core Zen 5: greedy 1.37x, beam 5 1.24x). True asks for them anywhere on a CPU."""
    if int8 is None:
        return bf16 is None and native_int8(device)
    return int8


@contextmanager
def decoding(model, bf16: bool, int8: bool = False):
    """Eval mode, no autograd, bf16 autocast if asked, and the step's weights packed once for the
    CPU's matrix products (in int8 if asked: see `Int8Linear`); a region should span a whole call.
    Not inference_mode: under it autocast casts the encoder's weights again at every call. On a
    CPU the process keeps freed memory (`cpu.tune_allocator`): each step's logits would otherwise
    be page-faulted anew."""
    model.eval()
    if device_of(model).type == "cpu":
        tune_allocator()
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.no_grad(), autocast(bf16, device_of(model)), packed_for_decoding(model, dtype, int8):
        yield


# Sentences a batch, and at most this many decoder rows (sentences x beam). Multi30k test_2016,
# released en-fr, int8, 2-core Zen 5: greedy 1,421 sentences/s at 320 a batch, 1,397 at 500,
# 1,371 at 1,000; beam 5 470 at 64 a batch (320 rows), 505 at 200, 519 at 320 and at 500. The
# encoder runs on sentences, not rows, and its products want the larger batch.
BATCH_SENTENCES, BATCH_ROWS = 320, 1600


def max_output_lengths(src_lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    return (src_lengths.float() * ratio).long() + 10


def translate(model: Translator, tokenizer: SubwordTokenizer, lines: list[str], beam: int = 5, nbest: int = 1,
              batch_size: int | None = None, max_len_ratio: float = 2.0, length_penalty: float = 1.0,
              progress: bool = False, bf16: bool | None = None, int8: bool | None = None) -> list[list[tuple[str, float]]]:
    """`nbest` (text, score) pairs per input line, in input order; an empty line gives empty output.
    `batch_size` None: BATCH_SENTENCES a batch, fewer where beam x that passes BATCH_ROWS. `bf16`
    None: bf16 where the CPU runs it natively (see `decoding_bf16`); `int8` None (with `bf16`
    None): the linear layers' products in int8 besides where the CPU runs them natively (see
    `decoding_int8`)."""
    if beam < 1 or nbest < 1 or nbest > beam:
        raise ValueError(f"need 1 <= nbest ({nbest}) <= beam ({beam})")
    device = device_of(model)
    int8, bf16 = decoding_int8(int8, bf16, device), decoding_bf16(bf16, device)
    batch_size = batch_size or max(1, min(BATCH_SENTENCES, BATCH_ROWS // beam))
    ids = tokenizer.encode([line.strip() for line in lines])
    results: list[list[tuple[str, float]]] = [[("", 0.0)] * nbest for _ in lines]
    order = sorted((i for i in range(len(lines)) if ids[i]), key=lambda i: -len(ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with decoding(model, bf16, int8):
        for batch in tqdm(batches, desc="translating", unit="batch", disable=not progress, leave=False):
            src, src_len = pad([ids[i] for i in batch], PAD, eos=EOS)
            state = model.start(src.to(device), src_len)
            first = torch.full((len(batch),), BOS, dtype=torch.long, device=device)
            max_lens = max_output_lengths(src_len - 1, max_len_ratio)
            if beam == 1:
                hyps = [[h] for h in search.greedy(model, state, first, max_lens, eos=EOS)]
            else:
                hyps = search.beam_search(model, state, first, max_lens, beam, eos=EOS,
                                          length_penalty=length_penalty, nbest=nbest)
            # one call for the batch: SentencePiece's batch decode costs 60 us a call, whatever its size
            texts = iter(tokenizer.decode([h.tokens for sentence_hyps in hyps for h in sentence_hyps]))
            for i, sentence_hyps in zip(batch, hyps):
                results[i] = [(next(texts), h.score) for h in sentence_hyps]
    return results


def attention_map(model: Translator, tokenizer: SubwordTokenizer, line: str, beam: int = 5,
                  bf16: bool | None = None, max_len_ratio: float = 2.0,
                  length_penalty: float = 1.0, int8: bool | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """The attention weights (target x source, each row sums to 1) of `line`'s best translation,
    with the source and target subwords (and </s>) that label them. The translation is decoded,
    then read back teacher-forced: with dropout off, the same weights the search used."""
    ids = tokenizer.encode([line.strip()])[0]
    if not ids:
        raise ValueError("an empty sentence has no attention to draw")
    device = device_of(model)
    src, src_len = pad([ids], PAD, eos=EOS)
    src = src.to(device)
    captured = []
    with decoding(model, decoding_bf16(bf16, device), decoding_int8(int8, bf16, device)):
        state, first = model.start(src, src_len), torch.tensor([BOS], device=device)
        max_lens = max_output_lengths(src_len - 1, max_len_ratio)
        best = (search.greedy(model, state, first, max_lens, eos=EOS)[0] if beam == 1 else
                search.beam_search(model, state, first, max_lens, beam, eos=EOS, length_penalty=length_penalty)[0][0])
        hook = model.attention.register_forward_hook(lambda module, inputs, output: captured.append(output[1]))
        try:
            model(src, src_len, torch.tensor([[BOS] + best.tokens], device=device))
        finally:
            hook.remove()
    weights = torch.cat(captured, dim=1)[0].float().cpu()  # one call (B, T, S), or T step calls (B, 1, S)
    pieces = tokenizer.sp.id_to_piece
    return weights, [pieces(i) for i in ids] + ["</s>"], [pieces(i) for i in best.tokens] + ["</s>"]

def generate(model: CharLM, vocab: CharVocab, prompts: list[str], max_chars: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, beam: int = 0, length_penalty: float = 1.0,
             seed: int | None = None, on_text=None, bf16: bool | None = None, int8: bool | None = None) -> list[str]:
    """A continuation of each prompt (prompts of one length, decoded as one batch).

    beam > 0 gives the length-normalised beam-search best; otherwise sampling (temperature 0:
    greedy). `on_text(piece)` receives the characters of a single prompt as they come. `bf16`
    None: bf16 where the CPU runs it natively. `int8` True: the linear layers in int8; None stays
    off, unlike `translate`'s: a character step's products are a few rows, and quantizing them at
    each call lost to bf16 (released shakespeare: 0.72x in one stream, 0.81x in 16, 0.99x in 32).
    A seed repeats its sample within one mode.
    """
    prompts = [p or "\n" for p in prompts]  # an empty prompt starts as after a line break
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("prompts decoded together must have the same length")
    device = device_of(model)
    ids = torch.tensor([vocab.encode(p, warn=True) for p in prompts], dtype=torch.long, device=device)
    with decoding(model, decoding_bf16(bf16, device), bool(int8)):
        state, first = model.start(ids), ids[:, -1]
        if beam > 0:
            best = search.beam_search(model, state, first, max_chars, beam, length_penalty=length_penalty)
            return [vocab.decode(hyps[0].tokens) for hyps in best]
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        on_step = None
        if on_text is not None and len(prompts) == 1:
            on_step = lambda rows, tokens: on_text(vocab.decode(tokens.tolist()))  # noqa: E731
        hyps = search.sample(model, state, first, max_chars, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator, on_step=on_step)
    return [vocab.decode(h.tokens) for h in hyps]


@torch.no_grad()
def score_text(model: CharLM, ids: torch.Tensor, context: torch.Tensor | None = None, streams: int = 32,
               warmup: int = 256, window: int = 512, bf16: bool = False) -> dict:
    """Bits/char and perplexity of every character of `ids` (1-D), each given the text before it.

    The text is cut into `streams` chunks scored in parallel; each chunk first reads the `warmup`
    characters before it (from `context` for the first chunk), unscored, so no chunk starts cold.
    """
    model.eval()
    device = device_of(model)
    context = torch.zeros(0, dtype=torch.long) if context is None else context.cpu()
    ids = ids.cpu()
    full = torch.cat([context, ids])
    n, offset = ids.numel(), context.numel()
    streams = max(1, min(streams, n // 64 or 1))
    bounds = [offset + n * s // streams for s in range(streams + 1)]
    total_nats, counted = 0.0, 0
    starts = [max(0, bounds[s] - warmup - 1) for s in range(streams)]
    width = max(bounds[s + 1] - starts[s] for s in range(streams))
    inputs = torch.zeros(streams, width, dtype=torch.long)
    scored = torch.zeros(streams, width, dtype=torch.bool)
    for s in range(streams):
        # left-aligned: every row starts from a fresh state on real text; the padding after a
        # shorter row's end is read but never scored. Column 0 is only ever an input, so the
        # text's very first character (when there is no context) is not scored.
        piece = full[starts[s] : bounds[s + 1]]
        inputs[s, : piece.numel()] = piece
        scored[s, bounds[s] - starts[s] : piece.numel()] = True
    scored[:, 0] = False
    hidden = None
    for t in range(0, width - 1, window):
        x, y = inputs[:, t : t + window].to(device), inputs[:, t + 1 : t + window + 1].to(device)
        x = x[:, : y.size(1)]
        with autocast(bf16, device):
            logits, hidden = model(x, hidden)
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
