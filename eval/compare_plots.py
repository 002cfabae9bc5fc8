"""The comparison's figures: curves of every arm overlaid against tokens seen, and the benchmark bars.

One colour per arm; with several seeds the line is their mean and the shaded band their range (three seeds make a
poor standard deviation but an honest range). The training loss is smoothed (eval/dynamics.py), its raw values
drawn faintly behind; the held-out loss is drawn as logged. Below each set of curves, each arm's difference to the
reference seed by seed: runs with the same seed see the same blocks, so their raw losses rise and fall together
and the difference is what shows which trains faster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training boxes
import matplotlib.pyplot as plt
from matplotlib.ticker import EngFormatter

from eval import benchmarks as bench
from eval.compare_runs import RunRecord, compared_arms
from eval.dynamics import (
    HELDOUT_BITS_PER_BYTE,
    TRAINING_LOSS,
    Curve,
    history_difference,
    read_curve,
    seed_band,
    smoothed,
)
from eval.plots import plot_benchmarks
from eval.stats import Estimate

TRAINING_PLOT = "training_loss.png"
HELDOUT_PLOT = "heldout_loss.png"
BENCHMARK_PLOT = "benchmarks.png"


def _draw_band(ax, curves: list[Curve], color: str, label: str, markers: bool) -> None:
    band = seed_band(curves)
    if len(curves) > 1:
        label = f"{label} (mean of {len(curves)} seeds; band: their range)"
        ax.fill_between(band.tokens, band.low, band.high, color=color, alpha=0.2, linewidth=0)
    ax.plot(band.tokens, band.mean, color=color, label=label, linewidth=2,
            marker="o" if markers and len(band.tokens) < 30 else None)


def plot_curves(arms: dict[str, list[RunRecord]], reference: str, key: str, smooth: bool, path: Path, ylabel: str,
                title: str) -> list[str]:
    """Two panels against tokens seen: every arm's curve (and seed band), and below it each arm's difference to the
    reference arm, seed by seed (the same seed draws the same blocks). Returns the arms drawn in the upper panel,
    writing nothing if none logged `key`."""
    fig, (ax, delta_ax) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 2))
    drawn = []
    pairs = dict(compared_arms(arms, reference))
    for index, (arm, runs) in enumerate(arms.items()):
        raw = [c for c in (read_curve(run.history, key) for run in runs) if c is not None]
        if not raw:
            continue
        color = f"C{index}"
        if smooth:
            for curve in raw:
                ax.plot(curve.tokens, curve.values, color=color, alpha=0.2, linewidth=0.8)
        _draw_band(ax, [smoothed(c) for c in raw] if smooth else raw, color, arm, not smooth)
        drawn.append(arm)
        deltas = []
        for run, ref in pairs.get(arm, []):
            delta = history_difference(run.history, ref.history, key)
            if delta is not None:
                deltas.append(smoothed(delta) if smooth else delta)
        if deltas:
            _draw_band(delta_ax, deltas, color, f"{arm} − {reference}", not smooth)
    if drawn:
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        delta_ax.axhline(0.0, color="black", linewidth=0.8)
        delta_ax.set_ylabel(f"minus {reference}, same seed")
        delta_ax.xaxis.set_major_formatter(EngFormatter())
        delta_ax.set_xlabel("tokens seen")
        for axis in (ax, delta_ax):
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_plots(folder: Path, arms: dict[str, list[RunRecord]], comparison: dict[str, Any]) -> dict[str, list[str]]:
    """Every figure there is data for: {file name: the arms or rows drawn in it}."""
    plots = {}
    reference = comparison["reference"]
    drawn = plot_curves(arms, reference, TRAINING_LOSS, True, folder / TRAINING_PLOT,
                        "training loss (nats/token), smoothed", "Training loss at equal tokens (faint: as logged)")
    if drawn:
        plots[TRAINING_PLOT] = drawn
    drawn = plot_curves(arms, reference, HELDOUT_BITS_PER_BYTE, False, folder / HELDOUT_PLOT,
                        "held-out bits per byte", "Held-out loss during training, at equal tokens")
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
