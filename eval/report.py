"""The report folder's files: report.json (everything, machine-readable), report.md (the same for people,
its benchmark table laid out like the 2023 results table), samples.jsonl (every probe output) and PNG plots.

report.md is rendered from the report.json payload only, so the two never disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval import benchmarks as bench
from eval.plots import plot_benchmarks, plot_training_loss
from eval.precision import Precision
from eval.results import BenchmarkRun, ModelResults
from eval.stats import Estimate, combine_equal_weight
from pipeline.config import RunConfig
from pipeline.runs import write_json_atomic

LOSS_PLOT = "training_loss.png"
BENCHMARK_PLOT = "benchmarks.png"


def _benchmark_section(results: list[ModelResults], run: BenchmarkRun, config: RunConfig) -> tuple[dict, dict]:
    """The report's benchmark payload, and the per-model estimates the plot needs."""
    base = results[0]
    scores: dict[str, dict[str, Any]] = {}
    paired: dict[str, dict[str, Any]] = {}
    estimates: dict[str, dict[str, Estimate]] = {}
    for r in results:
        if r.benchmark_scores is None:
            continue
        per_model = bench.benchmark_estimates(r.benchmark_scores, run.leaves)
        estimates[r.entry.label] = per_model
        average = bench.leaderboard_average(per_model)
        scores[r.entry.label] = {
            **{name: e.to_dict() for name, e in per_model.items()},
            "average": average.to_dict() if average else None,
        }
        if r is not base and base.benchmark_scores is not None:
            diffs = bench.paired_estimates(r.benchmark_scores, base.benchmark_scores, run.leaves)
            complete = all(name in diffs for name in bench.BENCHMARKS)
            paired[r.entry.label] = {
                **{name: e.to_dict() for name, e in diffs.items()},
                "average": combine_equal_weight([diffs[n] for n in bench.BENCHMARKS]).to_dict() if complete else None,
            }
    settings = config.eval.benchmarks
    section = {
        "source": run.source,
        "settings": {
            name: {"column": b.column, "metric": b.metric, "num_fewshot": getattr(settings, name).num_fewshot,
                   "n_requested": getattr(settings, name).n}
            for name, b in bench.BENCHMARKS.items()
        },
        "subset_seed": settings.subset_seed,
        "skipped_benchmarks": run.skipped,
        "items": run.items,
        "scores": scores,
        "paired_vs_base": paired,
        "item_scores": {r.entry.label: r.benchmark_scores for r in results if r.benchmark_scores is not None},
        "not_run": {r.entry.label: r.skipped["benchmarks"] for r in results if "benchmarks" in r.skipped},
    }
    return section, estimates


# The train stage's manifest "merge": {"into": ...}: what `<run_dir>/train/merged` added the adapter to.
MERGE_WORDS = {
    "base": "merged into the {dtype} base weights",
    "dequantized_nf4": "merged into the dequantized NF4 weights",
}


def _model_row(r: ModelResults) -> dict:
    row = {"label": r.entry.label, "ref": r.entry.ref, "path": str(r.entry.path), "dtype": r.dtype,
           "stored_dtype": r.stored_dtype,
           "placement": {where: place.to_dict() for where, place in r.placement.items()}}
    if r.entry.merge is not None:
        row["merge"] = r.entry.merge
        row["merged_into"] = merge_words(r.entry.merge, r.stored_dtype)
    return row


def merge_words(merge: dict, stored: str) -> str:
    """Which weights the trained adapter was added to, in words (a merged export is stored in its base's dtype)."""
    into = merge.get("into")
    return MERGE_WORDS.get(into, "merged into {into}").format(dtype=stored, into=into)


