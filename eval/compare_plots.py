"""The comparison's figures: curves of every arm overlaid against tokens seen, and the benchmark bars.

One colour per arm; with several seeds the line is their mean and the shaded band their range (three seeds make a
poor standard deviation but an honest range). The training loss is smoothed (eval/dynamics.py), its raw values
drawn faintly behind; the held-out loss is drawn as logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training boxes
import matplotlib.pyplot as plt
from matplotlib.ticker import EngFormatter

from eval import benchmarks as bench
from eval.dynamics import HELDOUT_BITS_PER_BYTE, TRAINING_LOSS, read_curve, seed_band, smoothed
from eval.plots import plot_benchmarks
from eval.stats import Estimate

if TYPE_CHECKING:
    from eval.compare_runs import RunRecord

TRAINING_PLOT = "training_loss.png"
HELDOUT_PLOT = "heldout_loss.png"
BENCHMARK_PLOT = "benchmarks.png"


def plot_curves(arms: dict[str, list[RunRecord]], key: str, smooth: bool, path: Path, ylabel: str,
                title: str) -> list[str]:
    """One line (and seed band) per arm that logged `key`; returns the arms drawn, writing nothing if none."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = []
    for index, (arm, runs) in enumerate(arms.items()):
        raw = [c for c in (read_curve(run.history, key) for run in runs) if c is not None]
        if not raw:
            continue
        color = f"C{index}"
        if smooth:
            for curve in raw:
                ax.plot(curve.tokens, curve.values, color=color, alpha=0.2, linewidth=0.8)
        band = seed_band([smoothed(c) for c in raw] if smooth else raw)
        label = arm if len(raw) == 1 else f"{arm} (mean of {len(raw)} seeds; band: their range)"
        ax.plot(band.tokens, band.mean, color=color, label=label, linewidth=2,
                marker="o" if not smooth and len(band.tokens) < 30 else None)
        if len(raw) > 1:
            ax.fill_between(band.tokens, band.low, band.high, color=color, alpha=0.2, linewidth=0)
        drawn.append(arm)
    if drawn:
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_plots(folder: Path, arms: dict[str, list[RunRecord]], comparison: dict[str, Any]) -> dict[str, list[str]]:
    """Every figure there is data for: {file name: the arms or rows drawn in it}."""
    plots = {}
    drawn = plot_curves(arms, TRAINING_LOSS, True, folder / TRAINING_PLOT, "training loss (nats/token), smoothed",
                        "Training loss at equal tokens (faint: as logged)")
    if drawn:
        plots[TRAINING_PLOT] = drawn
    drawn = plot_curves(arms, HELDOUT_BITS_PER_BYTE, False, folder / HELDOUT_PLOT, "held-out bits per byte",
                        "Held-out loss during training, at equal tokens")
    if drawn:
        plots[HELDOUT_PLOT] = drawn
    section = comparison["benchmarks"]
    if section is not None:
        estimates = {row["label"]: {name: Estimate(**row["scores"][name]) for name in bench.BENCHMARKS
                                    if row["scores"].get(name)} for row in section["rows"] if row["scores"]}
        columns = {name: b.column for name, b in bench.BENCHMARKS.items()}
        if estimates and plot_benchmarks(estimates, columns, folder / BENCHMARK_PLOT):
            plots[BENCHMARK_PLOT] = list(estimates)
    return plots
