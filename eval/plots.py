"""PNG figures for the report: the training loss curve and benchmark scores with their error bars."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training boxes
import matplotlib.pyplot as plt

from eval.stats import Estimate


def plot_training_loss(log_history: list[dict], path: Path) -> bool:
    """Loss (and the held-out loss the train stage logs every train.eval_steps) against step, from log_history.json.

    Returns False, writing nothing, when the history holds no loss entries.
    """
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    held_out = [(e["step"], e["heldout_loss"]) for e in log_history if "heldout_loss" in e and "step" in e]
    if not train and not held_out:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", marker="." if len(train) < 30 else None)
    if held_out:
        ax.plot(*zip(*held_out, strict=True), label="held-out loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_benchmarks(scores: Mapping[str, Mapping[str, Estimate]], columns: Mapping[str, str], path: Path) -> bool:
    """Grouped bars: one group per benchmark column, one bar per model, error bars of one standard error.

    `scores` maps model label -> benchmark name -> Estimate; `columns` maps benchmark name -> column title.
    """
    models = [label for label, per_model in scores.items() if per_model]
    names = [name for name in columns if any(name in scores[label] for label in models)]
    if not models or not names:
        return False
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
    for i, label in enumerate(models):
        xs, values, errors = [], [], []
        for j, name in enumerate(names):
            estimate = scores[label].get(name)
            if estimate is None:
                continue
            xs.append(j + (i - (len(models) - 1) / 2) * width)
            values.append(100 * estimate.value)
            errors.append(100 * (estimate.stderr or 0.0))
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(names)), [columns[name] for name in names])
    ax.set_ylabel("score (%), error bar = 1 standard error")
    ax.set_ylim(0, 100)
    ax.set_title("Benchmarks (subsets; n per cell in report.md)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
