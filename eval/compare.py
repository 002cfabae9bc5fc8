"""`frankenllama compare`: several finished runs side by side, with every difference paired against a reference.

The question it answers is the 2023 post's: does the graft train faster than the base trained the same way, on the
same tokens, and is the difference more than luck? So every number is a difference to the reference arm (by default
the control run) on identical units: benchmark items (the 2023 table with Δ rows), held-out documents (bits per
byte at the end of training) and, where the runs logged it, the in-training held-out loss at equal tokens. With
several seeds per arm, runs are paired seed by seed (the same seed draws the same blocks in the same order) and the
error bar is the spread over seeds; with one seed it is the paired one over items or documents.

It lives with eval because it reads eval's report.json and must compute its Δ rows exactly as eval computes its own
(eval/benchmarks.py, eval/stats.py): one implementation of the statistics, not two.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from eval import benchmarks as bench
from eval.compare_runs import RunRecord, arms_of, check_comparable, choose_reference, compared_arms, resolve_inputs
from eval.dynamics import (
    HELDOUT_BITS_PER_BYTE,
    TRAINING_LOSS,
    Curve,
    history_difference,
    read_curve,
    smoothed,
    tokens_to_reach,
    value_at,
    window_differences,
)
from eval.stats import Estimate, combine_equal_weight, mean_estimate, paired_ratio_difference
from pipeline.config import WandbConfig, load_config
from pipeline.runs import atomic_output_dir, write_json_atomic
from pipeline.tracking import start_run

log = logging.getLogger("compare")

TRAINED = "trained"
MATCHED_POINTS = 8  # token counts shown in the matched-token table (the plot has them all)
TRAINING_WINDOWS = 4  # stretches of training the per-step training-loss difference is averaged over


def over_seeds(estimates: list[Estimate]) -> Estimate:
    """Several seeds' paired differences: their mean, with the standard error over seeds (n = seeds)."""
    return mean_estimate([e.value for e in estimates])


def _leaves(items: dict[str, list]) -> list[bench.LeafTask]:
    """The leaf tasks a report scored, from its items' keys (MMLU leaves are `mmlu_<subject>`)."""
    leaves = []
    for name in items:
        if name in bench.BENCHMARKS:
            leaves.append(bench.LeafTask(name, name, name, {}))
        elif name.startswith("mmlu_"):
            leaves.append(bench.LeafTask("mmlu", name, name.removeprefix("mmlu_"), {}))
    return leaves


def _with_average(estimates: dict[str, Estimate]) -> dict[str, Any]:
    complete = all(name in estimates for name in bench.BENCHMARKS)
    average = combine_equal_weight([estimates[n] for n in bench.BENCHMARKS]) if complete else None
    return {**{n: e.to_dict() for n, e in estimates.items()}, "average": average.to_dict() if average else None}


def benchmark_section(arms: dict[str, list[RunRecord]], reference: str) -> dict[str, Any] | None:
    """The 2023 table: one row per model of every run (the reference's base once), then Δ rows against the
    reference's trained model on the same items, per seed pair and, with several seeds, over seeds."""
    ref_run = arms[reference][0]
    section = ref_run.report.get("benchmarks")
    if section is None:
        return None
    leaves = _leaves(section["items"])
    rows, deltas = [], []

    def item_scores(run: RunRecord, label: str) -> dict | None:
        return run.report["benchmarks"]["item_scores"].get(label)

    def add_row(run: RunRecord, label: str, title: str) -> None:
        scores = item_scores(run, label)
        row: dict[str, Any] = {"label": title, "run": run.name, "model": label, "scores": None,
                               "not_run": run.report["benchmarks"]["not_run"].get(label)}
        if scores is not None:
            row["scores"] = _with_average(bench.benchmark_estimates(scores, leaves))
        rows.append(row)

    add_row(ref_run, ref_run.labels[0], "base")
    for runs in arms.values():
        for run in runs:
            for position, label in enumerate(run.labels):
                if position == 0 and run.base["ref"] == ref_run.base["ref"]:
                    continue  # the same base model as the reference's: shown once
                add_row(run, label, f"{run.name} {label}")
    for arm, pairs in compared_arms(arms, reference):
        per_pair = []
        for run, ref in pairs:
            scores, ref_scores = item_scores(run, TRAINED), item_scores(ref, TRAINED)
            entry: dict[str, Any] = {"label": f"Δ {run.name} − {ref.name}", "run": run.name, "reference_run": ref.name,
                                     "over": "items", "scores": None}
            if scores is None or ref_scores is None:
                missing = run if scores is None else ref
                entry["not_run"] = (f"{missing.name} has no trained benchmark scores "
                                    f"({missing.report['benchmarks']['not_run'].get(TRAINED, 'not evaluated')})")
            else:
                diffs = bench.paired_estimates(scores, ref_scores, leaves)
                entry["scores"] = _with_average(diffs)
                per_pair.append(diffs)
            deltas.append(entry)
        if len(per_pair) >= 2:
            names = [n for n in bench.BENCHMARKS if all(n in d for d in per_pair)]
            averaged = {n: over_seeds([d[n] for d in per_pair]) for n in names}
            averages = [combine_equal_weight([d[n] for n in bench.BENCHMARKS]).value for d in per_pair
                        if all(n in d for n in bench.BENCHMARKS)]
            scores = {n: e.to_dict() for n, e in averaged.items()}
            scores["average"] = mean_estimate(averages).to_dict() if len(averages) == len(per_pair) else None
            deltas.append({"label": f"Δ {arm} − {reference}, mean of {len(per_pair)} seeds", "run": arm,
                           "reference_run": reference, "over": "seeds", "scores": scores})
    return {
        "source": section["source"],
        "settings": section["settings"],
        "subset_seed": section["subset_seed"],
        "items": {leaf: len(indices) for leaf, indices in section["items"].items()},
        "rows": rows,
        "deltas": deltas,
    }


