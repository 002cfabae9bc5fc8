"""`frankenllama compare` over the smoke graft and its control, both run end to end through the orchestrator.

The pair is configs/smoke.yaml and configs/smoke-control.yaml (real SmolLM2, its widening, real training and eval)
with fewer steps and probe prompts; the comparison's numbers are then checked against the two eval reports they
come from, by hand. Runs that cannot be compared (other benchmark items, unfinished or stale) are refused.
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

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}
STEPS, SEQ_LEN = 6, 128
# The smoke pair, shrunk the same way for both: fewer steps, no watchdog, fewer probe prompts and texts, no shots.
SHRINK = {"train": {"max_steps": STEPS, "save_steps": 3, "watchdog": {"enabled": False}},
          "eval": {"probe": {"prompts": 2, "max_new_tokens": 16}, "perplexity": {"max_texts": 4},
                   "preservation": {"texts": 2},
                   "benchmarks": {name: {"num_fewshot": 0} for name in ("arc_challenge", "hellaswag", "mmlu")}}}

# Two runs, five models evaluated: 620 s on two cores shared with other jobs (load average about 5).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def merged(tree: dict, changes: dict) -> dict:
    out = dict(tree)
    for key, value in changes.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def write_config(root: Path, name: str) -> Path:
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merged(raw, {"run_dir": str(root / name), **SHRINK})))
    return path


def frankenllama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pair")
    seen: dict = {"root": root}
    for name in ("smoke", "smoke-control"):
        config = write_config(root, name)
        result = frankenllama("run", str(config))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        seen[name] = {"config": config, "run": result, "folder": root / name,
                      "report": json.loads((root / name / "eval" / "report.json").read_text())}
    seen["compare"] = frankenllama("compare", str(seen["smoke"]["config"]), str(seen["smoke-control"]["config"]),
                                   "--out", str(root / "compare"))
    return seen


def test_the_control_trains_the_base_itself_and_reports_base_and_trained(pair):
    control = pair["smoke-control"]
    assert "[frankenllama] surgery: skipped, a control run (surgery.mode none)" in control["run"].stdout
    assert not (control["folder"] / "surgery").exists()
    assert [m["label"] for m in control["report"]["models"]] == ["base", "trained"]
    assert [m["label"] for m in pair["smoke"]["report"]["models"]] == ["base", "surgery", "trained"]
    train_manifest = json.loads((control["folder"] / "train" / "manifest.json").read_text())
    assert train_manifest["model"] == control["report"]["models"][0]["path"]


def test_compare_writes_the_2023_table_with_paired_differences_checked_by_hand(pair):
    result = pair["compare"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = pair["root"] / "compare"
    comparison = json.loads((out / "report.json").read_text())
    assert comparison["reference"] == "smoke-control"  # the control, by default
    assert {r["name"]: r["control"] for r in comparison["runs"]} == {"smoke": False, "smoke-control": True}
    markdown = (out / "report.md").read_text()
    assert "| model | Average | ARC (0-shot) | HellaSwag (0-shot) | MMLU (0-shot) | TruthfulQA (0-shot) |" in markdown
    for row in ("| base |", "| smoke surgery |", "| smoke trained |", "| smoke-control trained |",
                "| Δ smoke − smoke-control |"):
        assert row in markdown, row

    (delta,) = comparison["benchmarks"]["deltas"]
    graft = pair["smoke"]["report"]["benchmarks"]["item_scores"]["trained"]
    control = pair["smoke-control"]["report"]["benchmarks"]["item_scores"]["trained"]
    for task in ("arc_challenge", "hellaswag", "truthfulqa_mc2"):
        items = sorted(graft[task])
        assert items == sorted(control[task])
        by_hand = sum(graft[task][i] - control[task][i] for i in items) / len(items)
        assert delta["scores"][task]["value"] == pytest.approx(by_hand, abs=1e-12)
        assert delta["scores"][task]["n"] == len(items)


def test_compare_puts_the_held_out_loss_at_equal_tokens_and_both_runs_in_one_plot(pair):
    out = pair["root"] / "compare"
    comparison = json.loads((out / "report.json").read_text())
    (final,) = comparison["heldout"]["final"]
    assert final["tokens"] == final["reference_tokens"] == STEPS * SEQ_LEN
    graft = pair["smoke"]["report"]["perplexity"]["trained"]
    control = pair["smoke-control"]["report"]["perplexity"]["trained"]
    assert final["delta"]["value"] == pytest.approx(graft["bits_per_byte"] - control["bits_per_byte"], rel=1e-9)
    assert final["over"] == "paired over documents" and final["delta"]["n"] == graft["documents"] == 4
    assert final["delta"]["stderr"] > 0
    assert "### Trains faster?" in (out / "report.md").read_text()
    # Without the train stage's in-training held-out entries the report says so, and compares eval's numbers.
    if not comparison["heldout"]["curve_logged"]:
        assert any("no in-training held-out curve logged" in note for note in comparison["notes"])
    reach = comparison["heldout"]["reach_training_loss"]
    assert {row["run"] for row in reach["runs"]} == {"smoke", "smoke-control"}
    # The training loss in a first pass is scored on unseen blocks, the same ones for both (same seed): by hand,
    # the first stretch's mean per-step difference from the two log histories.
    training = comparison["heldout"]["training_loss"]
    assert training["first_pass"] and all(r["over"] == "steps, on the same unseen blocks" for r in training["rows"])
    losses = {name: {e["tokens_seen"]: e["loss"] for e in json.loads(
        (pair[name]["folder"] / "train" / "log_history.json").read_text()) if "loss" in e}
        for name in ("smoke", "smoke-control")}
    first = training["rows"][0]
    tokens = [t for t in sorted(losses["smoke"]) if first["from_tokens"] <= t <= first["to_tokens"]]
    by_hand = sum(losses["smoke"][t] - losses["smoke-control"][t] for t in tokens) / len(tokens)
    assert first["delta"]["value"] == pytest.approx(by_hand) and first["delta"]["n"] == len(tokens)

    assert comparison["plots"]["training_loss.png"] == ["smoke", "smoke-control"]
    assert (out / "training_loss.png").stat().st_size > 10_000
    assert (out / "benchmarks.png").is_file()
    checks = {(row["run"], row["model"]): row["verdict"] for row in comparison["checks"]}
    assert set(checks) == {("smoke", "base"), ("smoke", "surgery"), ("smoke", "trained"), ("smoke-control", "base"),
                           ("smoke-control", "trained")}


def test_compare_logs_its_tables_to_one_wandb_group(pair):
    out = pair["root"] / "compare"
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


def test_runs_scored_on_other_benchmark_items_are_refused(pair, tmp_path):
    other = copy_run(pair["smoke-control"]["folder"], tmp_path / "smoke-other-items")
    report_path = other / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    dropped = report["benchmarks"]["items"]["arc_challenge"].pop()
    for scores in report["benchmarks"]["item_scores"].values():
        del scores["arc_challenge"][str(dropped)]
    report_path.write_text(json.dumps(report))
    error = refused(str(pair["smoke"]["folder"]), str(other), "--reference", "smoke-other-items",
                    "--out", str(tmp_path / "out"))
    assert "different benchmark items (arc_challenge" in error
    assert not (tmp_path / "out").exists()


def test_unfinished_and_stale_runs_are_refused_naming_the_stage(pair, tmp_path):
    unfinished = copy_run(pair["smoke-control"]["folder"], tmp_path / "smoke-unfinished")
    (unfinished / "train" / "manifest.json").unlink()
    error = refused(str(pair["smoke"]["folder"]), str(unfinished), "--out", str(tmp_path / "out"))
    assert f"{unfinished}: train is still in progress" in error

    stale = refused(str(pair["smoke"]["config"]), "--set", "eval.probe.prompts=3", "--out", str(tmp_path / "out"))
    assert f"{pair['smoke']['folder']}: eval is stale for this config" in stale
    assert not (tmp_path / "out").exists()


def test_a_run_whose_trained_model_degenerated_is_compared_with_its_verdict(pair, tmp_path):
    """Eval judged the trained model DEGENERATE: its report is written without a manifest and without that model's
    benchmarks (what eval does by default). That is a finished run with the 2023 failure, not one in progress."""
    degenerate = copy_run(pair["smoke"]["folder"], tmp_path / "smoke-degenerate")
    (degenerate / "eval" / "manifest.json").unlink()
    report_path = degenerate / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    report["exit_code"] = 3
    report["verdicts"]["trained"] = report["probe"]["judgements"]["trained"]["verdict"] = "DEGENERATE"
    del report["benchmarks"]["item_scores"]["trained"]
    report["benchmarks"]["not_run"]["trained"] = "DEGENERATE in the probe (eval.probe.skip_benchmarks_on_degenerate)"
    report_path.write_text(json.dumps(report))
    result = frankenllama("compare", str(degenerate), str(pair["smoke-control"]["folder"]), "--out",
                          str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| smoke-degenerate | trained | **DEGENERATE** |" in markdown
    assert "| smoke-degenerate trained | not run: DEGENERATE in the probe" in markdown
    assert "| Δ smoke-degenerate − smoke-control | not available: smoke-degenerate has no trained benchmark" in markdown
