"""Search invariants on real (randomly initialised) models of both kinds."""
import pytest
import torch

from seq2seq import search
from conftest import random_batch, small_charlm, small_translator

BOS, EOS = 2, 3


def translator_start(model, src, src_len):
    return model.start(src, src_len), torch.full((src.size(0),), BOS), (src_len * 2).tolist()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_beam_one_equals_greedy_translator(cell):
    model = small_translator(seed=1, cell=cell)
    src, src_len = random_batch(seed=2, batch=12)
    state, first, max_lens = translator_start(model, src, src_len)
    greedy = search.greedy(model, state, first, max_lens, eos=EOS)
    beam = search.beam_search(model, state, first, max_lens, beam_size=1, eos=EOS)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]
    # lengths differ across the batch, and some hypotheses hit max length: both paths are exercised
    assert len({len(h.tokens) for h in greedy}) > 1


def test_beam_one_equals_greedy_charlm():
    model = small_charlm(seed=3)
    prompt = torch.randint(1, 20, (5, 7), generator=torch.Generator().manual_seed(4))
    greedy = search.greedy(model, model.start(prompt), prompt[:, -1], 30)
    beam = search.beam_search(model, model.start(prompt), prompt[:, -1], 30, beam_size=1)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]
    assert all(len(h.tokens) == 30 for h in greedy)


@pytest.mark.parametrize("input_feeding", [False, True])
def test_batched_beam_equals_one_by_one(input_feeding):
    model = small_translator(seed=5, input_feeding=input_feeding, attention="additive")
    src, src_len = random_batch(seed=6, batch=9)
    state, first, max_lens = translator_start(model, src, src_len)
    batched = search.beam_search(model, state, first, max_lens, beam_size=4, eos=EOS, nbest=3)
    for i in range(src.size(0)):
        one_src = src[i : i + 1, : src_len[i]]
        s, f, m = translator_start(model, one_src, src_len[i : i + 1])
        single = search.beam_search(model, s, f, m, beam_size=4, eos=EOS, nbest=3)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert [round(h.score, 4) for h in single] == [round(h.score, 4) for h in batched[i]]


def test_batched_greedy_equals_one_by_one():
    model = small_translator(seed=7)
    src, src_len = random_batch(seed=8, batch=10)
    state, first, max_lens = translator_start(model, src, src_len)
    batched = search.greedy(model, state, first, max_lens, eos=EOS)
    for i in range(src.size(0)):
        s, f, m = translator_start(model, src[i : i + 1, : src_len[i]], src_len[i : i + 1])
        assert search.greedy(model, s, f, m, eos=EOS)[0].tokens == batched[i].tokens


def test_beam_finds_at_least_greedy_score_and_sorts_nbest():
    model = small_translator(seed=9)
    src, src_len = random_batch(seed=10, batch=8)
    state, first, max_lens = translator_start(model, src, src_len)
    greedy = search.greedy(model, state, first, max_lens, eos=EOS)
    beams = search.beam_search(model, state, first, max_lens, beam_size=6, eos=EOS, nbest=4, length_penalty=0.0)
    for g, hyps in zip(greedy, beams):
        assert len(hyps) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert hyps[0].score >= g.score - 1e-4  # length_penalty 0: raw log-probabilities
        assert len({tuple(h.tokens) for h in hyps}) == 4


def test_beam_scores_are_model_log_probs():
    """The reported (unnormalised) score equals the model's log-probability of the hypothesis + EOS."""
    model = small_translator(seed=11)
    with torch.no_grad():
        model.out.bias[EOS] += 2.0  # a random model may never stop otherwise
    src, src_len = random_batch(seed=12, batch=6)
    state, first, _ = translator_start(model, src, src_len)
    max_lens = [40] * 6  # long enough for every hypothesis to end with EOS
    for i, hyps in enumerate(search.beam_search(model, state, first, max_lens, 3, eos=EOS, length_penalty=0.0)):
        tokens = hyps[0].tokens
        assert len(tokens) < 40
        tgt_in = torch.tensor([[BOS] + tokens])
        gold = torch.tensor(tokens + [EOS])
        logits = model(src[i : i + 1, : src_len[i]], src_len[i : i + 1], tgt_in)
        logp = torch.log_softmax(logits[0], -1).gather(1, gold.unsqueeze(1)).sum()
        assert abs(float(logp) - hyps[0].score) < 1e-4


def test_sampling_top_k_one_equals_greedy_and_seed_repeats():
    model = small_charlm(seed=13)
    prompt = torch.randint(1, 20, (4, 5), generator=torch.Generator().manual_seed(14))
    greedy = [h.tokens for h in search.greedy(model, model.start(prompt), prompt[:, -1], 40)]
    top1 = search.sample(model, model.start(prompt), prompt[:, -1], 40, temperature=1.3, top_k=1,
                         generator=torch.Generator().manual_seed(0))
    assert [h.tokens for h in top1] == greedy
    cold = search.sample(model, model.start(prompt), prompt[:, -1], 40, temperature=0)
    assert [h.tokens for h in cold] == greedy

    def draw(seed, **kw):
        out = search.sample(model, model.start(prompt), prompt[:, -1], 40, generator=torch.Generator().manual_seed(seed), **kw)
        return [h.tokens for h in out]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert draw(3, top_p=0.9, top_k=5) == draw(3, top_p=0.9, top_k=5)


