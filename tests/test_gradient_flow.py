"""The gradient-flow experiment's parts: the task, the unroll, the probe, the inits, the claims."""
import math

import pytest
import torch
from torch import nn

from seq2seq.config import Config, load_preset
from seq2seq.errors import UserError
from seq2seq.gradient_flow import (DISTRACTORS, SYMBOLS, VARIANTS, RecallModel, claims, evaluation_set,
                                   fisher_exact, fitted_exponent, gradient_probe, mean_interval, recall_batch,
                                   saved_activation_bytes, small_charlm_config, training_stream, unroll)
from seq2seq.models.charlm import CharLM
from seq2seq.models.rnn import make_rnn, set_chrono_init


def test_the_task_draws_distractors_from_the_whole_range_and_puts_symbol_and_query_in_place():
    x, y = recall_batch(50, 400, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], y) and set(y.tolist()) == set(range(SYMBOLS))
    assert torch.all(x[:, -1] == SYMBOLS + DISTRACTORS)
    middle = x[:, 1:-1]
    assert set(middle.unique().tolist()) == set(range(SYMBOLS, SYMBOLS + DISTRACTORS))
    counts = torch.bincount(middle.flatten() - SYMBOLS, minlength=DISTRACTORS).float()
    assert counts.min() / counts.max() > 0.9  # uniform over 19,200 draws
    assert len({tuple(row) for row in x.tolist()}) == 400  # no two sequences alike


def test_the_evaluation_set_is_no_training_stream():
    eval_x, _ = evaluation_set(30)
    assert torch.equal(eval_x, evaluation_set(30)[0])  # fixed
    for seed in range(20):
        train_x, _ = recall_batch(30, 2000, training_stream(seed))
        assert not torch.equal(train_x, eval_x)
    with pytest.raises(ValueError, match="training seeds"):
        training_stream(10**9)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_the_float64_unroll_equals_the_torch_module(cell):
    torch.manual_seed(0)
    rnn = make_rnn(cell, 5, 7, layers=1, dropout=0.0)
    set_chrono_init(rnn, 20)  # non-zero gate biases, so a wrong gate order shows
    x = torch.randn(3, 11, 5, dtype=torch.float64)
    expected, _ = rnn.double()(x)
    outputs, keeps = unroll(rnn, x)
    torch.testing.assert_close(outputs, expected, rtol=1e-12, atol=1e-12)
    assert (keeps is None) == (cell == "rnn")
    if cell == "lstm":  # the keep gate is the forget gate: sigmoid of its bias at a zero input and state
        _, keeps = unroll(rnn, torch.zeros(1, 1, 5, dtype=torch.float64))
        torch.testing.assert_close(keeps[0, 0], torch.sigmoid(rnn.bias_ih_l0[7:14] + rnn.bias_hh_l0[7:14]))


def test_the_probe_ratio_equals_a_hand_computed_rnn_gradient():
    """||dL_i/de_1|| / ||dL_i/de_T|| by the chain rule through h_t = tanh(W e_t + U h_{t-1} + b)."""
    torch.manual_seed(0)
    model = RecallModel(VARIANTS["rnn"], horizon=6).double()
    x, y = recall_batch(6, 3, torch.Generator().manual_seed(1))
    probe = gradient_probe(model, x, y)
    rnn, out = model.rnn, model.out
    W, U, b = rnn.weight_ih_l0.detach(), rnn.weight_hh_l0.detach(), (rnn.bias_ih_l0 + rnn.bias_hh_l0).detach()
    ratios = []
    for i in range(3):
        e, h, states = model.embed(x[i]).detach(), torch.zeros(128, dtype=torch.float64), []
        for t in range(6):
            h = torch.tanh(W @ e[t] + U @ h + b)
            states.append(h)
        p = torch.softmax(out(h), -1).detach()
        grad_h = out.weight.detach().T @ (p - nn.functional.one_hot(y[i], SYMBOLS))  # dL/dh_T
        grad_e = {5: W.T @ (grad_h * (1 - states[5] ** 2))}
        for t in range(5, 0, -1):  # dL/dh_{t-1} = U^T (dL/dh_t * (1 - h_t^2))
            grad_h = U.T @ (grad_h * (1 - states[t] ** 2))
        grad_e[0] = W.T @ (grad_h * (1 - states[0] ** 2))
        ratios.append(float(grad_e[0].norm() / grad_e[5].norm()))
    assert probe["ratio"] == pytest.approx(sorted(ratios)[1], rel=1e-9)
    assert probe["keep_gate"] is None
    assert probe["spectral_radius"] == pytest.approx(float(torch.linalg.eigvals(U).abs().max()))


def test_the_probe_tells_a_vanished_gradient_from_a_kept_one():
    x, y = evaluation_set(100)
    probes = {}
    for name in ("rnn", "lstm", "lstm-chrono"):
        torch.manual_seed(0)
        probes[name] = gradient_probe(RecallModel(VARIANTS[name], horizon=100), x[:64], y[:64])
    assert probes["rnn"]["below_float32_floor"] and probes["lstm"]["below_float32_floor"]
    assert not probes["lstm-chrono"]["below_float32_floor"] and probes["lstm-chrono"]["ratio"] > 1e-3
    assert probes["lstm-chrono"]["keep_gate"] > 0.9 > 0.6 > probes["lstm"]["keep_gate"]


def test_the_variants_match_on_recurrent_parameters():
    counts = {name: sum(p.numel() for p in RecallModel(v, horizon=10).rnn.parameters())
              for name, v in VARIANTS.items()}
    assert counts["rnn"] == 20_736 and counts["lstm"] == 25_088 and counts["gru"] == 22_896
    assert max(counts.values()) / min(counts.values()) < 1.25


