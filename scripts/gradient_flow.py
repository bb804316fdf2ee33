"""Why gated cells carry what a plain RNN cannot, on the project's own cells: PNGs, summary.json.

    python scripts/gradient_flow.py --quick              # under 5 minutes on 2 cores
    python scripts/gradient_flow.py                      # the full run: more lengths, cells, seeds
    python scripts/gradient_flow.py --calibrate          # the learning-rate grid behind both

1. Recall over a delay with random distractors (`seq2seq.gradient_flow`): every cell and
   initialisation at every length, one run per seed, stopped once solved. Accuracy on held-out
   sequences, steps to solve, and during training the share of the gradient that reaches the
   symbol, ||dL/de_1|| / ||dL/de_T||, with the RNN's spectral radius and the keep gates.
2. The claims fixed before the runs (`seq2seq.gradient_flow.claims`), pass or fail.
3. Exploding: a tanh RNN with large recurrent weights under SGD, with and without clipping, over
   seeds: the distribution of gradient norms and the share of runs that diverge.
4. Truncated backpropagation through time: the character model at several windows after the same
   number of updates, the memory each keeps for backward, and the exponents of step time and
   memory in T and H fitted against O(T·H·(D+H)) and O(T·H).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seq2seq import plots  # noqa: E402
from seq2seq.config import default_data_dir  # noqa: E402
from seq2seq.errors import UserError  # noqa: E402
from seq2seq.gradient_flow import (VARIANTS, Training, claims, fitted_exponent, mean_interval,  # noqa: E402
                                   saved_activation_bytes, small_charlm_config, train_exploding,
                                   train_recall)

QUICK_VARIANTS = ("rnn", "lstm", "lstm-forget1", "lstm-chrono", "gru")
MODES = {
    "quick": {"lengths": (10, 30, 100), "variants": QUICK_VARIANTS, "seeds": 5, "budget": 600,
              "exploding": {"seeds": 5, "gains": (1.0, 2.0, 3.0), "steps": 300},
              "bptt": {"windows": (16, 64, 256), "updates": 120, "hidden": 128, "batch": 16,
                       "fit_lengths": (32, 64, 128, 256), "fit_hiddens": (64, 128, 256, 512), "repeats": 3}},
    "full": {"lengths": (10, 30, 100, 200), "variants": tuple(VARIANTS), "seeds": 10, "budget": 1500,
             "exploding": {"seeds": 10, "gains": (1.0, 2.0, 3.0), "steps": 500},
             "bptt": {"windows": (16, 64, 256), "updates": 400, "hidden": 256, "batch": 32,
                      "fit_lengths": (32, 64, 128, 256, 512), "fit_hiddens": (64, 128, 256, 512, 1024), "repeats": 5}},
}
CALIBRATION = {"lrs": (1e-3, 3e-3, 1e-2), "lengths": (10, 30), "seeds": (1000, 1001, 1002), "variants": QUICK_VARIANTS, "budget": 600}


def one_thread() -> None:
    """Each worker runs single-threaded, so two runs use the two cores side by side; denormals
    flush to zero because a vanished float32 gradient is otherwise ten times slower to compute."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _recall_job(job: tuple) -> dict:
    variant, length, seed, training = job
    started = time.perf_counter()
    run = train_recall(VARIANTS[variant], length, seed, training)
    return {**run, "seconds": round(time.perf_counter() - started, 2)}


def _exploding_job(job: tuple) -> dict:
    seed, gain, clip, steps = job
    return train_exploding(seed, gain, clip, steps=steps)


def in_parallel(function, jobs: list, workers: int, what: str) -> list:
    """Jobs across `workers` single-threaded processes, results in the jobs' order."""
    from tqdm import tqdm

    with multiprocessing.get_context("spawn").Pool(workers, initializer=one_thread) as pool:
        results = list(tqdm(pool.imap(function, jobs), total=len(jobs), desc=what, file=sys.stderr))
    return results