def build_report(
    config: RunConfig, results: list[ModelResults], benchmarks: dict | None, plots: list[str], exit_code: int,
    precision: Precision,
) -> dict:
    base_label = results[0].entry.label
    report: dict[str, Any] = {
        "run_dir": str(config.run_dir),
        "seed": config.seed,  # the run seed, so a comparison can pair the repeats of two runs seed by seed
        "exit_code": exit_code,
        "base": base_label,
        "verdicts": {r.entry.label: r.probe.judgement.verdict for r in results},
        "precision": precision.to_dict(),
        "models": [_model_row(r) for r in results],
        "probe": {
            "prompts": config.eval.probe.prompts,
            "max_new_tokens": config.eval.probe.max_new_tokens,
            "judgements": {r.entry.label: r.probe.judgement.to_dict() for r in results},
        },
        "perplexity": {
            r.entry.label: r.perplexity.to_dict() if r.perplexity else {"skipped": r.skipped.get("perplexity")}
            for r in results
        },
        "preservation": {
            r.entry.label: r.preservation.to_dict() if r.preservation
            else {"skipped": r.skipped.get("preservation", "eval.preservation.enabled is false")}
            for r in results[1:]
        },
        "benchmarks": benchmarks,
        "plots": plots,
    }
    return report


def _pct(estimate: dict | None, with_n: bool = True, signed: bool = False) -> str:
    if estimate is None:
        return "—"
    value = f"{100 * estimate['value']:+.1f}" if signed else f"{100 * estimate['value']:.1f}"
    error = f" ± {100 * estimate['stderr']:.1f}" if estimate["stderr"] is not None else ""
    return f"{value}{error}" + (f" (n={estimate['n']})" if with_n else "")


