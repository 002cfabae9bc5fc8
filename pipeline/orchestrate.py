"""Run the stages of one config in order, skipping those already complete for the same inputs.

Each stage is its own program (`python -m <stage> --config ...`); this module only decides which to run
and reads their manifests, so a stage crash never takes the orchestrator's state with it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime

from pipeline.config import RunConfig, load_config
from pipeline.errors import UserError
from pipeline.runs import MANIFEST, STAGE_ORDER, TMP_MARK, read_manifest, stage_fingerprint


def skip_reason(config: RunConfig, stage: str) -> str | None:
    """Why this run has no such stage, or None when it has: a control run or a given train.model widens nothing."""
    if stage != "surgery":
        return None
    if config.train.model is not None:
        return f"train.model is set, train trains {config.train.model}"
    if config.is_control:
        return f"a control run (surgery.mode none), train trains the base {config.surgery.base} itself"
    return None


def stage_state(config: RunConfig, stage: str) -> str:
    """missing | partial | complete | stale, from the stage folder and its manifest; skipped for a stage this run
    does not have (skip_reason)."""
    if skip_reason(config, stage):
        return "skipped"
    folder = config.stage_dir(stage)
    leftovers = list(folder.parent.glob(f"{folder.name}{TMP_MARK}*")) if folder.parent.is_dir() else []
    if not folder.exists():
        return "partial" if leftovers else "missing"
    manifest = read_manifest(folder)
    if manifest is None:
        return "partial"
    if manifest.get("fingerprint") != stage_fingerprint(config, stage) or inputs_replaced(config, stage, manifest):
        return "stale"
    return "complete"


def _finished_at(manifest: dict) -> datetime | None:
    try:
        return datetime.strptime(manifest["finished_at"], "%Y-%m-%dT%H:%M:%S%z")
    except (KeyError, TypeError, ValueError):
        return None


def inputs_replaced(config: RunConfig, stage: str, manifest: dict) -> bool:
    """True when an earlier stage of this run finished after this one did: this stage's output was made from
    inputs that have since been rebuilt (say, surgery rerun by hand with --force), so it is not current even with
    an unchanged config. The manifests' own timestamps, not file times, so a copied run folder keeps its state."""
    finished = _finished_at(manifest)
    for upstream in STAGE_ORDER[: STAGE_ORDER.index(stage)]:
        if skip_reason(config, upstream):
            continue
        upstream_manifest = read_manifest(config.stage_dir(upstream))
        if upstream_manifest is None:
            continue
        upstream_finished = _finished_at(upstream_manifest)
        if finished is not None and upstream_finished is not None and upstream_finished > finished:
            return True
        if inputs_replaced(config, upstream, upstream_manifest):  # made from something stale is stale too
            return True
    return False


def recorded_failure(config: RunConfig, stage: str) -> tuple[int, str] | None:
    """(exit code, what failed) when the stage finished for these very inputs and recorded a non-zero outcome (eval's
    DEGENERATE verdict): rerunning it would only repeat hours of work to the same end, so callers report it instead."""
    manifest = read_manifest(config.stage_dir(stage))
    if manifest is None or not manifest.get("exit_code") or stage_state(config, stage) != "complete":
        return None
    degenerate = [label for label, verdict in manifest.get("verdicts", {}).items() if verdict == "DEGENERATE"]
    what = f"{', '.join(degenerate)} DEGENERATE" if degenerate else "failed"
    report = config.stage_dir(stage) / "report.md"
    return int(manifest["exit_code"]), (f"{what} (exit {manifest['exit_code']}, recorded {manifest.get('finished_at')} "
                                        f"for these inputs; see {report if report.is_file() else report.parent})")


# Each stage's main outputs, relative to its folder ("." is the folder itself: the surgery output is a model).
STAGE_OUTPUTS: dict[str, dict[str, str]] = {
    "surgery": {"widened model": "."},
    "train": {"merged model": "merged", "adapter": "adapter", "held-out text": "heldout.jsonl",
              "loss log": "log_history.json", "wandb run": "wandb"},
    "eval": {"report": "report.md", "report data": "report.json", "samples": "samples.jsonl",
             "loss plot": "training_loss.png", "benchmark plot": "benchmarks.png", "wandb run": "wandb"},
}