def test_chrono_init_draws_the_keep_bias_in_its_range_and_closes_the_lstm_input():
    torch.manual_seed(0)
    lstm = make_rnn("lstm", 4, 500, layers=2, dropout=0.0, chrono_horizon=50)
    for layer in range(2):
        total = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        forget, inputs = total[500:1000], total[:500]
        assert forget.min() >= 0 and forget.max() <= math.log(49) and forget.std() > 0.5
        torch.testing.assert_close(inputs, -forget)
        assert not torch.all(total[1000:] == 0)  # the cell and output gates keep PyTorch's draw
    gru = make_rnn("gru", 4, 500, layers=1, dropout=0.0, chrono_horizon=50)
    update = (gru.bias_ih_l0 + gru.bias_hh_l0)[500:1000]
    assert update.min() >= 0 and update.max() <= math.log(49)
    torch.manual_seed(0)
    plain = make_rnn("rnn", 4, 6, layers=1, dropout=0.0, chrono_horizon=50)
    torch.manual_seed(0)
    assert torch.equal(plain.bias_ih_l0, make_rnn("rnn", 4, 6, layers=1, dropout=0.0).bias_ih_l0)
    with pytest.raises(UserError, match="at least 3"):
        set_chrono_init(lstm, 2)


def test_chrono_horizon_is_a_checked_model_setting():
    cfg = load_preset("tiny-charlm", "charlm", ["model.chrono_horizon=64"])
    model = CharLM(cfg.model, 30)
    assert model.rnn.bias_ih_l0[cfg.model.hidden : 2 * cfg.model.hidden].min() >= 0
    raw = cfg.to_dict()
    raw["model"]["chrono_horizon"] = 2
    with pytest.raises(UserError, match=r"\[model\] chrono_horizon: must be 0 \(off\) or at least 3"):
        Config.from_dict(raw)
    raw["model"].update(chrono_horizon=64, forget_bias=1.0)
    with pytest.raises(UserError, match="leave forget_bias at 0"):
        Config.from_dict(raw)


def test_forget_bias_sets_the_lstm_forget_gates_only():
    torch.manual_seed(0)
    rnn = make_rnn("lstm", 4, 6, layers=2, dropout=0.0, forget_bias=1.0)
    for layer in range(2):
        total = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
        assert torch.all(total[6:12] == 1.0)
        assert not torch.all(total[:6] == 1.0) and not torch.all(total[12:] == 1.0)


def test_fisher_exact_gives_known_p_values():
    assert fisher_exact(5, 0, 0, 5) == pytest.approx(2 / 252)  # two-sided: both extreme tables
    assert fisher_exact(3, 1, 1, 3) == pytest.approx(34 / 70)  # scipy.stats.fisher_exact: 0.4857
    assert fisher_exact(1, 9, 11, 3) == pytest.approx(0.002759, abs=1e-6)  # Wikipedia's worked example
    assert fisher_exact(2, 2, 2, 2) == pytest.approx(1.0)


def test_mean_interval_is_students_t():
    mean, low, high = mean_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    half = 2.776 * math.sqrt(0.025) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((0.3, 0.3 - half, 0.3 + half))
    assert mean_interval([0.7]) == (0.7, 0.7, 0.7)


def run(variant: str, length: int, seed: int, accuracy: float) -> dict:
    return {"variant": variant, "length": length, "seed": seed, "accuracy": accuracy, "solved": accuracy >= 0.98}


def test_the_claims_pass_on_a_summary_that_bears_them_out():
    runs = ([run("rnn", 10, s, 1.0) for s in range(4)] + [run("rnn", 10, 4, 0.5)]
            + [run("rnn", 100, s, a) for s, a in enumerate((0.12, 0.13, 0.11, 0.14, 0.125))]
            + [run("lstm-chrono", 100, s, 1.0) for s in range(5)])
    verdicts = {c["id"]: c for c in claims(runs)}
    assert all(c["pass"] for c in verdicts.values()), verdicts
    assert verdicts["C4"]["table"] == [[5, 0], [0, 5]] and verdicts["C4"]["p"] == pytest.approx(2 / 252, abs=1e-5)


def test_each_claim_fails_on_a_summary_that_refutes_it():
    runs = ([run("rnn", 10, s, 1.0) for s in range(3)] + [run("rnn", 10, s, 0.3) for s in (3, 4)]
            + [run("rnn", 100, s, a) for s, a in enumerate((0.33, 0.55, 0.53, 0.68, 0.34))]
            + [run("lstm-chrono", 100, s, 1.0) for s in range(3)] + [run("lstm-chrono", 100, s, 0.2) for s in (3, 4)])
    verdicts = {c["id"]: c for c in claims(runs)}
    assert not any(c["pass"] for c in verdicts.values()), verdicts
    assert verdicts["C2"]["interval"][1] > 0.25 and verdicts["C4"]["p"] > 0.05
    assert not any(c["pass"] for c in claims([]))  # no runs: nothing shown, nothing passes


def test_fitted_exponent_recovers_a_power_law():
    sizes = [16, 32, 64, 128]
    assert fitted_exponent(sizes, [3 * s**1.5 for s in sizes]) == pytest.approx(1.5)


def test_saved_activations_grow_with_the_bptt_window():
    torch.manual_seed(0)
    model = CharLM(small_charlm_config(hidden=32), 20)
    sizes = {}
    for window in (16, 32, 64):
        x = torch.randint(0, 20, (4, window))
        _, sizes[window] = saved_activation_bytes(lambda: model(x)[0].sum(), model)
    assert sizes[64] - sizes[16] == pytest.approx(3 * (sizes[32] - sizes[16]), rel=0.05)  # linear in the window
    assert sizes[64] / sizes[16] > 3  # and little else: the weights are not counted
