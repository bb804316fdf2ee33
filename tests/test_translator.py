"""The translator network: loop-free teacher forcing, the step interface, padding, cells."""
import pytest
import torch
import torch.nn.functional as F

from seq2seq import search
from seq2seq.data import pad
from conftest import random_batch, small_translator

BOS, EOS = 2, 3


def gold_targets(seed: int, batch: int, vocab: int = 40):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 8, (batch,), generator=g)]
    tgt, _ = pad(rows, 0, bos=BOS, eos=EOS)
    return tgt[:, :-1], tgt[:, 1:]


def loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=0, reduction="sum")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("attention", ["dot", "general", "additive"])
def test_loop_free_teacher_forcing_equals_step_loop(cell, attention):
    model = small_translator(seed=1, cell=cell, attention=attention, enc_hidden=12, dec_hidden=24)
    src, src_len = random_batch(seed=2, batch=7)
    tgt_in, tgt_out = gold_targets(seed=3, batch=7)
    loop_free = loss(model(src, src_len, tgt_in), tgt_out)
    stepped = loss(model(src, src_len, tgt_in, step_loop=True), tgt_out)
    assert torch.allclose(loop_free, stepped, rtol=1e-5), (float(loop_free), float(stepped))
    g1 = torch.autograd.grad(loop_free, model.decoder.weight_hh_l0)[0]
    g2 = torch.autograd.grad(stepped, model.decoder.weight_hh_l0)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_step_interface_reproduces_teacher_forced_log_probs():
    model = small_translator(seed=4, input_feeding=True)
    src, src_len = random_batch(seed=5, batch=4)
    tgt_in, _ = gold_targets(seed=6, batch=4)
    expected = torch.log_softmax(model(src, src_len, tgt_in), -1)
    state = model.start(src, src_len)
    for t in range(tgt_in.size(1)):
        logits, state = model.step(tgt_in[:, t], state)
        assert torch.allclose(logits.log_softmax(-1), expected[:, t], atol=1e-5)


def test_teacher_forcing_zero_feeds_back_greedy_predictions():
    """Scheduled sampling at ratio 0 feeds the model's own argmax: the same path as greedy search."""
    model = small_translator(seed=7)
    src, src_len = random_batch(seed=8, batch=5)
    steps = 6
    tgt_in = torch.full((5, steps), BOS)  # only position 0 is read when the ratio is 0
    logits = model(src, src_len, tgt_in, teacher_forcing=0.0)
    hyps = search.greedy(model, model.start(src, src_len), torch.full((5,), BOS), steps, eos=None)
    assert logits.argmax(-1).tolist() == [h.tokens for h in hyps]


def test_scheduled_sampling_mixes_gold_and_predictions():
    model = small_translator(seed=9)
    src, src_len = random_batch(seed=10, batch=6)
    tgt_in, tgt_out = gold_targets(seed=11, batch=6)
    gold = loss(model(src, src_len, tgt_in), tgt_out)
    assert torch.equal(loss(model(src, src_len, tgt_in, teacher_forcing=1.0), tgt_out), gold)  # ratio 1: all gold
    own = loss(model(src, src_len, tgt_in, teacher_forcing=0.0), tgt_out)  # ratio 0: all predictions
    torch.manual_seed(0)
    mixed = loss(model(src, src_len, tgt_in, teacher_forcing=0.5), tgt_out)
    assert not torch.allclose(gold, mixed) and not torch.allclose(own, mixed)


def test_padding_does_not_change_a_sentence():
    """A sentence encoded and decoded alone equals the same sentence inside a padded batch."""
    model = small_translator(seed=12)
    src, src_len = random_batch(seed=13, batch=6, min_len=2, max_len=12)
    tgt_in, _ = gold_targets(seed=14, batch=6)
    batched = model(src, src_len, tgt_in)
    for i in range(6):
        alone = model(src[i : i + 1, : src_len[i]], src_len[i : i + 1], tgt_in[i : i + 1])
        assert torch.allclose(alone, batched[i : i + 1], atol=1e-5)


def test_embeddings_are_tied_and_dot_attention_checks_sizes():
    from seq2seq.config import TranslatorModel
    from seq2seq.errors import UserError
    from seq2seq.models.translator import Translator

    model = small_translator()
    assert model.out.weight is model.embed.weight
    with pytest.raises(UserError, match="dot attention"):
        Translator(TranslatorModel(attention="dot", enc_hidden=100, dec_hidden=300), 50)
    with pytest.raises(UserError, match="model.cell"):
        Translator(TranslatorModel(cell="transformer"), 50)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.05])
