"""The gradient story, measured on the project's own cells: PNGs and summary.json.

    python scripts/gradient_flow.py --output reports/gradient_flow [--quick]

1. Vanishing: ||dL/dh_t|| over t on a recall task (a symbol, T - 2 blanks, a question mark:
   name the symbol; the copy-memory task's delay) for
   rnn, gru and lstm of one hidden size, at initialisation (PyTorch's default, and LSTM
   forget-gate biases of 1 and 5) and after training, T in 25, 50, 100, 200.
2. What each cell learns: recall accuracy after a fixed number of training steps against T.
3. Exploding: the pre-clip gradient norm of a tanh RNN whose recurrent weights start large
   (orthogonal, gain 1.5), trained by SGD with and without clipping.
4. Truncated BPTT: the character model at two window lengths, the activation memory a step
   saves for backward, and the loss each reaches on the same characters.

summary.json's `first_over_last` is ||dL/dh_1|| / ||dL/dh_T||: the share of the gradient at
the answer that reaches the symbol to recall; tiny means vanished.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seq2seq import plots  # noqa: E402
from seq2seq.errors import UserError  # noqa: E402
from seq2seq.gradient_flow import (RecallModel, recall_batch, saved_activation_bytes,  # noqa: E402
                                   scale_recurrent_weights, small_charlm_config)

LENGTHS = (25, 50, 100, 200)
SYMBOLS, DISTRACTORS, HIDDEN = 8, 1, 64
# (label, cell, forget bias: 0 = PyTorch's default initialisation). A forget gate of sigmoid(b)
# keeps sigmoid(b)**T of the cell state over T steps: 0.73**100 ~ 2e-14 for b = 1, 0.993**100 ~ 0.5
# for b = 5, which is the "chrono" rule b ~ log(T) of Tallec & Ollivier (2018).
VARIANTS = (("rnn", "rnn", 0.0), ("gru", "gru", 0.0), ("lstm", "lstm", 0.0), ("lstm, forget bias 1", "lstm", 1.0),
            ("lstm, forget bias 5", "lstm", 5.0))


def make_model(cell: str, forget_bias: float, seed: int) -> RecallModel:
    torch.manual_seed(seed)
    return RecallModel(cell, HIDDEN, SYMBOLS, DISTRACTORS, forget_bias=forget_bias)


def train_recall(model: RecallModel, length: int, steps: int, seed: int, clip: float | None = 1.0,
                 optimizer: torch.optim.Optimizer | None = None, batch: int = 64,
                 distractors: int = DISTRACTORS) -> dict:
    """Fresh batches each step (Adam, lr 0.01, unless given an optimizer); returns the pre-clip
    gradient norms, the losses and the accuracy on 1,000 held-out sequences."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-2)
    norms, losses = [], []
    for _ in range(steps):
        x, y = recall_batch(length, batch, SYMBOLS, distractors, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
        norms.append(float(norm))
        losses.append(float(loss.detach()))
        if math.isfinite(norms[-1]):
            optimizer.step()
    return {"grad_norms": norms, "losses": losses, "accuracy": accuracy(model, length, seed + 1, distractors)}


@torch.no_grad()
def accuracy(model: RecallModel, length: int, seed: int, distractors: int, n: int = 1000) -> float:
    x, y = recall_batch(length, n, SYMBOLS, distractors, torch.Generator().manual_seed(seed))
    return float((model(x).argmax(-1) == y).float().mean())


def probe(length: int, seed: int = 12345) -> tuple[torch.Tensor, torch.Tensor]:
    return recall_batch(length, 256, SYMBOLS, DISTRACTORS, torch.Generator().manual_seed(seed))


def vanishing(lengths, steps: int, seeds: int) -> tuple[dict, dict]:
    """Gradient norms per step at init and after training (the first seed's model), and the
    accuracy each variant trains to (mean over `seeds` runs: escaping the plateau is chancy)."""
    curves, summary = {}, {}
    for length in lengths:
        x, y = probe(length)
        for label, cell, bias in VARIANTS:
            started, accuracies = time.perf_counter(), []
            for seed in range(seeds):
                model = make_model(cell, bias, seed=seed)
                if seed == 0:
                    init = model.hidden_grad_norms(x, y)
                accuracies.append(round(train_recall(model, length, steps, seed=seed)["accuracy"], 3))
                if seed == 0:
                    after = model.hidden_grad_norms(x, y)
            curves[(length, label, "init")] = init.tolist()
            curves[(length, label, "trained")] = after.tolist()
            accuracy = round(sum(accuracies) / seeds, 3)
            summary.setdefault(label, {})[str(length)] = {
                "first_over_last_init": ratio(init), "first_over_last_trained": ratio(after),
                "accuracy": accuracy, "accuracies": accuracies, "train_steps": steps,
                "seconds": round(time.perf_counter() - started, 1)}
            print(f"T={length:4d} {label:20s} ratio init {ratio(init):.3g} trained {ratio(after):.3g} "
                  f"accuracy {accuracies}", file=sys.stderr)
    return curves, summary


def ratio(norms: torch.Tensor) -> float:
    return float(norms[0] / norms[-1])


def exploding(steps: int, length: int = 20, gain: float = 1.5, lr: float = 0.1, distractors: int = 8) -> tuple[dict, dict]:
    """A tanh RNN whose recurrent weights start large, trained by plain SGD (Adam rescales each
    update and so hides what a large gradient does) with and without clipping, on the recall
    task with random distractors (8 of them) instead of blanks."""
    runs, summary = {}, {}
    for label, clip in (("no clipping", None), ("clip 1.0", 1.0)):
        torch.manual_seed(0)
        model = RecallModel("rnn", HIDDEN, SYMBOLS, distractors)
        scale_recurrent_weights(model.rnn, gain)
        result = train_recall(model, length, steps, seed=7, clip=clip, distractors=distractors,
                              optimizer=torch.optim.SGD(model.parameters(), lr=lr))
        runs[label] = result
        finite = [n for n in result["grad_norms"] if math.isfinite(n)]
        summary[label] = {"max_grad_norm": max(finite), "median_grad_norm": sorted(finite)[len(finite) // 2],
                          "non_finite_steps": len(result["grad_norms"]) - len(finite),
                          "final_loss": round(sum(result["losses"][-20:]) / 20, 4), "accuracy": result["accuracy"]}
        print(f"exploding, {label}: {summary[label]}", file=sys.stderr)
    return runs, {"length": length, "distractors": distractors, "recurrent_gain": gain, "optimizer": f"SGD lr {lr}",
                  "steps": steps, **summary}


def truncated_bptt(text_path: Path, windows, chars: int, batch: int = 32) -> tuple[dict, dict]:
    """The same character model trained on the same characters at each window length."""
    from seq2seq.models.charlm import CharLM
    from seq2seq.models.rnn import detach
    from seq2seq.tokenizer import CharVocab

    if not text_path.is_file():
        raise UserError(f"{text_path}: not found (the truncated-BPTT part reads Tiny Shakespeare; pass --text)")
    text = text_path.read_text(encoding="utf-8")
    vocab = CharVocab.build(text)
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    valid = ids[-50_000:]
    stream_len = chars // batch
    streams = ids[: stream_len * batch + 1]
    runs, summary = {}, {}
    for window in windows:
        torch.manual_seed(0)
        model = CharLM(small_charlm_config(), len(vocab))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        x_all, y_all = streams[:-1].view(batch, stream_len), streams[1:].view(batch, stream_len)
        hidden, losses, seen, memory = None, [], [], 0
        started = time.perf_counter()
        for start in range(0, stream_len, window):
            x, y = x_all[:, start : start + window], y_all[:, start : start + window]

            def step():
                logits, new_hidden = model(x, hidden)
                return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()), new_hidden

            (loss, hidden), saved = saved_activation_bytes(step, model)
            memory = max(memory, saved)
            hidden = detach(hidden)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss))
            seen.append((start + x.size(1)) * batch)
        from seq2seq.inference import score_text
        valid_nats = score_text(model, valid)["nats_per_char"]
        runs[window] = {"chars": seen, "losses": losses}
        summary[str(window)] = {"saved_activation_mb": round(memory / 2**20, 1), "valid_nats_per_char": round(valid_nats, 4),
                                "final_train_loss": round(sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses) // 10), 4),
                                "steps": len(losses), "chars": seen[-1], "seconds": round(time.perf_counter() - started, 1)}
        print(f"bptt {window}: {summary[str(window)]}", file=sys.stderr)
    return runs, {"batch": batch, "hidden": small_charlm_config().hidden, **summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path("reports/gradient_flow"))
    p.add_argument("--quick", action="store_true", help="fewer training steps: under 5 minutes on 2 cores")
    p.add_argument("--text", type=Path, default=Path("../shared/data/tinyshakespeare/input.txt"),
                   help="text for the truncated-BPTT comparison")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        plots.require_matplotlib()
        args.output.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        recall_steps, seeds, explode_steps, bptt_chars = (300, 1, 300, 400_000) if args.quick else (600, 3, 600, 2_000_000)
        curves, recall = vanishing(LENGTHS, recall_steps, seeds)
        explode_runs, explode = exploding(explode_steps)
        bptt_runs, bptt = truncated_bptt(args.text, (32, 256), bptt_chars)
        t100 = recall
        bar = {"T": 100, "rnn_first_over_last_init": t100["rnn"]["100"]["first_over_last_init"],
               "lstm_fb1_first_over_last_init": t100["lstm, forget bias 1"]["100"]["first_over_last_init"],
               "rnn_accuracy": t100["rnn"]["100"]["accuracy"],
               "best_lstm_accuracy": max(t100[v[0]]["100"]["accuracy"] for v in VARIANTS if v[1] == "lstm")}
        bar["lstm_fb1_over_rnn"] = bar["lstm_fb1_first_over_last_init"] / max(bar["rnn_first_over_last_init"], 1e-300)
        summary = {"hidden": HIDDEN, "symbols": SYMBOLS, "distractors": DISTRACTORS, "quick": args.quick,
                   "recall_train_steps": recall_steps, "recall_seeds": seeds, "bar": bar, "recall": recall,
                   "exploding": explode, "truncated_bptt": bptt}
        plots.gradient_norms(curves, LENGTHS, [v[0] for v in VARIANTS], args.output / "gradient_norms.png")
        plots.recall_accuracy(recall, LENGTHS, args.output / "accuracy.png")
        plots.exploding(explode_runs, explode, args.output / "exploding.png")
        plots.truncated_bptt(bptt_runs, bptt, args.output / "truncated_bptt.png")
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except UserError as e:
        print(f"gradient_flow: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(args.output), "seconds": summary["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