def output_lines(config: RunConfig, stage: str, state: str) -> list[str]:
    """Where a stage's outputs are: the finished files, or what an interrupted run left to resume from."""
    folder = config.stage_dir(stage)
    lines = []
    if state in ("complete", "stale"):
        for label, name in STAGE_OUTPUTS[stage].items():
            path = folder / name
            if path.exists():
                lines.append(f"{label}: {path}")
    if state == "partial" and stage == "train":
        names = [p.name.removeprefix("checkpoint-") for p in folder.glob("checkpoint-*")]
        steps = sorted(int(name) for name in names if name.isdigit())
        if steps:
            lines.append(f"checkpoints: {', '.join(f'checkpoint-{n}' for n in steps)} (a rerun resumes from the "
                         "newest complete one)")
    if state == "partial":
        for leftover in sorted(folder.parent.glob(f"{folder.name}{TMP_MARK}*")):
            lines.append(f"unfinished: {leftover} (being written, or left by a killed run: the next run removes it "
                         "and redoes this stage)")
    return lines


def print_status(config: RunConfig) -> None:
    for stage in STAGE_ORDER:
        state = stage_state(config, stage)
        if state == "skipped":
            print(f"{stage:8s} {state:9s} {skip_reason(config, stage)}")
            continue
        print(f"{stage:8s} {state:9s} {config.stage_dir(stage)}")
        for line in output_lines(config, stage, state):
            print(f"{'':18s} {line}")


def print_report(config: RunConfig) -> None:
    """The end of a run: the eval report as written, then where its files are."""
    folder = config.stage_dir("eval")
    print(f"\n{(folder / 'report.md').read_text().rstrip()}\n")
    for line in output_lines(config, "eval", "complete"):
        print(f"[frankenllama] {line}")
    offline = sorted(config.run_dir.glob("*/wandb/offline-run-*"))
    if offline:
        print(f"[frankenllama] wandb runs kept offline; upload them with: wandb sync {' '.join(map(str, offline))}")


def rerun_mode(stage: str, state: str, from_scratch: bool) -> tuple[str, str | None]:
    """(how the run line describes it, the flag that makes the stage do it) for a stage about to run.

    A stale train stage keeps its checkpoints when they fit the changed config (train.max_steps raised, say):
    the train stage itself decides, and starts over when they do not. Surgery and eval always start over.
    """
    if from_scratch or (state == "stale" and stage != "train"):
        return " from scratch", "--no-resume" if stage == "train" else "--force"
    if state == "stale":
        return " (resuming its checkpoints if they fit this config, else from scratch)", "--resume-or-restart"
    if state == "partial":
        return "", "--resume" if stage == "train" else "--force"
    return "", None


def select_stages(start: str | None, only: str | None) -> list[str]:
    """The stages `--from` / `--only` select, in pipeline order."""
    if only:
        return [only]
    return list(STAGE_ORDER[STAGE_ORDER.index(start):] if start else STAGE_ORDER)


def stages_to_run(config: RunConfig, selected: list[str], force: bool) -> list[str]:
    """Which selected stages `run_pipeline` will run: the incomplete ones, and every one after a stage that runs;
    never one this run has not got (a control run's surgery)."""
    chosen: list[str] = []
    for stage in selected:
        state = stage_state(config, stage)
        if state != "skipped" and (force or chosen or state != "complete"):
            chosen.append(stage)
    return chosen


def run_pipeline(
    config_path: str, overrides: list[str], start: str | None, only: str | None, force: bool
) -> int:
    config = load_config(config_path, overrides)
    rerun_rest = False
    for stage in select_stages(start, only):
        state = stage_state(config, stage)
        if state == "skipped":
            print(f"[frankenllama] {stage}: skipped, {skip_reason(config, stage)}")
            continue
        if state == "complete" and not (force or rerun_rest):
            failure = recorded_failure(config, stage)
            if failure is not None:
                print(f"[frankenllama] {stage}: {failure[1]}; `--only {stage} --force` runs it again")
                return failure[0]
            print(f"[frankenllama] {stage}: complete for this config, skipping ({config.stage_dir(stage)})")
            continue
        args = [sys.executable, "-m", stage, "--config", config_path]
        for assignment in overrides:
            args += ["--set", assignment]
        how, flag = rerun_mode(stage, state, force or rerun_rest)
        print(f"[frankenllama] {stage}: {state}, running{how}", flush=True)
        args += [flag] if flag else []
        started = time.monotonic()
        code = subprocess.call(args)
        if code != 0:
            failure = recorded_failure(config, stage)
            print(f"[frankenllama] {stage}: {failure[1]}; `--only {stage} --force` runs it again" if failure else
                  f"[frankenllama] {stage} failed (exit {code}); fix the cause and rerun: completed stages are kept")
            return code
        if not (config.stage_dir(stage) / MANIFEST).is_file():
            raise UserError(f"{stage} exited 0 but wrote no {MANIFEST}; this is a bug, please report it")
        print(f"[frankenllama] {stage}: complete in {time.monotonic() - started:.0f} s", flush=True)
        rerun_rest = True
    if stage_state(config, "eval") == "complete":
        print_report(config)
    return 0