def test_dropout_drops_its_share_keeps_the_mean_and_repeats_with_the_seed(p):
    """Both models' Dropout (16 random bits an element): on 1M values the dropped share is p
    within 0.005, the kept values are 1 / (1 - p), the mean stays 1 within 0.005; the same seed
    gives the same mask; eval mode and p = 0 pass the input through; p = 1 drops everything."""
    from seq2seq.models.rnn import Dropout

    x = torch.ones(1000, 1000)
    dropout = Dropout(p).train()
    torch.manual_seed(0)
    out = dropout(x)
    assert abs(float((out == 0).float().mean()) - p) < 0.005
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)), rtol=1e-4)
    assert abs(float(out.mean()) - 1) < 0.005
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out)
    odd = torch.randn(3, 5, 7)  # a size that is not a multiple of four
    assert dropout(odd).shape == odd.shape
    assert dropout.eval()(x) is x and Dropout(0.0).train()(x) is x
    assert not Dropout(1.0).train()(x).any()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_by_layer_rnn_equals_the_module_and_drops_between_layers(monkeypatch, cell, bidirectional, packed):
    """Our RNN modules, which train a multi-layer RNN one layer at a time with our dropout in between,
    gives the module's outputs and final states (in the input's row order, for padded and packed
    unsorted input, with and without a start state) when that dropout keeps everything; with the
    real mask, the second layer's input loses its share and only in training."""
    import copy
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    from seq2seq.models import rnn as rnn_module

    torch.manual_seed(0)
    rnn = rnn_module.make_rnn(cell, 6, 5, layers=3, dropout=0.4, bidirectional=bidirectional).train()
    plain = copy.deepcopy(rnn)
    plain.dropout = 0.0
    x, lengths = torch.randn(4, 7, 6), torch.tensor([3, 7, 1, 5])
    states = 3 * (2 if bidirectional else 1)
    start = torch.randn(states, 4, 5)
    start = (start, torch.randn(states, 4, 5)) if cell == "lstm" else start
    monkeypatch.setattr(rnn_module, "keep_mask", lambda data, p: torch.ones_like(data))
    for hidden in (None, start):
        inputs = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False) if packed else x
        out, final = rnn(inputs, hidden)
        want_out, want_final = plain(inputs, hidden)
        if packed:
            out, want_out = pad_packed_sequence(out, batch_first=True)[0], pad_packed_sequence(want_out, batch_first=True)[0]
        assert torch.allclose(out, want_out, atol=1e-6)
        for got, want in zip(final if cell == "lstm" else [final], want_final if cell == "lstm" else [want_final]):
            assert torch.allclose(got, want, atol=1e-6)
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(rnn_module, "keep_mask", lambda data, p: seen.append(data.shape) or torch.zeros_like(data))
    rnn(x)
    assert len(seen) == 2  # between the three layers
    rnn.eval()
    assert torch.allclose(rnn(x)[0], plain.eval()(x)[0]) and len(seen) == 2


def test_sigmoid_tanh_equals_torchs_in_value_and_gradient():
    """The decoder's tanh (2 sigmoid(2x) - 1, which this CPU build computes 10x as fast) is
    torch.tanh within 2e-7 in fp32 over [-20, 20], and its gradient within 4e-7 (a few units in
    the last place of values near 1)."""
    from seq2seq.fast.kernels import sigmoid_tanh as tanh

    x = torch.linspace(-20, 20, 100_001, dtype=torch.float64).float().requires_grad_()
    ours, theirs = tanh(x), torch.tanh(x)
    assert (ours - theirs).abs().max() < 2e-7
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
    assert (grad_ours - grad_theirs).abs().max() < 4e-7


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_step_equals_a_one_step_call_of_the_module(cell):
    """`step` (the cell kernels, layer by layer) gives the module's output and state for one time
    step, from zeros and from a given state; building the modules draws no random numbers, so a
    model initialises as a plain PyTorch module does."""
    from torch import nn
    from seq2seq.models import rnn as rnn_module

    torch.manual_seed(0)
    ours = rnn_module.make_rnn(cell, 6, 5, layers=2, dropout=0.3).eval()
    torch.manual_seed(0)
    theirs = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](6, 5, 2, batch_first=True, dropout=0.3)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    x = torch.randn(4, 6)
    out, hidden = ours.step(x, None)
    want_out, want_hidden = theirs.eval()(x.unsqueeze(1))
    assert torch.allclose(out, want_out[:, 0], atol=1e-6)
    out, _ = ours.step(x, hidden)
    assert torch.allclose(out, theirs(x.unsqueeze(1), want_hidden)[0][:, 0], atol=1e-6)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("int8", 0.03)])