def _perplexity(run: RunRecord, label: str) -> dict | None:
    entry = run.report["perplexity"].get(label) or {}
    return entry if "bits_per_byte" in entry else None


def final_heldout_delta(run: RunRecord, ref: RunRecord) -> tuple[Estimate | None, str]:
    """The trained models' bits-per-byte difference on eval's held-out documents, paired over the documents when
    both reports carry per-document losses for the same documents."""
    mine, theirs = _perplexity(run, TRAINED), _perplexity(ref, TRAINED)
    if mine is None or theirs is None:
        return None, "no held-out perplexity for both trained models"
    byte_counts = mine.get("document_bytes")
    if byte_counts and byte_counts == theirs.get("document_bytes"):
        bits = [n / math.log(2) for n in mine["document_nll_nats"]]
        ref_bits = [n / math.log(2) for n in theirs["document_nll_nats"]]
        return paired_ratio_difference(bits, ref_bits, byte_counts), "paired over documents"
    return (Estimate(mine["bits_per_byte"] - theirs["bits_per_byte"], None, mine["documents"]),
            "no per-document losses for the same documents in both reports: no error bar")


def _curves(runs: list[RunRecord], key: str, smooth: bool) -> list[Curve]:
    curves = [read_curve(run.history, key) for run in runs]
    return [smoothed(c) if smooth else c for c in curves if c is not None]


def matched_heldout(arms: dict[str, list[RunRecord]], reference: str) -> list[dict[str, Any]]:
    """The in-training held-out loss at the reference's logged token counts: Δ per seed pair, over seeds."""
    rows = []
    ref_curves = {run.name: read_curve(run.history, HELDOUT_BITS_PER_BYTE) for run in arms[reference]}
    first = next((c for c in ref_curves.values() if c is not None), None)
    if first is None:
        return rows
    step = max(1, math.ceil(len(first.tokens) / MATCHED_POINTS))
    grid = sorted({*first.tokens[::-1][::step]})
    for arm, run_pairs in compared_arms(arms, reference):
        pairs = [(read_curve(run.history, HELDOUT_BITS_PER_BYTE), ref_curves[ref.name]) for run, ref in run_pairs]
        pairs = [(mine, theirs) for mine, theirs in pairs if mine is not None and theirs is not None]
        for tokens in grid:
            diffs = [(value_at(mine, tokens), value_at(theirs, tokens)) for mine, theirs in pairs]
            diffs = [a - b for a, b in diffs if a is not None and b is not None]
            if diffs:
                rows.append({"arm": arm, "tokens": tokens, "delta": mean_estimate(diffs).to_dict(),
                             "over": "seeds" if len(diffs) > 1 else "one seed: no error bar"})
    return rows


def reach_section(arms: dict[str, list[RunRecord]], reference: str, key: str, smooth: bool) -> dict | None:
    """Tokens each run needs to reach the reference arm's final value of a curve (mean over its seeds)."""
    ref_curves = _curves(arms[reference], key, smooth)
    if not ref_curves:
        return None
    target = sum(c.final for c in ref_curves) / len(ref_curves)
    rows = []
    for arm, runs in arms.items():
        for run in runs:
            curves = _curves([run], key, smooth)
            if not curves:
                continue
            reached = tokens_to_reach(curves[0], target)
            rows.append({"arm": arm, "run": run.name, "tokens": reached, "trained_tokens": curves[0].final_tokens})
    summary = {}
    for arm in arms:
        reached = [r["tokens"] for r in rows if r["arm"] == arm]
        if reached and None not in reached:
            summary[arm] = mean_estimate(reached).to_dict()
    return {"target": target, "runs": rows, "arms": summary}