def test_top_k_and_top_p_restrict_the_support():
    model = small_charlm(seed=15)
    prompt = torch.full((64, 3), 5)
    logits, _ = model.step(prompt[:, -1], model.start(prompt))
    log_probs = logits.log_softmax(-1)
    allowed_k = set(log_probs[0].topk(3).indices.tolist())
    out = search.sample(model, model.start(prompt), prompt[:, -1], 1, top_k=3, generator=torch.Generator().manual_seed(0))
    assert {h.tokens[0] for h in out} <= allowed_k
    probs = log_probs[0].exp()
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    out = search.sample(model, model.start(prompt), prompt[:, -1], 1, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert {h.tokens[0] for h in out} <= nucleus


def test_nbest_larger_than_beam_is_refused():
    model = small_translator()
    src, src_len = random_batch(seed=0, batch=1)
    state, first, max_lens = translator_start(model, src, src_len)
    with pytest.raises(ValueError, match="nbest"):
        search.beam_search(model, state, first, max_lens, beam_size=2, eos=EOS, nbest=3)


def test_greedy_scores_are_summed_log_probs_up_to_eos():
    model = small_translator(seed=14)
    src, src_len = random_batch(seed=15, batch=6)
    state, first, max_lens = translator_start(model, src, src_len)
    hyps = search.greedy(model, state, first, max_lens, eos=EOS)
    for i, hyp in enumerate(hyps):
        s, f, _ = translator_start(model, src[i : i + 1], src_len[i : i + 1])
        total, tokens = 0.0, f
        ended = len(hyp.tokens) < max_lens[i]
        for tok in hyp.tokens + ([EOS] if ended else []):
            logits, s = model.step(tokens, s)
            total += float(logits.log_softmax(-1)[0, tok])
            tokens = torch.tensor([tok])
        assert abs(total - hyp.score) < 1e-4


@pytest.mark.parametrize("vocab", [8000, 2400, 8002, 1031])
def test_two_stage_argmax_and_topk_equal_torchs(vocab):
    """The group-wise reductions that greedy and beam search use over a vocabulary (8000: 64
    strided groups; 2400: 48; 8002 and 1031, a prime, with no multiple of 16 dividing them:
    torch's own) give torch's answers; argmax keeps the first of equal maxima, also where the
    first group holding the maximum is not the group of its first position."""
    x = torch.randn(37, vocab, generator=torch.Generator().manual_seed(vocab))
    assert torch.equal(search._argmax(x), x.argmax(-1))
    for k in (1, 10, 40):
        values, indices = search._topk(x, k)
        expected = x.topk(k, dim=1)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    for positions in ([vocab // 3, vocab - 1], [2, 65], [1, 65], [66, 3, vocab - 2]):
        tied = x.clone()
        tied[:, positions] = 99.0
        assert search._argmax(tied).tolist() == [min(positions)] * 37, positions
    some_tied = x.clone()
    some_tied[::2, [2, 65]] = 99.0  # ties in some rows only
    assert torch.equal(search._argmax(some_tied), some_tied.argmax(-1))
    assert search._argmax(x[:0]).numel() == 0


def test_sampling_settings_that_underflow_give_a_distribution():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 50), -1)
    best = log_probs.argmax(-1)
    for temperature, top_p in ((1e-300, 1.0), (5e-324, 1.0), (1.0, 1e-300), (0.8, 5e-324), (1e-7, 1e-300)):
        probs = search.sampling_probs(log_probs, temperature, 0, top_p)
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(3))
        assert torch.equal(probs.argmax(-1), best) and torch.equal(probs.max(-1).values, torch.ones(3))
        assert torch.equal(search.sampler(temperature, 0, top_p)(log_probs), best)
    wide = search.sampling_probs(log_probs, 1.0, 0, 0.9)  # an ordinary top-p keeps more than one token
    assert ((wide > 0).sum(-1) > 1).all()


@pytest.mark.parametrize("beam", [1, 4])
def test_stop_ends_a_search_before_the_next_step(beam):
    model = small_translator()
    src, src_len = random_batch(seed=3, batch=5)
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 3

    steps = []
    step = model.step
    model.step = lambda tokens, state: steps.append(1) or step(tokens, state)
    state, first, max_lens = translator_start(model, src, src_len)
    with pytest.raises(search.Stopped):
        if beam == 1:
            search.greedy(model, state, first, max_lens, eos=EOS, stop=stop)
        else:
            search.beam_search(model, state, first, max_lens, beam, eos=EOS, stop=stop)
    assert len(steps) == 3  # three steps ran, the fourth was never taken