def recall_jobs(lengths, variants, seeds, training: Training) -> list[tuple]:
    """Longest first, so the two workers finish together."""
    return [(v, n, s, training) for n in sorted(lengths, reverse=True) for v in variants for s in seeds]


def summarise_recall(runs: list[dict], lengths, variants, budget: int) -> dict:
    summary = {}
    for length in lengths:
        for variant in variants:
            chosen = [r for r in runs if r["length"] == length and r["variant"] == variant]
            accuracies = [r["accuracy"] for r in chosen]
            mean, low, high = mean_interval(accuracies)
            steps = [r["steps_to_solve"] if r["solved"] else math.inf for r in chosen]
            init_ratios = [r["history"][0]["ratio"] for r in chosen]
            summary.setdefault(str(length), {})[variant] = {
                "solved": sum(r["solved"] for r in chosen), "seeds": len(chosen),
                "accuracy_mean": round(mean, 4), "accuracy_interval": [round(low, 4), round(high, 4)],
                "accuracies": accuracies,
                "median_steps_to_solve": (None if math.isinf(m := statistics.median(steps)) else m),
                "steps_to_solve": [r["steps_to_solve"] for r in chosen], "censored_at": budget,
                "gradient_ratio_at_init": statistics.median(init_ratios),
                "below_float32_floor_at_init": sum(r["history"][0]["below_float32_floor"] for r in chosen)}
    return summary


def summarise_exploding(runs: list[dict]) -> dict:
    summary = {}
    for gain in sorted({r["gain"] for r in runs}):
        for clip in (None, 1.0):
            chosen = [r for r in runs if r["gain"] == gain and r["clip"] == clip]
            norms = sorted(n for r in chosen for n in r["grad_norms"] if math.isfinite(n))
            summary[f"gain {gain}, {'clip 1' if clip else 'no clipping'}"] = {
                "runs": len(chosen), "diverged": sum(r["diverged"] for r in chosen),
                "solved": sum(r["accuracy"] >= 0.98 for r in chosen),
                "grad_norm_percentiles": {str(q): round(norms[min(len(norms) - 1, int(q / 100 * len(norms)))], 4)
                                          for q in (50, 90, 99, 100)},
                "non_finite_steps": sum(not math.isfinite(n) for r in chosen for n in r["grad_norms"])}
    return summary


def charlm_windows(text_path: Path, windows, updates: int, hidden: int, batch: int) -> tuple[dict, dict]:
    """The character model trained for the same number of updates at each window length: a
    longer window sees more characters per update and keeps more for backward."""
    from seq2seq.inference import score_text
    from seq2seq.models.charlm import CharLM
    from seq2seq.models.rnn import detach
    from seq2seq.tokenizer import CharVocab

    if not text_path.is_file():
        raise UserError(f"{text_path}: not found (the truncated-BPTT part reads Tiny Shakespeare; pass --text)")
    text = text_path.read_text(encoding="utf-8")
    vocab = CharVocab.build(text)
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    train, valid = ids[:-50_000], ids[-50_000:]
    curves, summary = {}, {}
    for window in windows:
        torch.manual_seed(0)
        model = CharLM(small_charlm_config(hidden=hidden), len(vocab))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        stream_len = min(len(train) // batch, updates * window + 1)
        x_all = train[: stream_len * batch].view(batch, stream_len)
        hidden_state, losses, memory, started = None, [], 0, time.perf_counter()
        for update in range(updates):
            start = update * window % (stream_len - window - 1)
            x, y = x_all[:, start : start + window], x_all[:, start + 1 : start + window + 1]

            def forward(model=model, x=x, y=y, hidden_state=hidden_state):
                logits, new_hidden = model(x, hidden_state)
                return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()), new_hidden

            (loss, hidden_state), saved = saved_activation_bytes(forward, model)
            memory, hidden_state = max(memory, saved), detach(hidden_state)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
        curves[window] = losses
        summary[str(window)] = {"updates": updates, "chars_seen": updates * window * batch,
                                "saved_for_backward_mb": round(memory / 2**20, 2),
                                "valid_nats_per_char": round(score_text(model, valid)["nats_per_char"], 4),
                                "seconds": round(time.perf_counter() - started, 1)}
        print(f"window {window}: {summary[str(window)]}", file=sys.stderr)
    return curves, summary