def heldout_section(arms: dict[str, list[RunRecord]], reference: str) -> dict[str, Any]:
    """Held-out loss at equal tokens: every model's eval perplexity, the trained models' Δ to the reference at the
    end of training, and the in-training curves at matched token counts where they were logged."""
    models = []
    for runs in arms.values():
        for run in runs:
            for label in run.labels:
                p = _perplexity(run, label)
                models.append({"run": run.name, "model": label,
                               "tokens_seen": run.tokens_seen if label == TRAINED else 0,
                               **({k: p[k] for k in ("bits_per_byte", "token_perplexity", "documents")} if p else
                                  {"skipped": (run.report["perplexity"].get(label) or {}).get("skipped")})})
    final = []
    for arm, pairs in compared_arms(arms, reference):
        per_pair = []
        for run, ref in pairs:
            delta, how = final_heldout_delta(run, ref)
            final.append({"arm": arm, "run": run.name, "reference_run": ref.name, "tokens": run.tokens_seen,
                          "reference_tokens": ref.tokens_seen, "delta": delta.to_dict() if delta else None,
                          "over": how})
            if delta is not None:
                per_pair.append(delta)
        if len(per_pair) >= 2:
            final.append({"arm": arm, "run": f"mean of {len(per_pair)} seeds", "reference_run": reference,
                          "tokens": runs[0].tokens_seen, "reference_tokens": arms[reference][0].tokens_seen,
                          "delta": over_seeds(per_pair).to_dict(), "over": "seeds"})
    logged = any(read_curve(run.history, HELDOUT_BITS_PER_BYTE) for runs in arms.values() for run in runs)
    return {
        "models": models,
        "final": final,
        "curve_logged": logged,
        "matched": matched_heldout(arms, reference),
        "reach_heldout": reach_section(arms, reference, HELDOUT_BITS_PER_BYTE, smooth=False),
        "reach_training_loss": reach_section(arms, reference, TRAINING_LOSS, smooth=True),
        "training_loss": training_loss_section(arms, reference),
    }


def first_pass(run: RunRecord) -> bool:
    """True when the run never went past one pass over its blocks (the Trainer logs `epoch` with every loss)."""
    epochs = [e["epoch"] for e in run.history if isinstance(e.get("epoch"), (int, float)) and "loss" in e]
    return not epochs or max(epochs) <= 1.0 + 1e-9


def training_loss_section(arms: dict[str, list[RunRecord]], reference: str) -> dict[str, Any]:
    """The training loss of each run minus the reference's, step by step, in TRAINING_WINDOWS stretches of
    training: in a first pass every step is scored on blocks not yet trained on, and with equal seeds on the same
    blocks, so this is a held-out comparison at equal tokens paired block by block (over steps), or over seeds."""
    rows = []
    for arm, pairs in compared_arms(arms, reference):
        per_pair = []
        for run, ref in pairs:
            delta = history_difference(run.history, ref.history, TRAINING_LOSS)
            if delta is None:
                continue
            stretches = window_differences(delta, TRAINING_WINDOWS)
            same_blocks = run.seed == ref.seed and first_pass(run) and first_pass(ref)
            over = "steps, on the same unseen blocks" if same_blocks else "steps"
            rows += [{"arm": arm, "run": run.name, "reference_run": ref.name, "from_tokens": start, "to_tokens": end,
                      "delta": estimate.to_dict(), "over": over} for start, end, estimate in stretches]
            per_pair.append(stretches)
        if len(per_pair) >= 2 and len({len(p) for p in per_pair}) == 1:
            for index, (start, end, _) in enumerate(per_pair[0]):
                estimate = over_seeds([stretches[index][2] for stretches in per_pair])
                rows.append({"arm": arm, "run": f"mean of {len(per_pair)} seeds", "reference_run": reference,
                             "from_tokens": start, "to_tokens": end, "delta": estimate.to_dict(), "over": "seeds"})
    return {"rows": rows, "first_pass": all(first_pass(run) for runs in arms.values() for run in runs)}


