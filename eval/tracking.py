"""The eval results in Weights & Biases, next to the train run: same project and group, one `<group>-eval` run.

The report folder stays the record; wandb gets tables built from the same report payload (one row per model,
one row per probe output) so runs of a sweep can be compared side by side, and the plots as images. The
settings are `eval.wandb`, or the train section's when that is unset, so both stages land in one group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval import benchmarks as bench
from pipeline.config import RunConfig, WandbConfig
from pipeline.tracking import start_run

RESULT_COLUMNS = [
    "model", "ref", "verdict", "single_token_loop_rate", "any_loop_rate", "empty_rate", "eos_reached_rate",
    "bits_per_byte", "token_perplexity", "max_abs_delta", "mean_kl", "top1_agreement",
    "average", *bench.BENCHMARKS,
]
SAMPLE_COLUMNS = ["model", "prompt_id", "kind", "prompt", "output", "failure", "longest_run", "run_token_text"]


def eval_wandb_settings(config: RunConfig) -> WandbConfig:
    """`eval.wandb`, else the train section's settings with the run name left to the default `<group>-eval`."""
    if config.eval.wandb is not None:
        return config.eval.wandb
    return config.train.wandb.model_copy(update={"name": None})


def start_eval_run(config: RunConfig, folder: Path) -> Any | None:
    """The eval stage's wandb run (files and run id in `folder`, the report folder's temporary name), or None
    when tracking is disabled."""
    return start_run(eval_wandb_settings(config), config.run_dir, folder, "eval", config.model_dump(mode="json"),
                     folder_when_done=config.stage_dir("eval"))


def result_rows(report: dict[str, Any]) -> list[list[Any]]:
    """One row per model, in RESULT_COLUMNS order; None where a part was skipped."""
    scores = (report["benchmarks"] or {}).get("scores", {})
    rows = []
    for model in report["models"]:
        label = model["label"]
        rates = report["probe"]["judgements"][label]["rates"]
        perplexity = report["perplexity"].get(label, {})
        preservation = report["preservation"].get(label, {})
        model_scores = scores.get(label, {})
        rows.append([
            label, model["ref"], report["verdicts"][label], rates["single_token_loop"], rates["any_loop"],
            rates["empty"], rates["eos_reached"], perplexity.get("bits_per_byte"), perplexity.get("token_perplexity"),
            preservation.get("max_abs_delta"), preservation.get("mean_kl"),
            preservation.get("top1_agreement"),
            *((model_scores.get(name) or {}).get("value") for name in ["average", *bench.BENCHMARKS]),
        ])
    return rows


def sample_rows(samples: dict[str, list[dict]]) -> list[list[Any]]:
    return [
        [label, row["prompt_id"], row["kind"], row["prompt"], row["output"], row["signals"]["failure"],
         row["signals"]["longest_run"], row["signals"]["run_token_text"]]
        for label, rows in samples.items() for row in rows
    ]


def log_report(run: Any, report: dict[str, Any], samples: dict[str, list[dict]], folder: Path) -> None:
    """Log the results and samples tables, the verdicts in the summary, and the report's plots."""
    import wandb

    payload: dict[str, Any] = {
        "eval/results": wandb.Table(columns=RESULT_COLUMNS, data=result_rows(report)),
        "eval/samples": wandb.Table(columns=SAMPLE_COLUMNS, data=sample_rows(samples)),
    }
    for plot in report["plots"]:
        payload[f"eval/{Path(plot).stem}"] = wandb.Image(str(folder / plot))
    run.log(payload)
    for label, verdict in report["verdicts"].items():
        run.summary[f"eval/verdict/{label}"] = verdict
