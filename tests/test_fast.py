"""The CPU decoding kernels behind `fast.for_decoding`: each computes what the plain model does."""
import pytest
import torch

from seq2seq import search
from seq2seq.device import Precision, bf16_runs, int8_available
from seq2seq.fast import for_decoding
from conftest import random_batch, small_charlm, small_translator
from test_search import EOS, translator_start

pytestmark = pytest.mark.every_cpu  # run again by CI under emulated older CPUs

FP32, BF16, INT8 = Precision(bf16=False), Precision(bf16=True), Precision(bf16=False, int8=True)
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packed weights need oneDNN (mkldnn)")


@needs_onednn
def test_the_decoding_twin_decodes_as_the_model_and_leaves_it_as_it_was():
    """The twin's linear layers and one-way LSTMs run on packed weights; in fp32 its step
    computes the plain step's logits, and greedy and beam search find the same outputs. The
    model itself is not changed."""
    from seq2seq.fast.modules import FastLinear, FastLSTM

    charlm = small_charlm(seed=21).eval()
    prompt = torch.randint(1, 20, (4, 6), generator=torch.Generator().manual_seed(22))
    translator = small_translator(seed=23).eval()
    src, src_len = random_batch(seed=24, batch=7)
    with torch.no_grad():
        plain_logits, plain_state = charlm.step(prompt[:, -1], charlm.start(prompt))
        plain_greedy = search.greedy(charlm, charlm.start(prompt), prompt[:, -1], 20)
        plain_beam = search.beam_search(translator, *translator_start(translator, src, src_len), beam_size=3, eos=EOS)
        fast_charlm, fast_translator = for_decoding(charlm, FP32), for_decoding(translator, FP32)
        assert isinstance(fast_charlm.rnn, FastLSTM) and isinstance(fast_charlm.out, FastLinear)
        logits, state = fast_charlm.step(prompt[:, -1], fast_charlm.start(prompt))
        greedy = search.greedy(fast_charlm, fast_charlm.start(prompt), prompt[:, -1], 20)
        beam = search.beam_search(fast_translator, *translator_start(fast_translator, src, src_len), beam_size=3,
                                  eos=EOS)
    assert torch.allclose(logits, plain_logits, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(state["hidden"], plain_state["hidden"]))
    assert [h.tokens for h in greedy] == [h.tokens for h in plain_greedy]
    assert [[h.tokens for h in hyps] for hyps in beam] == [[h.tokens for h in hyps] for hyps in plain_beam]
    assert type(charlm.rnn).__name__ == "LSTM" and type(charlm.out) is torch.nn.Linear
    assert type(translator.squash) is torch.nn.Tanh and type(translator.attention.key_proj) is torch.nn.Linear


@needs_onednn
def test_packed_bidirectional_lstm_equals_the_module_over_a_packed_batch():
    """A bidirectional LSTM packed for decoding reads a packed, unsorted batch as nn.LSTM does:
    outputs of every step and both directions' final states, for each layer, in fp32; in int8
    within 2% (relative, in norm)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from seq2seq.fast.modules import FastLSTM

    torch.manual_seed(27)
    lstm = torch.nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(5, 7, 12)
    packed = pack_padded_sequence(x, torch.tensor([3, 7, 1, 5, 7]), batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        expected, (h, c) = lstm(packed)
        for dtype, int8, tolerance in ((torch.float32, False, 1e-5), (torch.float32, True, 0.02)):
            out, (our_h, our_c) = FastLSTM(lstm, dtype, int8)(packed)
            for ours, theirs in ((out.data, expected.data), (our_h, h), (our_c, c)):
                if int8:
                    assert float((ours - theirs).norm() / theirs.norm()) < tolerance
                else:
                    assert torch.allclose(ours, theirs, atol=tolerance)
            assert torch.equal(out.batch_sizes, expected.batch_sizes)


@needs_onednn
def test_packed_weights_are_kept_between_regions_until_the_weights_change():
    """A second decoding region reuses the first one's packed weights; a fused AdamW step, which
    changes the weights in place without bumping their version counters, makes the next region
    pack them again, and its step computes with the new weights."""
    model = small_charlm(seed=25).eval()
    prompt = torch.randint(1, 20, (3, 5), generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        first = for_decoding(model, FP32)
        first_out, first_layers = first.out.kernel, first.rnn.layers
        again = for_decoding(model, FP32)
        assert again.out.kernel is first_out and again.rnn.layers is first_layers
        other = BF16 if bf16_runs() else INT8  # below AVX-512, oneDNN packs no bf16
        assert for_decoding(model, other).out.kernel is not first_out  # another dtype, another packing
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.train()
    model(prompt)[0].sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        plain, _ = model.step(prompt[:, -1], model.start(prompt))
        fast = for_decoding(model, FP32)
        assert fast.out.kernel is not first_out and fast.rnn.layers is not first_layers
        packed, _ = fast.step(prompt[:, -1], fast.start(prompt))
    assert torch.allclose(packed, plain, atol=1e-5)


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and int8_available()),
                    reason="int8 products need oneDNN's quantized engine")
def test_int8_products_and_decoder_steps_stay_within_two_percent():
    """Int8Linear (a scale per weight row, one per input) is within 2% (relative, in norm) of the
    fp32 product, and so is a translator's decoder step with every linear layer and its gates in
    int8. (Whether int8 changes translations is measured on the released model, whose choices
    are not near-ties as a random model's are.)"""
    from seq2seq.fast.kernels import Int8Linear

    def relative_error(a, b):
        return float((a - b).norm() / b.norm())

    g = torch.Generator().manual_seed(31)
    weight, bias, x = torch.randn(300, 96, generator=g), torch.randn(300, generator=g), torch.randn(40, 96, generator=g)
    assert relative_error(Int8Linear(weight, bias)(x), torch.nn.functional.linear(x, weight, bias)) < 0.02  # 1.0%
    translator = small_translator(seed=32).eval()
    src, src_len = random_batch(seed=33, batch=16)
    with torch.no_grad():
        state, first, _ = translator_start(translator, src, src_len)
        exact, _ = translator.step(first, state)
        fast = for_decoding(translator, INT8)
        assert isinstance(fast.out.kernel, Int8Linear)
        state, first, _ = translator_start(fast, src, src_len)
        int8, _ = fast.step(first, state)
    assert relative_error(int8, exact) < 0.02
