"""The eval stage: every configured model through probe, perplexity, preservation and benchmarks, one at a
time, then the report folder `<run_dir>/eval/` written atomically with manifest.json last.

Order matters: the base goes first because every later verdict, logit comparison and paired difference is
against its numbers. Every model is computed in one precision (eval/precision.py). A DEGENERATE model skips its
benchmarks (they would only measure noise, slowly) and makes the stage exit 3; the report and a manifest recording
the verdicts and that exit code are still written, so a rerun with the same inputs reports the verdict and exits 3
at once instead of repeating hours of eval to the same end (`--force` evaluates again).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from eval import benchmarks as bench
from eval.models import ModelEntry, free_memory, load_model, load_tokenizer, models_to_evaluate, pick_device
from eval.perplexity import heldout_perplexity, read_heldout_texts
from eval.placement import placement_summary
from eval.precision import Precision, choose_precision, stored_dtype
from eval.preservation import fallback_texts, logits_on, preservation_token_ids
from eval.probe import EXIT_DEGENERATE, probe_model, summary_lines
from eval.report import write_report
from eval.results import BenchmarkRun, ModelResults
from eval.tracking import log_report, start_eval_run
from pipeline.config import RunConfig
from pipeline.logits import logit_agreement
from pipeline.orchestrate import recorded_failure
from pipeline.runs import atomic_output_dir, stage_fingerprint, write_manifest

log = logging.getLogger(__name__)


def prepare_benchmarks(
    config: RunConfig, plan: tuple[list[bench.LeafTask], dict[str, str]] | None, out: Path
) -> BenchmarkRun | None:
    """Write the task files into the report folder and choose the items every model will be scored on."""
    if plan is None:
        return None
    settings = config.eval.benchmarks
    leaves, skipped = plan
    task_dir = out / "tasks"
    bench.write_task_yamls(leaves, task_dir)
    items = bench.choose_items(bench.count_items(task_dir, leaves), leaves, settings) if leaves else {}
    source = str(settings.data_dir) if settings.data_dir is not None else "huggingface hub"
    log.info("benchmarks from %s: %s", source, ", ".join(f"{k} ({len(v)} items)" for k, v in items.items()))
    return BenchmarkRun(leaves, skipped, items, task_dir, source)


def evaluate_model(
    entry: ModelEntry,
    config: RunConfig,
    device: torch.device,
    precision: Precision,
    base: ModelResults | None,
    base_logits: list[torch.Tensor] | None,
    heldout: list[str] | None,
    preservation_ids: list[list[int]],
    benchmark_run: BenchmarkRun | None,
) -> tuple[ModelResults, list[torch.Tensor] | None]:
    """One model, loaded once (twice when preservation needs float32 and scoring does not); returns its results
    and, for the base, the logits later models compare with."""
    settings = config.eval
    tokenizer = load_tokenizer(entry.path, fallback=base.entry.path if base else None)
    model = load_model(entry, device, precision.compute_dtype, precision.activations)
    log.info("%s: probing %d prompts", entry.label, settings.probe.prompts)
    probe = probe_model(entry.label, model, tokenizer, settings.probe, base.probe if base else None)
    for line in summary_lines(probe):
        log.info("%s", line)
    results = ModelResults(entry, precision.compute, stored_dtype(entry.path), probe,
                           placement=placement_summary(model))

    if not settings.perplexity.enabled:
        results.skipped["perplexity"] = "eval.perplexity.enabled is false"
    elif heldout is None:
        results.skipped["perplexity"] = "no <run_dir>/train/heldout.jsonl (the train stage writes it)"
    else:
        results.perplexity = heldout_perplexity(model, tokenizer, heldout, settings.perplexity.window)
        log.info("%s: %.4f bits/byte, token perplexity %.2f", entry.label, results.perplexity.bits_per_byte,
                 results.perplexity.token_perplexity)

    degenerate = probe.judgement.verdict == "DEGENERATE"
    if benchmark_run is None:
        results.skipped["benchmarks"] = "eval.benchmarks.enabled is false"
    elif degenerate and settings.probe.skip_benchmarks_on_degenerate:
        results.skipped["benchmarks"] = "DEGENERATE in the probe (eval.probe.skip_benchmarks_on_degenerate)"
        log.warning("%s: benchmarks skipped, the model is DEGENERATE", entry.label)
    elif benchmark_run.leaves:
        results.benchmark_scores = bench.score_items(
            model, tokenizer, benchmark_run.task_dir, benchmark_run.leaves, benchmark_run.items,
            settings.benchmarks.batch_size,
        )

    logits = None
    if settings.preservation.enabled:
        if precision.preservation_reloads:
            del model
            free_memory()
            log.info("%s: preservation logits in %s", entry.label, precision.preservation)
            model = load_model(entry, device, getattr(torch, precision.preservation), precision.activations,
                               streamed=True)
        logits = logits_on(model, preservation_ids)
        compare_with_base(results, logits, base_logits)
    del model
    free_memory()
    return results, logits if base is None else None


def compare_with_base(
    results: ModelResults, logits: list[torch.Tensor], base_logits: list[torch.Tensor] | None
) -> None:
    """Fill `results.preservation` (or the reason it was skipped); nothing to compare for the base itself."""
    if base_logits is None:
        return
    if logits[0].shape[-1] != base_logits[0].shape[-1]:
        results.skipped["preservation"] = "vocabulary differs from the base's"
        return
    results.preservation = p = logit_agreement(base_logits, logits)
    log.info("%s vs base: max |delta logits| %.3g, KL %.3g nats, top-1 agreement %.1f%%", results.entry.label,
             p.max_abs_delta, p.mean_kl, 100 * p.top1_agreement)


def _read_log_history(config: RunConfig) -> list[dict] | None:
    path = config.stage_dir("train") / "log_history.json"
    if not path.is_file():
        return None
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; no loss plot", path)
        return None
    return history if isinstance(history, list) else None


def run_eval(config: RunConfig, force: bool = False) -> int:
    """Run the stage; 0 when done, EXIT_DEGENERATE when a model degenerated and the config says to fail."""
    final = config.stage_dir("eval")
    failure = None if force else recorded_failure(config, "eval")
    if failure is not None:
        print(f"eval: {failure[1]}; --force evaluates again")
        return failure[0]
    entries = models_to_evaluate(config)
    device = pick_device(config.eval.device)
    # Before any model loads: a missing data source is a one-line error, not a failure after minutes.
    plan = bench.plan_tasks(config.eval.benchmarks) if config.eval.benchmarks.enabled else None
    heldout_path = config.stage_dir("train") / "heldout.jsonl"
    heldout = None
    if heldout_path.is_file():
        heldout = read_heldout_texts(heldout_path, config.eval.perplexity.max_texts)
    else:
        log.info("no held-out slice at %s: perplexity skipped, preservation uses the shipped paragraphs",
                 heldout_path)
    # The same token ids for every model (the base's tokenization): logits are compared position by position.
    preservation_ids = preservation_token_ids(
        load_tokenizer(entries[0].path), heldout or fallback_texts(), config.eval.preservation.texts,
        config.eval.preservation.max_tokens,
    )
    # Decided once, before any model loads, from the memory free then: the same dtypes for every model.
    precision = choose_precision(config.eval, {e.label: e.path for e in entries}, device)
    log.info("evaluating %s on %s; %s", ", ".join(f"{e.label} ({e.ref})" for e in entries), device, precision.reason)

    with atomic_output_dir(final, force=force) as out:
        # Started before any model loads, so a wandb that cannot start fails the stage before the work.
        run = start_eval_run(config, out)
        exit_code = 1
        try:
            benchmark_run = prepare_benchmarks(config, plan, out)
            results: list[ModelResults] = []
            base_logits = None
            for entry in entries:
                base = results[0] if results else None
                model_results, logits = evaluate_model(
                    entry, config, device, precision, base, base_logits, heldout, preservation_ids, benchmark_run
                )
                base_logits = base_logits if base else logits
                results.append(model_results)
            degenerate = [r.entry.label for r in results if r.probe.judgement.verdict == "DEGENERATE"]
            exit_code = EXIT_DEGENERATE if degenerate and config.eval.probe.fail_on_degenerate else 0
            report = write_report(out, config, results, benchmark_run, _read_log_history(config), exit_code,
                                  precision)
            if run is not None:
                samples = {r.entry.label: [s.to_dict() for s in r.probe.samples] for r in results}
                log_report(run, report, samples, out)
        finally:
            if run is not None:
                run.finish(exit_code=exit_code)
        # Also after a DEGENERATE verdict: the outcome is the stage's result, recorded so a rerun need not redo it.
        write_manifest(out, "eval", fingerprint=stage_fingerprint(config, "eval"), exit_code=exit_code,
                       verdicts=report["verdicts"], models={r.entry.label: r.entry.ref for r in results},
                       precision=precision.to_dict(), wandb_run_id=run.id if run is not None else None)
    for label in degenerate:
        print(f"eval: {label} is DEGENERATE; see {final / 'report.md'}")
    print(f"eval: report in {final / 'report.md'}")
    return exit_code
