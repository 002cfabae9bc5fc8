"""report.md of a comparison, rendered from its report.json payload only, so the two never disagree."""

from __future__ import annotations

from typing import Any

from eval import benchmarks as bench
from eval.compare_plots import BENCHMARK_PLOT, HELDOUT_PLOT, TRAINING_PLOT


def _percent(estimate: dict | None, signed: bool = False, unit: str = "") -> str:
    """`score ± se (n)` in points; n counts items, or seeds for a row over seeds (`unit`)."""
    if estimate is None:
        return "—"
    value = f"{100 * estimate['value']:+.1f}" if signed else f"{100 * estimate['value']:.1f}"
    error = f" ± {100 * estimate['stderr']:.1f}" if estimate["stderr"] is not None else ""
    return f"{value}{error} ({estimate['n']}{unit})"


def _bits(estimate: dict | None) -> str:
    """A loss difference `Δ ± se (n)`, n counting documents, steps or seeds (the error bar column says which)."""
    if estimate is None:
        return "—"
    error = f" ± {estimate['stderr']:.4f}" if estimate["stderr"] is not None else ""
    return f"{estimate['value']:+.4f}{error} ({estimate['n']})"


def _tokens(value: float | None) -> str:
    if value is None:
        return "—"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.0f}"


def _runs_lines(comparison: dict[str, Any]) -> list[str]:
    lines = ["| run | arm | seed | kind | models | tokens trained | data slice |", "|---|---|---|---|---|---|---|"]
    for run in comparison["runs"]:
        kind = "control (trains the base itself)" if run["control"] else "trains a widened model"
        lines.append(f"| {run['name']} | {run['arm']} | {run['seed']} | {kind} | {', '.join(run['models'])} | "
                     f"{_tokens(run['tokens_seen'])} | `{run['data_slice']}` |")
    return lines


def _benchmark_lines(section: dict[str, Any], reference: str) -> list[str]:
    names = list(bench.BENCHMARKS)
    settings = section["settings"]
    headers = ["model", "Average", *(f"{settings[n]['column']} ({settings[n]['num_fewshot']}-shot)" for n in names)]
    lines = [
        f"Old Open LLM Leaderboard settings on the same item subsets for every run (data: {section['source']}; subset "
        f"seed {section['subset_seed']}; items: " + ", ".join(f"{k} {v}" for k, v in section["items"].items()) + "). "
        "Scores in %, ± one standard error (n items). Δ rows: the trained model minus the reference's "
        f"(**{reference}**) trained model, paired item by item (seed by seed); a row over seeds has the mean of "
        "those differences and its standard error over the seeds.",
        "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
    ]
    for row in section["rows"]:
        scores = row["scores"]
        if scores is None:
            lines.append(f"| {row['label']} | not run: {row['not_run'] or 'no scores'} |" + " |" * len(names))
            continue
        cells = [_percent(scores.get("average")), *(_percent(scores.get(n)) for n in names)]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    for row in section["deltas"]:
        scores = row["scores"]
        if scores is None:
            lines.append(f"| {row['label']} | not available: {row['not_run']} |" + " |" * len(names))
            continue
        unit = " seeds" if row["over"] == "seeds" else ""
        cells = [_percent(scores.get(n), signed=True, unit=unit) for n in ["average", *names]]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return lines