def _benchmark_table(report: dict) -> list[str]:
    section = report["benchmarks"]
    names = list(bench.BENCHMARKS)
    headers = ["model", "Average"] + [
        f"{section['settings'][n]['column']} ({section['settings'][n]['num_fewshot']}-shot)" for n in names
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for label, scores in section["scores"].items():
        cells = [_pct(scores.get("average"), with_n=False)] + [_pct(scores.get(n)) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, diffs in section["paired_vs_base"].items():
        cells = [_pct(diffs.get("average"), with_n=False, signed=True)] + [
            _pct(diffs.get(n), with_n=False, signed=True) for n in names
        ]
        lines.append(f"| Δ {label} − {report['base']} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict, samples: dict[str, list[dict]]) -> str:
    """report.md from the report payload and the probe samples."""
    lines = ["# frankenllama eval report", ""]
    lines.append(f"Run folder `{report['run_dir']}`. Models: " + ", ".join(
        f"**{m['label']}** (`{m['ref']}`, stored in {m['stored_dtype']}"
        + (f", {m['merged_into']}" if "merged_into" in m else "") + ")" for m in report["models"]) + ".")
    precision = report["precision"]
    lines += ["", f"Precision: {precision['reason']}."]
    lines += ["", "## Degeneration probe", ""]
    probe = report["probe"]
    lines.append(f"Greedy decoding, repetition penalty and n-gram blocking off, {probe['prompts']} prompts, "
                 f"up to {probe['max_new_tokens']} new tokens. Each model is judged against "
                 f"**{report['base']}** on the same prompts; {report['base']} itself on absolute thresholds.")
    lines += ["", "| model | verdict | one-token loops | any loop | empty | EOS reached | non-finite logits | why |",
              "|---|---|---|---|---|---|---|---|"]
    for label, judgement in probe["judgements"].items():
        rates = judgement["rates"]
        why = "; ".join(judgement["reasons"] + [f"e.g. {e}" for e in judgement["examples"][:1]]) or "—"
        lines.append(f"| {label} | **{judgement['verdict']}** | {rates['single_token_loop']:.0%} | "
                     f"{rates['any_loop']:.0%} | {rates['empty']:.0%} | {rates['eos_reached']:.0%} | "
                     f"{rates['nonfinite']:.0%} | {why.replace('|', '/')} |")
    if report["exit_code"]:
        failed = [label for label, v in report["verdicts"].items() if v == "DEGENERATE"]
        lines += ["", f"**The stage failed (exit {report['exit_code']}): {', '.join(failed)} DEGENERATE.** "
                      "The verdict is recorded in manifest.json: a rerun with the same inputs reports it and exits "
                      f"{report['exit_code']} at once; `--force` evaluates again."]

    lines += ["", "## Benchmarks", ""]
    section = report["benchmarks"]
    if section is None:
        lines.append("Not run (eval.benchmarks.enabled is false).")
    else:
        lines.append(f"Old Open LLM Leaderboard settings on item subsets (data: {section['source']}; subset seed "
                     f"{section['subset_seed']}, the same items for every model). Scores in %, ± one standard "
                     "error; n = items scored (MMLU: over the subjects present, averaged with equal weight). "
                     f"Δ rows: paired difference to {report['base']} on the same items.")
        lines += ["", *_benchmark_table(report)]
        for label, reason in section["not_run"].items():
            lines.append(f"\n{label}: not run ({reason}).")
        for name, reason in section["skipped_benchmarks"].items():
            lines.append(f"\n{name}: skipped ({reason}).")
        if BENCHMARK_PLOT in report["plots"]:
            lines += ["", f"![benchmark scores]({BENCHMARK_PLOT})"]

    lines += ["", f"## Preservation (logits vs {report['base']} on held-out text)", ""]
    if not report["preservation"]:
        lines.append("Only the base was evaluated.")
    else:
        lines += ["| model | max abs Δ logit | mean KL(base ‖ model), nats | top-1 agreement | tokens |",
                  "|---|---|---|---|---|"]
        for label, p in report["preservation"].items():
            if "skipped" in p:
                lines.append(f"| {label} | skipped: {p['skipped']} | | | |")
            else:
                lines.append(f"| {label} | {p['max_abs_delta']:.3g} | {p['mean_kl']:.3g} | "
                             f"{p['top1_agreement']:.2%} | {p['positions']} |")
        lines.append("\nAn exact surgery mode shows Δ near float rounding (1e-4 in fp32), KL ~ 0 and 100% agreement.")

    lines += ["", "## Held-out perplexity", "", "| model | bits per byte | token perplexity | tokens | documents |",
              "|---|---|---|---|---|"]
    for label, p in report["perplexity"].items():
        if "skipped" in p:
            lines.append(f"| {label} | skipped: {p['skipped']} | | | |")
        else:
            lines.append(f"| {label} | {p['bits_per_byte']:.4f} | {p['token_perplexity']:.2f} | "
                         f"{p['predicted_tokens']} | {p['documents']} |")

    if LOSS_PLOT in report["plots"]:
        lines += ["", "## Training loss", "", f"![training loss]({LOSS_PLOT})"]

    lines += ["", "## Probe samples (flagged first; all in samples.jsonl)", ""]
    for label, rows in samples.items():
        flagged = [r for r in rows if r["signals"]["failure"]]
        shown = (flagged or rows)[:3]
        lines.append(f"**{label}**: {len(flagged)} of {len(rows)} outputs flagged")
        for row in shown:
            failure = row["signals"]["failure"] or "ok"
            lines.append(f"- `{row['prompt_id']}` [{failure}] {row['prompt'][:60]!r} → {row['output'][:160]!r}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    out: Path,
    config: RunConfig,
    results: list[ModelResults],
    run: BenchmarkRun | None,
    log_history: list[dict] | None,
    exit_code: int,
    precision: Precision,
) -> dict:
    """Write samples.jsonl, the plots, report.json and report.md into `out`; return the report payload."""
    samples = {r.entry.label: [s.to_dict() for s in r.probe.samples] for r in results}
    with (out / "samples.jsonl").open("w") as handle:
        for label, rows in samples.items():
            for row in rows:
                handle.write(json.dumps({"model": label, **row}) + "\n")
    section, estimates = _benchmark_section(results, run, config) if run is not None else (None, {})
    plots = []
    if log_history and plot_training_loss(log_history, out / LOSS_PLOT):
        plots.append(LOSS_PLOT)
    columns = {name: b.column for name, b in bench.BENCHMARKS.items()}
    if estimates and plot_benchmarks(estimates, columns, out / BENCHMARK_PLOT):
        plots.append(BENCHMARK_PLOT)
    report = build_report(config, results, section, plots, exit_code, precision)
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report, samples))
    return report
