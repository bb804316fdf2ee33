"""Figures: training curves from metrics.jsonl, attention maps, the gradient-flow report.

matplotlib is an optional extra (`pip install -e ".[plot]"`), drawn headless (Agg).
"""
from __future__ import annotations

import json
from pathlib import Path

from seq2seq.errors import UserError


def require_matplotlib():
    """pyplot on the Agg backend, or a one-line hint where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise UserError('plots need matplotlib: pip install -e ".[plot]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    from seq2seq.files import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    import matplotlib.pyplot as plt
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    if not path.is_file():
        raise UserError(f"{path}: not found (is {run_dir} a training run's folder?)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: invalid JSON: {e.msg}") from None
    if not any(r.get("type") in ("train", "eval") for r in records):
        raise UserError(f"{path}: no train or eval records to plot")
    return records


def training_curves(run_dir: Path, out: Path) -> None:
    """Four panels against steps: train and dev loss, the dev score (BLEU, bits per character, or a
    pretrained encoder's perplexity), learning rate, gradient norm;
    for a classifier, two against epochs: accuracy and loss, training and validation."""
    plt = require_matplotlib()
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if any("dev_accuracy" in r for r in evals):
        return classifier_curves(evals, run_dir, out)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (smoothed CE)")
    for key in ("dev_loss", "valid_nats_per_char"):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax.plot(*zip(*points), "o-", label=key.replace("_", " "))
    ax.set_title("loss (nats)")
    ax.legend()
    ax = axes[0][1]
    for key in ("dev_bleu", "valid_bits_per_char", "dev_ppl"):  # the first the run has (a translator: BLEU)
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax.plot(*zip(*points), "o-", color="tab:green")
            ax.set_title(key.replace("_", " "))
            break
    for ax, key, title in ((axes[1][0], "lr", "learning rate"), (axes[1][1], "grad_norm", "gradient norm (pre-clip)")):
        ax.plot([r["step"] for r in train], [r[key] for r in train])
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1][1].set_yscale("log")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    _save(fig, out)


def classifier_curves(evals: list[dict], run_dir: Path, out: Path) -> None:
    """Accuracy and loss at each evaluation (once an epoch by default), on the training set (a
    fixed sample of 2,000, in eval mode) and the validation set."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in evals]
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in evals], "o-", label="training")
        ax.plot(epochs, [r[f"dev_{metric}"] for r in evals], "o-", label="validation", color="tab:green")
        ax.set_title(f"model {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric + (" (nats an example)" if metric == "loss" else ""))
        ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    _save(fig, out)


def attention(weights, source: list[str], target: list[str], out: Path) -> None:
    """A heat map of weights (target x source) with the subwords on the axes."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(source) + 2), max(3, 0.4 * len(target) + 1.5)))
    ax.imshow(weights, cmap="Greys", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(source)), source, rotation=60, ha="right")
    ax.set_yticks(range(len(target)), target)
    ax.set_xlabel("source")
    ax.set_ylabel("translation")
    fig.tight_layout()
    _save(fig, out)


COLOURS = {"rnn": "tab:red", "rnn-orthogonal": "tab:pink", "lstm": "tab:blue", "lstm-forget1": "tab:cyan",
           "lstm-chrono": "tab:green", "gru": "tab:orange", "gru-chrono": "tab:brown"}


def recall_accuracy(runs: list[dict], lengths, variants, out: Path) -> None:
    """Held-out accuracy against T: a dot per seed, the mean and its 95% interval per cell."""
    from seq2seq.gradient_flow import SYMBOLS, mean_interval

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        for i, length in enumerate(lengths):
            values = [r["accuracy"] for r in runs if r["variant"] == variant and r["length"] == length]
            x = i - 0.4 + (k + 0.5) * width
            ax.scatter([x] * len(values), values, s=12, color=COLOURS[variant], alpha=0.5)
            mean, low, high = mean_interval(values)
            ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="_", ms=12, capsize=3,
                        color=COLOURS[variant], label=variant if i == 0 else None)
    ax.axhline(1 / SYMBOLS, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xticks(range(len(lengths)), [f"T = {n}" for n in lengths])
    ax.set_ylabel("held-out recall accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title("Recall over a delay: a dot per seed, mean and 95% interval", fontsize=10)
    fig.tight_layout()
    _save(fig, out)


def recall_training(runs: list[dict], length: int, variants, out: Path) -> None:
    """At one length, over training steps, a line per seed: held-out accuracy, the gradient
    ratio, the RNN's spectral radius and the gated cells' mean keep gate."""
    from seq2seq.gradient_flow import FLOAT32_FLOOR

    plt = require_matplotlib()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (acc, ratio), (radius, keep) = axes
    first_seed = min(r["seed"] for r in runs)
    for run in (r for r in runs if r["length"] == length and r["variant"] in variants):
        steps, colour = [h["step"] for h in run["history"]], COLOURS[run["variant"]]
        acc.plot(steps, [h["accuracy"] for h in run["history"]], color=colour, lw=0.8,
                 label=run["variant"] if run["seed"] == first_seed else None)
        ratio.semilogy(steps, [max(h["ratio"], 1e-300) for h in run["history"]], color=colour, lw=0.8)
        if "spectral_radius" in run["history"][0]:
            radius.plot(steps, [h["spectral_radius"] for h in run["history"]], color=colour, lw=0.8)
        if run["history"][0]["keep_gate"] is not None:
            keep.plot(steps, [h["keep_gate"] for h in run["history"]], color=colour, lw=0.8)
    ratio.axhline(FLOAT32_FLOOR, color="grey", lw=0.8, ls=":", label="float32's floor (2^-24)")
    for ax, label in ((acc, "held-out accuracy"), (ratio, "||dL/de_1|| / ||dL/de_T||, median"),
                      (radius, "spectral radius of W_hh (RNN)"), (keep, "mean keep gate (LSTM f, GRU z)")):
        ax.set_ylabel(label)
        ax.set_xlabel("training step")
    acc.legend(fontsize=8)
    ratio.legend(fontsize=8)
    fig.suptitle(f"T = {length}, a line per seed", fontsize=10)
    fig.tight_layout()
    _save(fig, out)


def gradient_ratio(runs: list[dict], lengths, variants, out: Path) -> None:
    """The gradient ratio against T, at initialisation and at the end of training (median over
    seeds), with float32's floor."""
    from seq2seq.gradient_flow import FLOAT32_FLOOR

    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (title, index) in zip(axes, (("at initialisation", 0), ("at the end of training", -1))):
        for variant in variants:
            medians = []
            for length in lengths:
                ratios = sorted(r["history"][index]["ratio"] for r in runs
                                if r["variant"] == variant and r["length"] == length)
                medians.append(max(ratios[len(ratios) // 2], 1e-300))
            ax.semilogy(range(len(lengths)), medians, "o-", color=COLOURS[variant], label=variant)
        ax.axhline(FLOAT32_FLOOR, color="grey", lw=0.8, ls=":", label="float32's floor")
        ax.set_xticks(range(len(lengths)), [f"T = {n}" for n in lengths])
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("||dL/de_1|| / ||dL/de_T||, median over seeds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def exploding(runs: list[dict], out: Path) -> None:
    """Pre-clip gradient norms of every step of every seed, per recurrent gain, with and without
    clipping."""
    import math

    plt = require_matplotlib()
    gains = sorted({r["gain"] for r in runs})
    fig, axes = plt.subplots(1, len(gains), figsize=(4.5 * len(gains), 4), sharey=True)
    for ax, gain in zip(axes, gains):
        data, labels = [], []
        for clip in (None, 1.0):
            chosen = [r for r in runs if r["gain"] == gain and r["clip"] == clip]
            data.append([math.log10(max(n, 1e-12)) for r in chosen for n in r["grad_norms"] if math.isfinite(n)])
            labels.append(f"{'clip 1' if clip else 'no clip'}\n{sum(r['diverged'] for r in chosen)}/{len(chosen)} diverged")
        ax.violinplot(data, showmedians=True)
        ax.set_xticks([1, 2], labels)
        ax.set_title(f"recurrent gain {gain}", fontsize=10)
    axes[0].set_ylabel("log10 pre-clip gradient norm, all steps")
    fig.suptitle("tanh RNN, SGD: gradient norms over training, all seeds", fontsize=10)
    fig.tight_layout()
    _save(fig, out)


def truncated_bptt(curves: dict, windows: dict, fit: dict, out: Path) -> None:
    """Left: training loss per update at each window. Right: step time and saved memory against
    T and H on log-log axes, with the fitted exponents."""
    plt = require_matplotlib()
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for window, losses in curves.items():
        s = windows[str(window)]
        axes[0].plot(range(1, len(losses) + 1), losses, lw=0.8,
                     label=f"window {window}: {s['saved_for_backward_mb']} MB, valid {s['valid_nats_per_char']}")
    axes[0].set_xlabel("update")
    axes[0].set_ylabel("training loss (nats/char)")
    axes[0].legend(fontsize=8)
    for ax, axis, name in ((axes[1], "length", "T"), (axes[2], "hidden", "H")):
        sizes = fit[f"{axis}s"]
        ax.loglog(sizes, fit[f"seconds_by_{axis}"], "o-", label=f"step time, exponent {fit['fitted'][f'time_in_{name}']}")
        twin = ax.twinx()
        twin.loglog(sizes, [b / 2**20 for b in fit[f"bytes_by_{axis}"]], "s--", color="tab:orange",
                    label=f"saved memory, exponent {fit['fitted'][f'memory_in_{name}']}")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(name)
        ax.set_ylabel("seconds per forward + backward")
        twin.set_ylabel("MiB kept for backward")
        ax.legend(fontsize=8, loc="upper left")
        twin.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, out)
