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
    """Four panels against steps: train and dev loss, the dev score, learning rate, gradient norm."""
    plt = require_matplotlib()
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
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
    for key in ("dev_bleu", "valid_bits_per_char"):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax.plot(*zip(*points), "o-", color="tab:green")
            ax.set_title(key.replace("_", " "))
    for ax, key, title in ((axes[1][0], "lr", "learning rate"), (axes[1][1], "grad_norm", "gradient norm (pre-clip)")):
        ax.plot([r["step"] for r in train], [r[key] for r in train])
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1][1].set_yscale("log")
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


def gradient_norms(curves: dict, lengths, labels, out: Path) -> None:
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), sharey=True)
    colors = dict(zip(labels, ("tab:red", "tab:blue", "tab:green", "tab:olive", "tab:purple")))
    for ax, length in zip(axes, lengths):
        for label in labels:
            for phase, style in (("init", ":"), ("trained", "-")):
                norms = curves[(length, label, phase)]
                ax.semilogy(range(1, len(norms) + 1), norms, style, color=colors[label],
                            label=f"{label}, {'at init' if phase == 'init' else 'trained'}")
        ax.set_title(f"T = {length}")
        ax.set_xlabel("step t")
    axes[0].set_ylabel("||dL/dh_t||")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Gradient reaching each hidden state (loss at the last step)")
    fig.tight_layout()
    _save(fig, out)


def recall_accuracy(summary: dict, lengths, out: Path) -> None:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for label, per_length in summary.items():
        ax.plot(lengths, [per_length[str(n)]["accuracy"] for n in lengths], "o-", label=label)
    ax.axhline(1 / 8, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("T (steps between the symbol and the question)")
    ax.set_ylabel("recall accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def exploding(runs: dict, summary: dict, out: Path) -> None:
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, run in runs.items():
        axes[0].semilogy(run["grad_norms"], label=label, lw=0.8)
        axes[1].plot(run["losses"], label=label, lw=0.8)
    axes[0].set_title(f"pre-clip gradient norm: tanh RNN, recurrent gain {summary['recurrent_gain']}, "
                      f"{summary['optimizer']}", fontsize=9)
    axes[1].set_title("training loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    _save(fig, out)


def truncated_bptt(runs: dict, summary: dict, out: Path) -> None:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for window, run in runs.items():
        s = summary[str(window)]
        ax.plot(run["chars"], run["losses"], lw=0.8,
                label=f"bptt {window}: {s['saved_activation_mb']} MB saved/step, valid {s['valid_nats_per_char']} nats/char")
    ax.set_xlabel("training characters")
    ax.set_ylabel("train loss (nats/char)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
