"""`--seeds` through the real orchestrator, and a comparison of two arms over two seeds each.

A tiny random Llama (SmolLM2's tokenizer) is widened and trained, and trained as its own control, each with seeds
0 and 1: every seed folder finishes, the widened model is built once, the seeds train the same tokens with
different losses, and `frankenllama compare` pairs the arms seed by seed with error bars over the seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_tokenizer, write_tiny_llama

from eval.benchmarks import FIXTURES_DIR

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}
STEPS = 4

# Four runs: 278 to 490 s on two cores shared with other jobs (load average 4 to 7), near pytest's default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def tiny_config(run_dir: Path, base: Path, mode: str) -> dict:
    surgery = {"base": str(base), "mode": mode}
    if mode != "none":
        surgery.update(donor="random", dtype="float32", target={"hidden_size": 96, "num_attention_heads": 6,
                                                                "num_key_value_heads": 6, "intermediate_size": 192})
    return {
        "run_dir": str(run_dir),
        "seed": 0,
        "surgery": surgery,
        "train": {"max_steps": STEPS, "save_steps": 2, "seq_len": 32, "batch_size": 1, "grad_accum": 1,
                  "quantization": "none", "gradient_checkpointing": False, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                  "data": {"sources": ["python-stdlib-docs"], "tokens": 4000, "heldout_fraction": 0.1},
                  "lora": {"r": 4, "alpha": 8}, "watchdog": {"enabled": False}, "wandb": {"mode": "offline"}},
        "eval": {"probe": {"prompts": 1, "max_new_tokens": 16, "batch_size": 1, "fail_on_degenerate": False,
                           "skip_benchmarks_on_degenerate": False},
                 "preservation": {"texts": 1, "max_tokens": 16}, "perplexity": {"max_texts": 3, "window": 64},
                 "benchmarks": {"data_dir": str(FIXTURES_DIR), "arc_challenge": {"n": 2, "num_fewshot": 0},
                                "hellaswag": {"n": 2, "num_fewshot": 0}, "mmlu": {"n": 1, "num_fewshot": 0},
                                "truthfulqa_mc2": {"n": 2, "num_fewshot": 0}}},
    }


def frankenllama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, smollm2_dir) -> dict:
    root = tmp_path_factory.mktemp("seeds")
    base = copy_tokenizer(smollm2_dir, write_tiny_llama(root / "tiny", hidden_size=64, num_attention_heads=4,
                                                        num_key_value_heads=4, head_dim=16, intermediate_size=128,
                                                        vocab_size=49152))
    seen: dict = {"root": root}
    for name, mode in (("graft", "readers"), ("control", "none")):
        config = root / f"{name}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(root / name, base, mode)))
        # Seed 1 first: the graft's widened model is built in the config's own folder before seed 1 trains it.
        seen[name] = {"config": config, "seed1": frankenllama("run", str(config), "--seeds", "1")}
        seen[name]["seeds"] = frankenllama("run", str(config), "--seeds", "0,1")
        seen[name]["status"] = frankenllama("status", str(config), "--seeds", "0,1")
    seen["compare"] = frankenllama("compare", str(seen["graft"]["config"]), str(seen["control"]["config"]),
                                   "--seeds", "0,1", "--out", str(root / "compare"))
    return seen


def history(folder: Path) -> list[dict]:
    return json.loads((folder / "train" / "log_history.json").read_text())


def test_every_seed_runs_in_its_own_folder_on_the_same_tokens(seeded):
    root = seeded["root"]
    for name in ("graft", "control"):
        for key in ("seed1", "seeds"):
            result = seeded[name][key]
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # The second call found seed 1 complete and ran only seed 0, the config's own.
        second = seeded[name]["seeds"].stdout
        assert f"seed 0 (1 of 2): {root / name}\n" in second and f"seed 1 (2 of 2): {root / f'{name}-seed1'}" in second
        assert second.count(", running") == 2  # seed 0's train and eval
        states = [line.split()[:2] for line in seeded[name]["status"].stdout.splitlines() if not line.startswith(" ")]
        assert states == [["==", "seed"], ["surgery", "complete" if name == "graft" else "skipped"],
                          ["train", "complete"], ["eval", "complete"],
                          ["==", "seed"], ["surgery", "skipped"], ["train", "complete"], ["eval", "complete"]]
        slices = {json.loads((root / folder / "train" / "manifest.json").read_text())["data"]["key"]
                  for folder in (name, f"{name}-seed1")}
        assert len(slices) == 1
        losses = [[e["loss"] for e in history(root / folder) if "loss" in e] for folder in (name, f"{name}-seed1")]
        assert len(losses[0]) == len(losses[1]) == STEPS and losses[0] != losses[1]
        seeds = [json.loads((root / f / "eval" / "report.json").read_text())["seed"] for f in (name, f"{name}-seed1")]
        assert seeds == [0, 1]
    # The widened model was built once, before seed 1 trained it; seed 1 has no surgery of its own.
    assert "[frankenllama] surgery: missing, running" in seeded["graft"]["seed1"].stdout
    assert not (root / "graft-seed1" / "surgery").exists()
    seed1_train = json.loads((root / "graft-seed1" / "train" / "manifest.json").read_text())
    assert seed1_train["model"] == str(root / "graft" / "surgery")


def test_compare_pairs_the_arms_seed_by_seed_with_error_bars_over_seeds(seeded):
    result = seeded["compare"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = seeded["root"] / "compare"
    comparison = json.loads((out / "report.json").read_text())
    assert comparison["reference"] == "control"
    assert comparison["arms"] == {"graft": ["graft", "graft-seed1"], "control": ["control", "control-seed1"]}
    deltas = comparison["benchmarks"]["deltas"]
    assert [d["label"] for d in deltas] == ["Δ graft − control", "Δ graft-seed1 − control-seed1",
                                            "Δ graft − control, mean of 2 seeds"]
    for task in ("arc_challenge", "truthfulqa_mc2"):
        per_seed = [d["scores"][task]["value"] for d in deltas[:2]]
        assert deltas[2]["scores"][task]["value"] == pytest.approx(sum(per_seed) / 2)
        assert deltas[2]["scores"][task]["n"] == 2

    final = comparison["heldout"]["final"]
    assert [row["run"] for row in final] == ["graft", "graft-seed1", "mean of 2 seeds"]
    assert final[2]["over"] == "seeds" and final[2]["delta"]["stderr"] is not None
    assert final[2]["delta"]["value"] == pytest.approx((final[0]["delta"]["value"] + final[1]["delta"]["value"]) / 2)
    over_seeds = [row for row in comparison["heldout"]["training_loss"]["rows"] if row["over"] == "seeds"]
    assert over_seeds and all(row["delta"]["n"] == 2 for row in over_seeds)
    assert comparison["plots"]["training_loss.png"] == ["graft", "control"]
    assert "mean of 2 seeds" in (out / "report.md").read_text()
