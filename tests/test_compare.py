"""`frankenllama compare` and `--seeds`, through the real orchestrator, over a tiny graft and its control.

A tiny random Llama (SmolLM2's tokenizer) is widened and trained, and trained as its own control (surgery.mode
none), each with seeds 0 and 1. Every seed folder finishes, the widened model is built once, the seeds train the
same tokens with different losses; `frankenllama compare` over seed 0 writes the 2023 table, whose numbers are
checked by hand against the two eval reports they come from, and over both seeds pairs the arms seed by seed with
error bars over the seeds. Runs that cannot be compared (other benchmark items, unfinished or stale) are refused.
The shipped smoke pair (configs/smoke.yaml and smoke-control.yaml) is checked for being twins in
tests/test_compare_configs.py; running it end to end here cost seven minutes of the suite for the same assertions.
"""

from __future__ import annotations

import json
import os
import shutil
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
STEPS, SEQ_LEN = 4, 32

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
        "train": {"max_steps": STEPS, "save_steps": 2, "seq_len": SEQ_LEN, "batch_size": 1, "grad_accum": 1,
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
        seen[name]["folder"] = root / name
        report = root / name / "eval" / "report.json"
        seen[name]["report"] = json.loads(report.read_text()) if report.is_file() else None
    seen["compare"] = frankenllama("compare", str(seen["graft"]["config"]), str(seen["control"]["config"]),
                                   "--out", str(root / "compare"))
    seen["compare-seeds"] = frankenllama("compare", str(seen["graft"]["config"]), str(seen["control"]["config"]),
                                         "--seeds", "0,1", "--out", str(root / "compare-seeds"))
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
    result = seeded["compare-seeds"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = seeded["root"] / "compare-seeds"
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


def test_the_control_trains_the_base_itself_and_reports_base_and_trained(seeded):
    control = seeded["control"]
    logs = control["seed1"].stdout + control["seeds"].stdout
    assert "[frankenllama] surgery: skipped, a control run (surgery.mode none)" in logs
    assert not (control["folder"] / "surgery").exists()
    assert [m["label"] for m in control["report"]["models"]] == ["base", "trained"]
    assert [m["label"] for m in seeded["graft"]["report"]["models"]] == ["base", "surgery", "trained"]
    train_manifest = json.loads((control["folder"] / "train" / "manifest.json").read_text())
    assert train_manifest["model"] == control["report"]["models"][0]["path"]


def test_compare_writes_the_2023_table_with_paired_differences_checked_by_hand(seeded):
    result = seeded["compare"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = seeded["root"] / "compare"
    comparison = json.loads((out / "report.json").read_text())
    assert comparison["reference"] == "control"  # the control, by default
    assert {r["name"]: r["control"] for r in comparison["runs"]} == {"graft": False, "control": True}
    markdown = (out / "report.md").read_text()
    assert "| model | Average | ARC (0-shot) | HellaSwag (0-shot) | MMLU (0-shot) | TruthfulQA (0-shot) |" in markdown
    for row in ("| base |", "| graft surgery |", "| graft trained |", "| control trained |",
                "| Δ graft − control |"):
        assert row in markdown, row

    (delta,) = comparison["benchmarks"]["deltas"]
    graft = seeded["graft"]["report"]["benchmarks"]["item_scores"]["trained"]
    control = seeded["control"]["report"]["benchmarks"]["item_scores"]["trained"]
    for task in ("arc_challenge", "hellaswag", "truthfulqa_mc2"):
        items = sorted(graft[task])
        assert items == sorted(control[task])
        by_hand = sum(graft[task][i] - control[task][i] for i in items) / len(items)
        assert delta["scores"][task]["value"] == pytest.approx(by_hand, abs=1e-12)
        assert delta["scores"][task]["n"] == len(items)


def test_compare_puts_the_held_out_loss_at_equal_tokens_and_both_runs_in_one_plot(seeded):
    out = seeded["root"] / "compare"
    comparison = json.loads((out / "report.json").read_text())
    (final,) = comparison["heldout"]["final"]
    assert final["tokens"] == final["reference_tokens"] == STEPS * SEQ_LEN
    graft = seeded["graft"]["report"]["perplexity"]["trained"]
    control = seeded["control"]["report"]["perplexity"]["trained"]
    assert final["delta"]["value"] == pytest.approx(graft["bits_per_byte"] - control["bits_per_byte"], rel=1e-9)
    assert final["over"] == "paired over documents" and final["delta"]["n"] == graft["documents"] >= 2
    assert final["delta"]["stderr"] > 0
    assert "### Trains faster?" in (out / "report.md").read_text()
    # Without the train stage's in-training held-out entries the report says so, and compares eval's numbers.
    if not comparison["heldout"]["curve_logged"]:
        assert any("no in-training held-out curve logged" in note for note in comparison["notes"])
    reach = comparison["heldout"]["reach_training_loss"]
    assert {row["run"] for row in reach["runs"]} == {"graft", "control"}
    # The training loss in a first pass is scored on unseen blocks, the same ones for both (same seed): by hand,
    # the first stretch's mean per-step difference from the two log histories.
    training = comparison["heldout"]["training_loss"]
    assert training["first_pass"] and all(r["over"] == "steps, on the same unseen blocks" for r in training["rows"])
    losses = {name: {e["tokens_seen"]: e["loss"] for e in json.loads(
        (seeded[name]["folder"] / "train" / "log_history.json").read_text()) if "loss" in e}
        for name in ("graft", "control")}
    first = training["rows"][0]
    tokens = [t for t in sorted(losses["graft"]) if first["from_tokens"] <= t <= first["to_tokens"]]
    by_hand = sum(losses["graft"][t] - losses["control"][t] for t in tokens) / len(tokens)
    assert first["delta"]["value"] == pytest.approx(by_hand) and first["delta"]["n"] == len(tokens)

    assert comparison["plots"]["training_loss.png"] == ["graft", "control"]
    assert (out / "training_loss.png").stat().st_size > 10_000
    assert (out / "benchmarks.png").is_file()
    checks = {(row["run"], row["model"]): row["verdict"] for row in comparison["checks"]}
    assert set(checks) == {("graft", "base"), ("graft", "surgery"), ("graft", "trained"), ("control", "base"),
                           ("control", "trained")}


def test_compare_logs_its_tables_to_one_wandb_group(seeded):
    out = seeded["root"] / "compare"
    (offline_run,) = (out / "wandb").glob("offline-run-*")
    (table_file,) = (offline_run / "files" / "media" / "table" / "compare").glob("benchmarks_*.table.json")
    table = json.loads(table_file.read_text())
    comparison = json.loads((out / "report.json").read_text())
    section = comparison["benchmarks"]
    assert [row[0] for row in table["data"]] == [row["label"] for row in section["rows"] + section["deltas"]]


def copy_run(source: Path, target: Path) -> Path:
    """A run folder without its model weights: what compare reads (reports, manifests, log history)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("merged", "adapter", "checkpoint-*", "data",
                                                                  "surgery", "*.safetensors"))
    return target


def refused(*args: str) -> str:
    result = frankenllama("compare", *args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-2000:]
    return errors[0]


def test_runs_scored_on_other_benchmark_items_are_refused(seeded, tmp_path):
    other = copy_run(seeded["control"]["folder"], tmp_path / "control-other-items")
    report_path = other / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    dropped = report["benchmarks"]["items"]["arc_challenge"].pop()
    for scores in report["benchmarks"]["item_scores"].values():
        del scores["arc_challenge"][str(dropped)]
    report_path.write_text(json.dumps(report))
    error = refused(str(seeded["graft"]["folder"]), str(other), "--reference", "control-other-items",
                    "--out", str(tmp_path / "out"))
    assert "different benchmark items (arc_challenge" in error
    assert not (tmp_path / "out").exists()


def test_unfinished_and_stale_runs_are_refused_naming_the_stage(seeded, tmp_path):
    unfinished = copy_run(seeded["control"]["folder"], tmp_path / "control-unfinished")
    (unfinished / "train" / "manifest.json").unlink()
    error = refused(str(seeded["graft"]["folder"]), str(unfinished), "--out", str(tmp_path / "out"))
    assert f"{unfinished}: train is still in progress" in error

    stale = refused(str(seeded["graft"]["config"]), "--set", "eval.probe.prompts=3", "--out", str(tmp_path / "out"))
    assert f"{seeded['graft']['folder']}: eval is stale for this config" in stale
    assert not (tmp_path / "out").exists()


def test_a_run_whose_trained_model_degenerated_is_compared_with_its_verdict(seeded, tmp_path):
    """Eval judged the trained model DEGENERATE: its report is written without a manifest and without that model's
    benchmarks (what eval does by default). That is a finished run with the 2023 failure, not one in progress."""
    degenerate = copy_run(seeded["graft"]["folder"], tmp_path / "graft-degenerate")
    (degenerate / "eval" / "manifest.json").unlink()
    report_path = degenerate / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    report["exit_code"] = 3
    report["verdicts"]["trained"] = report["probe"]["judgements"]["trained"]["verdict"] = "DEGENERATE"
    del report["benchmarks"]["item_scores"]["trained"]
    report["benchmarks"]["not_run"]["trained"] = "DEGENERATE in the probe (eval.probe.skip_benchmarks_on_degenerate)"
    report_path.write_text(json.dumps(report))
    result = frankenllama("compare", str(degenerate), str(seeded["control"]["folder"]), "--out",
                          str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| graft-degenerate | trained | **DEGENERATE** |" in markdown
    assert "| graft-degenerate trained | not run: DEGENERATE in the probe" in markdown
    assert "| Δ graft-degenerate − control | not available: graft-degenerate has no trained benchmark" in markdown