def step_cost(length: int, hidden: int, emb: int = 64, batch: int = 16, repeats: int = 3) -> tuple[float, int]:
    """Median seconds of one forward and backward of a one-layer LSTM over `length` steps, and
    the bytes it keeps for backward."""
    torch.manual_seed(0)
    rnn = nn.LSTM(emb, hidden, batch_first=True)
    x = torch.randn(batch, length, emb)
    times, saved = [], 0
    for _ in range(repeats + 1):
        started = time.perf_counter()
        out, saved = saved_activation_bytes(lambda: rnn(x)[0], rnn)
        out.sum().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), saved


def complexity_fit(lengths, hiddens, repeats: int, emb: int = 64) -> dict:
    """Exponents of step time and saved memory in T (at H = 128) and in H (at T = 64), beside
    those the stated complexity predicts over the same points: T·H·(D+H) for time, T·H for
    memory (in H the time's exponent lies between 1 and 2, as H·(D+H) is)."""
    by_length = [step_cost(n, 128, emb, repeats=repeats) for n in lengths]
    by_hidden = [step_cost(64, h, emb, repeats=repeats) for h in hiddens]
    return {"emb": emb, "batch": 16, "lengths": list(lengths), "hiddens": list(hiddens),
            "seconds_by_length": [round(t, 5) for t, _ in by_length], "bytes_by_length": [b for _, b in by_length],
            "seconds_by_hidden": [round(t, 5) for t, _ in by_hidden], "bytes_by_hidden": [b for _, b in by_hidden],
            "fitted": {"time_in_T": round(fitted_exponent(lengths, [t for t, _ in by_length]), 3),
                       "memory_in_T": round(fitted_exponent(lengths, [b for _, b in by_length]), 3),
                       "time_in_H": round(fitted_exponent(hiddens, [t for t, _ in by_hidden]), 3),
                       "memory_in_H": round(fitted_exponent(hiddens, [b for _, b in by_hidden]), 3)},
            "predicted": {"time_in_T": 1.0, "memory_in_T": 1.0, "memory_in_H": 1.0,
                          "time_in_H": round(fitted_exponent(hiddens, [h * (emb + h) for h in hiddens]), 3)}}


def calibrate(args) -> dict:
    """The learning rate with the most solved runs over the short lengths, ties to the fewer
    steps (unsolved runs counted at the budget)."""
    grid = []
    for lr in CALIBRATION["lrs"]:
        training = Training(lr=lr, budget=CALIBRATION["budget"])
        runs = in_parallel(_recall_job, recall_jobs(CALIBRATION["lengths"], CALIBRATION["variants"],
                                                     CALIBRATION["seeds"], training), args.workers, f"lr {lr}")
        grid.append({"lr": lr, "solved": sum(r["solved"] for r in runs), "runs": len(runs),
                     "mean_steps": round(statistics.mean(r["steps"] for r in runs), 1),
                     "solved_by_variant": {v: sum(r["solved"] for r in runs if r["variant"] == v)
                                           for v in CALIBRATION["variants"]}})
        print(grid[-1], file=sys.stderr)
    best = max(grid, key=lambda g: (g["solved"], -g["mean_steps"]))
    return {"grid": grid, "chosen_lr": best["lr"], **{k: v for k, v in CALIBRATION.items() if k != "lrs"}}


