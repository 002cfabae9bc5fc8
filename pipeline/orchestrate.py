"""Run the stages of one config in order, skipping those already complete for the same inputs.

Each stage is its own program (`python -m <stage> --config ...`); this module only decides which to run
and reads their manifests, so a stage crash never takes the orchestrator's state with it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.config import RunConfig, load_config
from pipeline.errors import UserError
from pipeline.runs import MANIFEST, STAGE_ORDER, TMP_MARK, read_manifest, stage_fingerprint


def stage_state(config: RunConfig, stage: str) -> str:
    """missing | partial | complete | stale, from the stage folder and its manifest."""
    folder = config.stage_dir(stage)
    leftovers = list(folder.parent.glob(f"{folder.name}{TMP_MARK}*")) if folder.parent.is_dir() else []
    if not folder.exists():
        return "partial" if leftovers else "missing"
    manifest = read_manifest(folder)
    if manifest is None:
        return "partial"
    if manifest.get("fingerprint") != stage_fingerprint(config, stage):
        return "stale"
    return "complete"


def stage_available(stage: str) -> bool:
    return (Path(__file__).resolve().parents[1] / stage / "__main__.py").is_file()


def print_status(config: RunConfig) -> None:
    for stage in STAGE_ORDER:
        state = stage_state(config, stage) if stage_available(stage) else "not built"
        print(f"{stage:8s} {state:9s} {config.stage_dir(stage)}")


def run_pipeline(
    config_path: str, overrides: list[str], start: str | None, only: str | None, force: bool
) -> int:
    config = load_config(config_path, overrides)
    selected = [s for s in STAGE_ORDER if stage_available(s)]
    if only:
        selected = [only]
    elif start:
        selected = selected[selected.index(start):]
    rerun_rest = False
    for stage in selected:
        state = stage_state(config, stage)
        if state == "complete" and not (force or rerun_rest):
            print(f"[frankenllama] {stage}: complete for this config, skipping ({config.stage_dir(stage)})")
            continue
        fresh = force or rerun_rest or state == "stale"
        print(f"[frankenllama] {stage}: {state}, running{' from scratch' if fresh else ''}", flush=True)
        args = [sys.executable, "-m", stage, "--config", config_path]
        for assignment in overrides:
            args += ["--set", assignment]
        if fresh or state == "partial":
            args.append("--force" if stage != "train" else "--no-resume" if fresh else "--resume")
        code = subprocess.call(args)
        if code != 0:
            print(f"[frankenllama] {stage} failed (exit {code}); fix the cause and rerun: completed stages are kept")
            return code
        if not (config.stage_dir(stage) / MANIFEST).is_file():
            raise UserError(f"{stage} exited 0 but wrote no {MANIFEST}; this is a bug, please report it")
        rerun_rest = True
    return 0