def checks_section(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Degeneration verdicts and preservation of every model, side by side."""
    rows = []
    for run in runs:
        for label in run.labels:
            judgement = run.report["probe"]["judgements"][label]
            preservation = run.report["preservation"].get(label) or {}
            perplexity = _perplexity(run, label) or {}
            rows.append({
                "run": run.name, "model": label, "verdict": judgement["verdict"], "rates": judgement["rates"],
                "reasons": judgement["reasons"], "mean_kl": preservation.get("mean_kl"),
                "top1_agreement": preservation.get("top1_agreement"),
                "max_abs_delta": preservation.get("max_abs_delta"),
                "bits_per_byte": perplexity.get("bits_per_byte"),
            })
    return rows


def build_comparison(runs: list[RunRecord], reference_name: str | None) -> dict[str, Any]:
    reference = choose_reference(runs, reference_name)
    arms = arms_of(runs)
    check_comparable(runs, arms[reference][0])
    tokens = {run.name: run.tokens_seen for run in runs}
    notes = []
    if len(set(tokens.values())) > 1:
        counts = ", ".join(f"{name}: {count}" for name, count in tokens.items())
        notes.append(f"the runs trained different numbers of tokens ({counts}): their final held-out losses are not "
                     "at equal tokens")
    heldout = heldout_section(arms, reference)
    if not heldout["curve_logged"]:
        notes.append("no in-training held-out curve logged (log_history.json has no heldout_bits_per_byte entries): "
                     "the held-out comparison is eval's, at the end of training only")
    return {
        "reference": reference,
        "runs": [{"name": run.name, "arm": run.arm, "folder": str(run.folder), "seed": run.seed,
                  "control": run.control, "models": run.labels, "tokens_seen": run.tokens_seen,
                  "data_slice": run.data_slice, "base": run.base["ref"]} for run in runs],
        "arms": {arm: [run.name for run in members] for arm, members in arms.items()},
        "benchmarks": benchmark_section(arms, reference),
        "heldout": heldout,
        "checks": checks_section(runs),
        "notes": notes,
    }


def wandb_settings(inputs: list[str], overrides: list[str], mode: str | None, out: Path) -> WandbConfig:
    """The first input config's train.wandb (project, entity, mode), in a group of its own named after `out`."""
    config = next((load_config(item, overrides) for item in inputs if Path(item).is_file()), None)
    base = config.train.wandb if config is not None else WandbConfig()
    return base.model_copy(update={"group": out.name, "name": out.name, **({"mode": mode} if mode else {})})


def log_to_wandb(run: Any, comparison: dict[str, Any], folder: Path) -> None:
    """The benchmark and held-out tables and the plots, so the runs of one comparison sit in one wandb group."""
    import wandb

    columns = ["row", "average", *bench.BENCHMARKS]
    payload: dict[str, Any] = {}
    section = comparison["benchmarks"]
    if section is not None:
        data = [[row["label"], *(((row["scores"] or {}).get(n) or {}).get("value") for n in ["average",
                 *bench.BENCHMARKS])] for row in section["rows"] + section["deltas"]]
        payload["compare/benchmarks"] = wandb.Table(columns=columns, data=data)
    final = comparison["heldout"]["final"]
    payload["compare/heldout_delta"] = wandb.Table(
        columns=["arm", "run", "reference_run", "tokens", "delta_bits_per_byte", "stderr", "over"],
        data=[[r["arm"], r["run"], r["reference_run"], r["tokens"], (r["delta"] or {}).get("value"),
               (r["delta"] or {}).get("stderr"), r["over"]] for r in final])
    for plot in comparison["plots"]:
        payload[f"compare/plots/{Path(plot).stem}"] = wandb.Image(str(folder / plot))
    run.log(payload)


def run_compare(inputs: list[str], out: Path, reference: str | None, seeds: list[int] | None, overrides: list[str],
                wandb_mode: str | None, force: bool) -> dict[str, Any]:
    """Load, check, compare; write report.json, report.md and the plots into `out` atomically; log to wandb."""
    from eval.compare_plots import write_plots
    from eval.compare_report import render_markdown

    runs = resolve_inputs(inputs, overrides, seeds)
    comparison = build_comparison(runs, reference)
    log.info("comparing %s against %s", ", ".join(r.name for r in runs), comparison["reference"])
    settings = wandb_settings(inputs, overrides, wandb_mode, out)
    with atomic_output_dir(out, force=force) as folder:
        tracked = {"inputs": inputs, "reference": comparison["reference"]}
        wandb_run = start_run(settings, out, folder, "compare", tracked, folder_when_done=out)
        exit_code = 1
        try:
            comparison["plots"] = write_plots(folder, arms_of(runs), comparison)
            write_json_atomic(folder / "report.json", comparison)
            (folder / "report.md").write_text(render_markdown(comparison))
            if wandb_run is not None:
                log_to_wandb(wandb_run, comparison, folder)
            exit_code = 0
        finally:
            if wandb_run is not None:
                wandb_run.finish(exit_code=exit_code)
    log.info("comparison in %s", out / "report.md")
    return comparison