def machine() -> dict:
    from seq2seq.device import describe

    return {"cpu": describe()["cpu"], "cores": multiprocessing.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def run(args) -> dict:
    mode = MODES["quick" if args.quick else "full"]
    seeds = range(args.first_seed, args.first_seed + (args.seeds or mode["seeds"]))
    training = Training(budget=mode["budget"])
    started = time.perf_counter()
    # the timings first, while nothing else runs
    bptt_fit = complexity_fit(mode["bptt"]["fit_lengths"], mode["bptt"]["fit_hiddens"], mode["bptt"]["repeats"])
    window_curves, windows = charlm_windows(args.text, mode["bptt"]["windows"], mode["bptt"]["updates"],
                                            mode["bptt"]["hidden"], mode["bptt"]["batch"])
    runs = in_parallel(_recall_job, recall_jobs(mode["lengths"], mode["variants"], seeds, training),
                       args.workers, "recall")
    explode = mode["exploding"]
    explode_runs = in_parallel(_exploding_job, [(s, g, c, explode["steps"]) for g in explode["gains"]
                                                for c in (None, 1.0) for s in seeds[: explode["seeds"]]],
                               args.workers, "exploding")
    summary = {
        "mode": "quick" if args.quick else "full", "machine": machine(), "seeds": list(seeds),
        "training": dataclasses.asdict(training), "lengths": list(mode["lengths"]),
        "variants": {v: dataclasses.asdict(VARIANTS[v]) for v in mode["variants"]},
        "claims": claims(runs), "recall": summarise_recall(runs, mode["lengths"], mode["variants"], training.budget),
        "exploding": {"length": 20, "optimizer": "SGD lr 0.1", "steps": explode["steps"],
                      **summarise_exploding(explode_runs)},
        "truncated_bptt": {"windows": windows, "hidden": mode["bptt"]["hidden"], "batch": mode["bptt"]["batch"],
                           "complexity": bptt_fit},
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "runs.json").write_text(json.dumps(runs) + "\n", encoding="utf-8")
    plots.recall_accuracy(runs, mode["lengths"], mode["variants"], args.output / "accuracy.png")
    plots.recall_training(runs, max(n for n in mode["lengths"] if n <= 100), mode["variants"], args.output / "training.png")
    plots.gradient_ratio(runs, mode["lengths"], mode["variants"], args.output / "gradient_ratio.png")
    plots.exploding(explode_runs, args.output / "exploding.png")
    plots.truncated_bptt(window_curves, windows, bptt_fit, args.output / "truncated_bptt.png")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path("reports/gradient_flow"))
    p.add_argument("--quick", action="store_true", help="3 lengths, 5 cells, 5 seeds: under 5 minutes on 2 cores")
    p.add_argument("--calibrate", action="store_true", help="run the learning-rate grid and write calibration.json")
    p.add_argument("--seeds", type=int, default=0, help="seeds per cell and length (default 5 quick, 10 full)")
    p.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed, first-seed + 1, ...")
    p.add_argument("--workers", type=int, default=max(1, min(multiprocessing.cpu_count(), 8)),
                   help="single-threaded worker processes (default: one per core)")
    p.add_argument("--text", type=Path, default=default_data_dir() / "tinyshakespeare" / "input.txt",
                   help="text for the truncated-BPTT part (default $SEQ2SEQ_DATA/tinyshakespeare/input.txt)")
    args = p.parse_args(argv)
    one_thread()
    try:
        plots.require_matplotlib()
        if not args.calibrate and not args.text.is_file():  # said now, not after the other parts have run
            raise UserError(f"{args.text}: not found (the truncated-BPTT part reads Tiny Shakespeare: set "
                            "SEQ2SEQ_DATA to the folder holding tinyshakespeare/, or pass --text)")
        if args.calibrate:
            result, name = calibrate(args), "calibration.json"
        else:
            result, name = run(args), "summary.json"
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / name).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except UserError as e:
        print(f"gradient_flow: error: {e}", file=sys.stderr)
        return 2
    for claim in result.get("claims", []):
        print(f"{claim['id']} {'PASS' if claim['pass'] else 'FAIL'}: {claim['claim']}", file=sys.stderr)
    print(json.dumps({"output": str(args.output / name), "seconds": result.get("seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