def test_attention_is_read_from_the_returned_text_on_the_searchs_own_encoder_state(precision, tolerance):
    """translations(attention=True) reuses the state the search began with: the weights equal a
    fresh encoder pass read back teacher-forced over the returned pieces, for every sentence of
    the batch, and each row sums to one (int8 quantizes activations per batch, so a sentence
    alone differs a little from it in a batch)."""
    from conftest import ROOT

    from seq2seq import checkpoint, inference
    from seq2seq.device import resolve_precision
    from seq2seq.tokenizer import BOS, EOS, PAD

    _, model, tokenizer = checkpoint.load(ROOT / "checkpoints" / "en-fr")
    lines = ["Two dogs play in the snow.", "A man in a red shirt rides a bicycle down a hill.", "Hello!"]
    found = inference.translations(model, tokenizer, lines, beam=4, attention=True, precision=precision)
    ids = tokenizer.encode(lines)
    with inference.decoding(model, resolve_precision(precision, torch.device("cpu"), "translator")) as decoder:
        for line_ids, translation in zip(ids, found):
            src, src_len = pad([line_ids], PAD, eos=EOS)
            target = tokenizer.encode([translation.nbest[0][0]])[0]
            fresh = decoder.attention_weights(decoder.start(src, src_len), torch.tensor([[BOS] + target]))[0]
            got = translation.attention.weights
            assert got.shape == (len(target) + 1, len(line_ids) + 1)
            assert torch.allclose(got, fresh.float(), atol=tolerance), (got - fresh).abs().max()
            assert torch.allclose(got.sum(1), torch.ones(len(got)), atol=1e-3)


def synthetic_pairs(count: int, order, seed: int) -> list[tuple[list[int], list[int]]]:
    """Source words 4..19, each translated to itself + 16, in `order` (a list -> a list)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        source = (torch.randperm(16, generator=g)[: int(torch.randint(3, 7, (), generator=g))] + 4).tolist()
        pairs.append((source, order([w + 16 for w in source])))
    return pairs


@pytest.mark.parametrize("name, order", [("monotone", lambda ws: ws), ("swapped", lambda ws: ws[::-1])])
def test_alignments_recover_a_known_word_order_from_a_trained_model(name, order):
    """A tiny model trained on synthetic pairs whose alignment is known, in order or reversed:
    the alignments of its translations of new sentences are that alignment."""
    from seq2seq import inference
    from seq2seq.tokenizer import BOS, EOS, PAD

    model = small_translator(seed=1, vocab=40, attention="dot", enc_hidden=32, dec_hidden=64, emb_dim=32).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        batch = synthetic_pairs(64, order, seed=step)
        src, src_len = pad([s for s, _ in batch], PAD, eos=EOS)
        tgt, _ = pad([[BOS] + t + [EOS] for _, t in batch], PAD)
        logits = model(src, src_len, tgt[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), tgt[:, 1:].reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    right = total = 0
    with torch.no_grad():
        for source, target in synthetic_pairs(30, order, seed=10_000):
            src, src_len = pad([source], PAD, eos=EOS)
            state = model.start(src, src_len)
            out = search.greedy(model, state, torch.tensor([BOS]), len(source) + 3, eos=EOS)[0].tokens
            weights = model.attention_weights(state, torch.tensor([[BOS] + out]))[0]
            attention = inference.Attention(weights, [f"\u2581s{w}" for w in source] + ["</s>"],
                                            [f"\u2581t{w}" for w in out] + ["</s>"])
            expected = {(source.index(w - 16), j) for j, w in enumerate(out) if w - 16 in source}
            got = set(inference.word_alignments(attention))
            right += len(expected & got)
            total += len(expected)
    assert total >= 90 and right / total >= 0.9, (name, right, total)
