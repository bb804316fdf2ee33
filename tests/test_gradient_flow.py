"""The gradient-flow measurements: right against a hand computation, and telling the cells apart."""
import pytest
import torch
from torch import nn

from seq2seq.gradient_flow import RecallModel, recall_batch, saved_activation_bytes, small_charlm_config
from seq2seq.models.charlm import CharLM
from seq2seq.models.rnn import make_rnn


def test_hidden_gradient_norms_equal_the_product_of_jacobians():
    torch.manual_seed(0)
    model = RecallModel("rnn", hidden=5, symbols=3, distractors=2, emb_dim=4)
    x, y = recall_batch(7, 2, 3, 2, torch.Generator().manual_seed(1))
    norms = model.hidden_grad_norms(x, y)

    # by hand: h_t = tanh(W_ih e_t + b_ih + W_hh h_{t-1} + b_hh), L = mean CE(W_out h_T + b_out)
    model = model.double()
    rnn, emb = model.rnn, model.embed(x).detach()
    h, states = torch.zeros(2, 5, dtype=torch.float64), []
    for t in range(7):
        h = torch.tanh(emb[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0)
        states.append(h.detach())
    probs = torch.softmax(states[-1] @ model.out.weight.T + model.out.bias, -1).detach()
    grad = (probs - nn.functional.one_hot(y, 3)) / 2 @ model.out.weight.detach()  # dL/dh_T
    expected = [grad.norm()]
    for t in range(6, 0, -1):  # dL/dh_{t-1} = dL/dh_t diag(1 - h_t^2) W_hh
        grad = (grad * (1 - states[t] ** 2)) @ rnn.weight_hh_l0.detach()
        expected.append(grad.norm())
    torch.testing.assert_close(norms, torch.stack(expected[::-1]), rtol=1e-10, atol=0)


def test_forget_bias_sets_the_lstm_forget_gates_only():
    torch.manual_seed(0)
    rnn = make_rnn("lstm", 4, 6, layers=2, dropout=0.0, forget_bias=1.0)
    for layer in range(2):
        total = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
        assert torch.all(total[6:12] == 1.0)
        assert not torch.all(total[:6] == 1.0) and not torch.all(total[12:] == 1.0)
    torch.manual_seed(0)
    gru = make_rnn("gru", 4, 6, layers=1, dropout=0.0, forget_bias=1.0)  # no forget gate: untouched
    torch.manual_seed(0)
    assert torch.equal(gru.bias_ih_l0, make_rnn("gru", 4, 6, layers=1, dropout=0.0).bias_ih_l0)


def test_rnn_gradient_vanishes_orders_of_magnitude_faster_than_lstm():
    x, y = recall_batch(40, 64, 8, 8, torch.Generator().manual_seed(0))
    ratios = {}
    for cell in ("rnn", "lstm"):
        torch.manual_seed(0)
        model = RecallModel(cell, 32, 8, 8, forget_bias=1.0)
        norms = model.hidden_grad_norms(x, y)
        ratios[cell] = float(norms[0] / norms[-1])
    assert ratios["rnn"] * 10 < ratios["lstm"], ratios


def test_saved_activations_grow_with_the_bptt_window():
    torch.manual_seed(0)
    model = CharLM(small_charlm_config(hidden=32), 20)
    sizes = {}
    for window in (16, 32, 64):
        x = torch.randint(0, 20, (4, window))
        _, sizes[window] = saved_activation_bytes(lambda: model(x)[0].sum(), model)
    assert sizes[64] - sizes[16] == pytest.approx(3 * (sizes[32] - sizes[16]), rel=0.05)  # linear in the window
    assert sizes[64] / sizes[16] > 3  # and little else: the weights are not counted
