"""The orchestrator's view of a run folder: which stages are missing, partial, complete or stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.orchestrate import stage_state
from pipeline.runs import stage_fingerprint, write_manifest

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, *overrides: str):
    return load_config(REPO / "configs/smoke.yaml", [f"run_dir={tmp_path / 'run'}", *overrides])


def test_states_follow_folders_manifests_and_fingerprints(tmp_path):
    config = _config(tmp_path)
    assert stage_state(config, "surgery") == "missing"
    surgery = config.stage_dir("surgery")
    surgery.parent.mkdir(parents=True)
    (surgery.parent / "surgery.tmp-99999999").mkdir()
    assert stage_state(config, "surgery") == "partial"  # a killed run's temporary is not complete work
    surgery.mkdir()
    assert stage_state(config, "surgery") == "partial"
    write_manifest(surgery, "surgery", fingerprint=stage_fingerprint(config, "surgery"))
    assert stage_state(config, "surgery") == "complete"
    config.stage_dir("train").mkdir()
    write_manifest(config.stage_dir("train"), "train", fingerprint=stage_fingerprint(config, "train"))
    assert stage_state(config, "train") == "complete"

    changed_train = _config(tmp_path, "train.max_steps=3")
    assert stage_state(changed_train, "surgery") == "complete"
    assert stage_state(changed_train, "train") == "stale"
    changed_surgery = _config(tmp_path, "surgery.seed=5")
    assert stage_state(changed_surgery, "surgery") == "stale"
    assert stage_state(changed_surgery, "train") == "stale"


def test_bad_config_fails_before_any_work_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(REPO / "configs/smoke.yaml"),
         "--set", f"run_dir={run_dir}", "--set", "train.max_stesp=3"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'train.max_stesp'" in lines[0]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()