def _heldout_lines(heldout: dict[str, Any], reference: str) -> list[str]:
    lines = ["Eval's held-out perplexity on the documents the train stage kept out of training (the same documents "
             "for every run: same data slice).", "",
             "| run | model | tokens trained | bits per byte | token perplexity | documents |",
             "|---|---|---|---|---|---|"]
    for row in heldout["models"]:
        if "bits_per_byte" not in row:
            lines.append(f"| {row['run']} | {row['model']} | {_tokens(row['tokens_seen'])} | skipped: "
                         f"{row.get('skipped')} | | |")
            continue
        lines.append(f"| {row['run']} | {row['model']} | {_tokens(row['tokens_seen'])} | {row['bits_per_byte']:.4f} | "
                     f"{row['token_perplexity']:.2f} | {row['documents']} |")
    lines += ["", "### Trains faster?", "",
              f"Held-out bits per byte of each trained model minus the reference's (**{reference}**) at the end of "
              "training (negative: lower loss than the reference), ± one standard error.", "",
              "| arm | run | vs | tokens | Δ bits per byte | error bar |", "|---|---|---|---|---|---|"]
    for row in heldout["final"]:
        tokens = _tokens(row["tokens"])
        if row["tokens"] != row["reference_tokens"]:
            tokens += f" vs {_tokens(row['reference_tokens'])} (not equal!)"
        lines.append(f"| {row['arm']} | {row['run']} | {row['reference_run']} | {tokens} | {_bits(row['delta'])} | "
                     f"{row['over']} |")
    if not heldout["final"]:
        lines.append("| (no run besides the reference) | | | | | |")
    training = heldout["training_loss"]
    if training["rows"]:
        held_out = ("in this first pass every block is new to the model, so with equal seeds this is a held-out "
                    "comparison on the very same blocks" if training["first_pass"] else
                    "past one pass over the data, so the later blocks had been trained on: not a held-out comparison")
        lines += ["", f"Training loss minus the reference's, step by step, averaged over each quarter of training "
                      f"({held_out}); ± one standard error over the steps, or over seeds:", "",
                  "| arm | run | vs | tokens | Δ loss (nats/token) | error bar over |", "|---|---|---|---|---|---|"]
        for row in training["rows"]:
            lines.append(f"| {row['arm']} | {row['run']} | {row['reference_run']} | {_tokens(row['from_tokens'])}-"
                         f"{_tokens(row['to_tokens'])} | {_bits(row['delta'])} | {row['over']} |")
    if heldout["matched"]:
        lines += ["", "In-training held-out loss at the reference's logged token counts (Δ bits per byte):", "",
                  "| arm | tokens | Δ bits per byte | error bar |", "|---|---|---|---|"]
        for row in heldout["matched"]:
            lines.append(f"| {row['arm']} | {_tokens(row['tokens'])} | {_bits(row['delta'])} | {row['over']} |")
    for key, what in (("reach_heldout", "held-out bits per byte (in-training curve)"),
                      ("reach_training_loss", "training loss (smoothed)")):
        section = heldout[key]
        if section is None:
            continue
        lines += ["", f"Tokens each run needs to reach the reference's final {what} of {section['target']:.4f}:", "",
                  "| arm | run | tokens to reach | tokens trained |", "|---|---|---|---|"]
        for row in section["runs"]:
            reached = _tokens(row["tokens"]) if row["tokens"] is not None else "not reached"
            lines.append(f"| {row['arm']} | {row['run']} | {reached} | {_tokens(row['trained_tokens'])} |")
        for arm, estimate in section["arms"].items():
            if estimate["n"] > 1:
                error = f" ± {_tokens(estimate['stderr'])}" if estimate["stderr"] is not None else ""
                lines.append(f"| {arm} | mean of {estimate['n']} seeds | {_tokens(estimate['value'])}{error} | |")
    return lines


def _checks_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | model | verdict | one-token loops | any loop | empty | KL(base ‖ model) | top-1 vs base | "
             "bits per byte |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rates = row["rates"]
        kl = f"{row['mean_kl']:.3g}" if row["mean_kl"] is not None else "—"
        top1 = f"{row['top1_agreement']:.1%}" if row["top1_agreement"] is not None else "—"
        bits = f"{row['bits_per_byte']:.4f}" if row["bits_per_byte"] is not None else "—"
        lines.append(f"| {row['run']} | {row['model']} | **{row['verdict']}** | {rates['single_token_loop']:.0%} | "
                     f"{rates['any_loop']:.0%} | {rates['empty']:.0%} | {kl} | {top1} | {bits} |")
    return lines


def render_markdown(comparison: dict[str, Any]) -> str:
    reference = comparison["reference"]
    lines = ["# frankenllama comparison", "",
             f"Reference: **{reference}** (runs {', '.join(comparison['arms'][reference])}). Every Δ below is a "
             "difference to it on identical items, documents or token counts.", "", *_runs_lines(comparison)]
    for note in comparison["notes"]:
        lines += ["", f"Note: {note}."]
    lines += ["", "## Benchmarks", ""]
    section = comparison["benchmarks"]
    lines += _benchmark_lines(section, reference) if section is not None else ["Not run (eval.benchmarks.enabled)."]
    if BENCHMARK_PLOT in comparison["plots"]:
        lines += ["", f"![benchmark scores]({BENCHMARK_PLOT})"]
    lines += ["", "## Held-out loss at equal tokens", "", *_heldout_lines(comparison["heldout"], reference)]
    for plot, title in ((TRAINING_PLOT, "training loss"), (HELDOUT_PLOT, "held-out loss during training")):
        if plot in comparison["plots"]:
            lines += ["", f"![{title}]({plot})"]
    lines += ["", "## Degeneration and preservation", "",
              "Probe verdicts (each run's models against its own base) and logit agreement with the base on held-out "
              "text.", "", *_checks_lines(comparison["checks"])]
    return "\n".join(lines).rstrip() + "\n"
