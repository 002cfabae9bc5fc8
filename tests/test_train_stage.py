"""The train stage end to end through its CLI, on a tiny Llama with SmolLM2's tokenizer and the bundled corpus:
the loss falls, outputs and manifest appear, wandb offline leaves a run folder, a SIGKILLed run resumes with
the same losses and wandb run id, and bad input fails with one line before any work."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    assert_merged_export_differs_from_base,
    copy_tokenizer,
    kill_after_first_checkpoint,
    write_tiny_llama,
)

from pipeline.config import load_config
from pipeline.runs import read_manifest, stage_fingerprint, write_manifest
from train.cli import main as train_main
from train.data import BUNDLED_SOURCES
from train.trainer import newest_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 24
SAVE_STEPS = 4
EVAL_STEPS = 8


def stage_config(run_dir: Path, model_dir: Path | None, **train_overrides) -> dict:
    train = {
        "model": str(model_dir) if model_dir else None,
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
        "seq_len": 64,
        "grad_accum": 2,
        "quantization": "nf4",
        "learning_rate": 0.01,
        "warmup_ratio": 0.0,  # so a run started with a larger max_steps follows the same schedule
        "data": {"sources": ["python-stdlib-docs"], "tokens": 1500, "heldout_fraction": 0.1},
        "lora": {"r": 8, "alpha": 16},
        "eval_steps": EVAL_STEPS,
        "eval_blocks": 3,
        "wandb": {"mode": "offline"},
    }
    train.update(train_overrides)
    return {"run_dir": str(run_dir), "seed": 0, "train": train}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_stage(config: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "train", "--config", str(config), *args], cwd=REPO, env=env,
                            **popen)


def losses(train_dir: Path) -> dict[int, float]:
    history = json.loads((train_dir / "log_history.json").read_text())
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def heldout_losses(train_dir: Path) -> dict[int, dict]:
    history = json.loads((train_dir / "log_history.json").read_text())
    return {entry["step"]: entry for entry in history if "heldout_loss" in entry}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir) -> Path:
    folder = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", vocab_size=49152, hidden_size=64,
                              intermediate_size=128)
    return copy_tokenizer(smollm2_dir, folder)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """One uninterrupted run: (its config file, its train folder)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(root / "config.yaml", stage_config(root / "run", tiny_model))
    process = run_stage(config, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return config, root / "run" / "train"


def test_tiny_model_trains_its_loss_falls_and_the_stage_exports(finished_run, tiny_model):
    config, train_dir = finished_run
    manifest = read_manifest(train_dir)
    assert manifest["fingerprint"] == stage_fingerprint(load_config(config), "train")
    assert manifest["steps"] == MAX_STEPS and manifest["quantization"] == "nf4"
    loss = losses(train_dir)
    assert sorted(loss) == list(range(1, MAX_STEPS + 1))
    first, last = sum(loss[s] for s in range(1, 5)) / 4, sum(loss[s] for s in range(MAX_STEPS - 3, MAX_STEPS + 1)) / 4
    assert last < first - 0.5, loss
    logged = json.loads((train_dir / "log_history.json").read_text())
    assert all(entry["tokens_per_second"] > 0 for entry in logged if "loss" in entry and entry["step"] > 1)
    train = load_config(config).train
    tokens_per_step = train.batch_size * train.grad_accum * train.seq_len
    assert all(entry["tokens_seen"] == entry["step"] * tokens_per_step for entry in logged if "loss" in entry)
    assert all("grad_norm" in entry and "learning_rate" in entry for entry in logged if "loss" in entry)

    heldout = [json.loads(line) for line in (train_dir / "heldout.jsonl").read_text().splitlines()]
    assert heldout and all(set(record) == {"text"} and record["text"] for record in heldout)
    assert_merged_export_differs_from_base(train_dir, tiny_model)
    assert manifest["merge"]["into"] == "dequantized_nf4" and manifest["merge"]["adapted_tensors"] == 2 * 7

    evaluated = heldout_losses(train_dir)
    assert sorted(evaluated) == list(range(0, MAX_STEPS + 1, EVAL_STEPS))  # at the start, every 8 steps, the end
    assert all(entry["tokens_seen"] == step * tokens_per_step for step, entry in evaluated.items())
    assert evaluated[MAX_STEPS]["heldout_loss"] < evaluated[0]["heldout_loss"] - 0.5
    assert len({entry["heldout_tokens"] for entry in evaluated.values()}) == 1  # one fixed set

    checkpoints = sorted(p.name for p in train_dir.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-16", "checkpoint-20", "checkpoint-24"]  # save_total_limit 3

    watchdog = [json.loads(line) for line in (train_dir / "watchdog.jsonl").read_text().splitlines()]
    assert [record["step"] for record in watchdog] == [0]  # probed as training started (every 50 steps after)

    run_id = (train_dir / "wandb_run_id").read_text().strip()
    assert manifest["wandb_run_id"] == run_id
    run_folders = list((train_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_folders) == 1 and list(run_folders[0].glob("*.wandb"))


def test_the_last_held_out_loss_is_what_the_eval_stage_measures_on_the_merged_model(finished_run):
    """The same documents scored by eval's perplexity (its own windows and byte count) on the exported model: the
    numbers training logged, since the dequantized-NF4 merge computes what was trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.perplexity import heldout_perplexity
    from train.heldout import heldout_windows, read_texts

    config, train_dir = finished_run
    train = load_config(config).train
    tokenizer = AutoTokenizer.from_pretrained(train_dir / "merged")
    texts = heldout_windows(read_texts(train_dir / "heldout.jsonl"), tokenizer, train.seq_len, train.eval_blocks).texts
    merged = AutoModelForCausalLM.from_pretrained(train_dir / "merged", dtype=torch.float32)
    measured = heldout_perplexity(merged, tokenizer, texts, window=train.seq_len - 1)
    logged = heldout_losses(train_dir)[MAX_STEPS]
    assert logged["heldout_tokens"] == measured.predicted_tokens
    assert logged["heldout_bits_per_byte"] == pytest.approx(measured.bits_per_byte, rel=1e-4)
    assert logged["heldout_loss"] == pytest.approx(measured.nll_nats / measured.predicted_tokens, rel=1e-4)


def carried_run(box: Path, model_dir: Path | None = None) -> Path:
    """The config of a run in `box`: its model is the finished surgery output inside the run folder, its data a
    local file beside it (the bundled corpus's bytes, so its slice is the uninterrupted run's). With `model_dir`
    the box is set up first; without, the box was carried here and only its config is rewritten for the new paths.
    """
    data = box / "corpus.jsonl.gz"
    if model_dir is not None:
        surgery_dir = box / "run" / "surgery"
        shutil.copytree(model_dir, surgery_dir)
        write_manifest(surgery_dir, "surgery", fingerprint="made-by-hand")
        shutil.copyfile(BUNDLED_SOURCES["python-stdlib-docs"], data)
    config = stage_config(box / "run", None)
    config["train"]["data"]["sources"] = [str(data)]
    return write_config(box / "config.yaml", config)


def test_a_sigkilled_run_moved_or_copied_elsewhere_resumes_with_the_same_losses(tmp_path, tiny_model, finished_run,
                                                                                capsys):
    config = carried_run(tmp_path / "box-a", tiny_model)
    train_dir = tmp_path / "box-a" / "run" / "train"
    # The killed run aims far past MAX_STEPS so it cannot finish before the kill; with no warmup its schedule
    # is the same constant one.
    process = run_stage(config, "--set", "train.max_steps=100000", stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    kill_after_first_checkpoint(process, train_dir, timeout=240)
    killed_at = newest_complete_checkpoint(train_dir)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < MAX_STEPS
    assert read_manifest(train_dir) is None
    run_id = (train_dir / "wandb_run_id").read_text().strip()

    # One copy with fresh mtimes everywhere (cp -r without -p), then the original moved (its mtimes kept).
    shutil.copytree(tmp_path / "box-a", tmp_path / "copied", copy_function=shutil.copyfile)
    (tmp_path / "box-a").rename(tmp_path / "moved")
    copied, moved = carried_run(tmp_path / "copied"), carried_run(tmp_path / "moved")
    data = tmp_path / "copied" / "corpus.jsonl.gz"
    assert data.stat().st_mtime_ns != (tmp_path / "moved" / "corpus.jsonl.gz").stat().st_mtime_ns

    with gzip.open(BUNDLED_SOURCES["python-stdlib-docs"], "rt", encoding="utf-8") as handle:
        documents = handle.readlines()
    with gzip.open(data, "wt", encoding="utf-8") as handle:  # really changed: one document less
        handle.writelines(documents[1:])
    assert train_main(["--config", str(copied)]) == 2
    refused = capsys.readouterr().err.strip().splitlines()[-1]
    assert "changed: data_slice" in refused and "--no-resume" in refused, refused
    shutil.copyfile(BUNDLED_SOURCES["python-stdlib-docs"], data)  # the same bytes again, another mtime

    expected = losses(finished_run[1])
    for config in (copied, moved):
        resumed = run_stage(config, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, output[-3000:]
        train_dir = config.parent / "run" / "train"
        assert f"resuming from {train_dir / killed_at.name}" in output
        got = losses(train_dir)
        assert sorted(got) == sorted(expected)
        for step, loss in expected.items():
            assert got[step] == pytest.approx(loss, rel=1e-4), f"{config.parent.name}: step {step}"
        expected_heldout, got_heldout = heldout_losses(finished_run[1]), heldout_losses(train_dir)
        assert sorted(got_heldout) == sorted(expected_heldout)
        for step, entry in expected_heldout.items():
            assert got_heldout[step]["heldout_loss"] == pytest.approx(entry["heldout_loss"], rel=1e-4), step
        assert (train_dir / "wandb_run_id").read_text().strip() == run_id
        assert read_manifest(train_dir)["wandb_run_id"] == run_id
        assert len(list((train_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # one folder per process


def test_complete_stage_is_not_retrained_and_changed_settings_do_not_resume(finished_run, capsys):
    config, train_dir = finished_run
    before = (train_dir / "manifest.json").read_text()
    assert train_main(["--config", str(config)]) == 0
    assert (train_dir / "manifest.json").read_text() == before

    assert train_main(["--config", str(config), "--set", "train.lora.r=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [line for line in err if line.startswith("error: ")] and len(err) == 1
    assert "changed: train.lora.r" in err[0] and "--no-resume" in err[0]
    assert (train_dir / "manifest.json").read_text() == before


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"model": None}, "run surgery first"),
        ({"model": "/nonexistent/model"}, "'/nonexistent/model' not found"),
        ({"data": {"sources": ["BAD"], "tokens": 1500}}, "not readable jsonl"),
        ({"data": {"sources": ["python-stdlib-docs"], "tokens": 50_000_000}}, "fewer than the slice"),
        ({"seq_len": 512}, "beyond the model's context of 256 tokens"),
    ],
    ids=["missing-model", "unknown-model", "unreadable-data", "slice-too-large", "seq-len-beyond-context"],
)
def test_bad_input_fails_with_one_line_and_leaves_nothing(tmp_path, tiny_model, capsys, overrides, fragment):
    bad_data = tmp_path / "bad.jsonl.gz"
    bad_data.write_bytes(b"not gzip at all")
    if "data" in overrides:
        overrides["data"]["sources"] = [str(bad_data) if s == "BAD" else s for s in overrides["data"]["sources"]]
    config = write_config(tmp_path / "config.yaml", stage_config(tmp_path / "run", tiny_model, **overrides))
    model_before = _snapshot(tiny_model)
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # progress bars share stderr
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == errors[0]
    assert _snapshot(tiny_model) == model_before
    assert not (tmp_path / "run" / "train").exists()  # failed before the stage folder was touched


def test_cli_exit_code_and_no_traceback(tmp_path, tiny_model):
    config = write_config(tmp_path / "config.yaml", stage_config(tmp_path / "run", tiny_model, model=None))
    process = run_stage(config, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert err.strip().startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
