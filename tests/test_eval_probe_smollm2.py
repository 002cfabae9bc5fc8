"""The degeneration probe on the real SmolLM2-135M: healthy passes, the A=0 failure (writers zeroed) does not.

Zeroing every o_proj and down_proj leaves the residual stream equal to the token embedding, so the tied
head predicts the input token again: one token forever, the 2023 failure. Run through the real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.cli import main as eval_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zeroed_smollm2(tmp_path_factory, smollm2_dir) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("zeroed") / "smollm2-zeroed-writers"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    return folder


def test_probe_cli_passes_healthy_smollm2_and_flags_zeroed_writers(tmp_path, smollm2_dir, zeroed_smollm2):
    report = tmp_path / "probe.json"
    # One intra-op thread: on busy shared cores two threads stall each other (see test_eval_stage.py).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "eval", "probe", "--model", str(zeroed_smollm2), "--base", str(smollm2_dir),
         "--prompts", "6", "--max-new-tokens", "16", "--json", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "verdict: DEGENERATE"
    assert "single-token loop" in proc.stdout
    payload = json.loads(report.read_text())
    # The healthy base, judged on absolute thresholds, is not DEGENERATE...
    assert payload["base_judgement"]["verdict"] in ("PASS", "WARN")
    assert payload["base_judgement"]["rates"]["single_token_loop"] < 0.5
    # ...and the zeroed copy repeats one token on every prompt, with the token named.
    judgement = payload["judgement"]
    assert judgement["verdict"] == "DEGENERATE"
    assert judgement["rates"]["single_token_loop"] == 1.0
    first = payload["samples"][0]["signals"]
    assert first["longest_run"] == 16 and first["run_token_text"] is not None
    assert first["run_token_text"] * 16 == payload["samples"][0]["output"]


def test_probe_cli_bad_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert eval_main(["probe", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    assert eval_main(["probe", "--model", str(tmp_path), "--max-new-tokens", "4"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
