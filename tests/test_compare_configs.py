"""Control runs and seeds at the config level: what a control config holds, which folder and overrides a seed
gets, what the orchestrator skips and says, and which seed orders the training blocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.orchestrate import stage_state
from pipeline.seeds import arm_name, parse_seeds, seed_configs, seed_overrides, seed_run_dir

REPO = Path(__file__).resolve().parents[1]
CONTROL_TWINS = [
    ("smoke-control.yaml", "smoke.yaml"),
    ("llama2-13b-control.yaml", "llama2-22b-readers.yaml"),
    ("llama2-13b-control.yaml", "llama2-22b.yaml"),
    ("llama2-13b-control.yaml", "llama2-22b-blocktriangular.yaml"),
]


@pytest.mark.parametrize(("control", "graft"), CONTROL_TWINS)
def test_a_control_config_trains_its_twins_base_with_the_twins_train_and_eval_sections(control, graft):
    control_config = load_config(REPO / "configs" / control)
    graft_config = load_config(REPO / "configs" / graft)
    assert control_config.is_control and not graft_config.is_control
    assert control_config.surgery.base == graft_config.surgery.base
    assert control_config.seed == graft_config.seed
    assert control_config.train == graft_config.train
    assert control_config.eval == graft_config.eval
    assert control_config.run_dir != graft_config.run_dir


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_control_run_has_no_surgery_stage_and_status_says_why(tmp_path):
    config = load_config(REPO / "configs/smoke-control.yaml", [f"run_dir={tmp_path / 'control'}"])
    assert stage_state(config, "surgery") == "skipped"
    assert stage_state(config, "train") == "missing"

    result = run_module("pipeline", "status", "configs/smoke-control.yaml", "--set", f"run_dir={tmp_path / 'control'}")
    assert result.returncode == 0, result.stderr
    surgery_line = result.stdout.splitlines()[0]
    assert surgery_line.split()[:2] == ["surgery", "skipped"]
    assert "control run" in surgery_line and "smollm2-135m-instruct" in surgery_line

    refused = run_module("surgery", "--config", "configs/smoke-control.yaml", "--set", f"run_dir={tmp_path / 'c'}")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "surgery.mode is none" in refused.stderr
    assert not (tmp_path / "c").exists()


def test_seeds_parse_strictly():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", "", "-1"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)


def test_each_seed_gets_its_own_folder_and_only_the_run_seed_changes(tmp_path):
    run_dir = tmp_path / "graft"
    config = load_config(REPO / "configs/smoke.yaml", [f"run_dir={run_dir}"])
    assert seed_run_dir(config, 0) == run_dir and seed_overrides(config, 0) == []
    (seed, own), (_, other) = seed_configs(str(REPO / "configs/smoke.yaml"), [f"run_dir={run_dir}"], [0, 3])
    assert (seed, own.run_dir, other.run_dir, other.seed) == (0, run_dir, tmp_path / "graft-seed3", 3)
    assert arm_name(other.run_dir.name) == arm_name(own.run_dir.name) == "graft"
    # The same slice for every seed; the widened model is built once, in the config's own folder.
    assert other.train.data == own.train.data and other.surgery == own.surgery and other.eval == own.eval
    assert other.train.model == str(run_dir / "surgery")
    assert stage_state(other, "surgery") == "skipped"

    control = load_config(REPO / "configs/smoke-control.yaml", [f"run_dir={tmp_path / 'control'}"])
    assert "train.model" not in " ".join(seed_overrides(control, 1))  # a control has no widened model to share

    result = run_module("pipeline", "status", "configs/smoke.yaml", "--set", f"run_dir={run_dir}", "--seeds", "0,3")
    assert result.returncode == 0, result.stderr
    assert f"== seed 0: {run_dir}\n" in result.stdout and f"== seed 3: {tmp_path / 'graft-seed3'}\n" in result.stdout
    assert f"train    missing   {tmp_path / 'graft-seed3' / 'train'}" in result.stdout


def first_blocks(seed: int, data_seed: int, tmp_path: Path, model_dir: Path) -> list[int]:
    """The block indices the train stage's Trainer draws first, for a run seed and a data seed."""
    from transformers import AutoModelForCausalLM

    from pipeline.config import TrainConfig
    from train.data import PackedBlocks
    from train.trainer import build_trainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    blocks = np.repeat(np.arange(64, dtype=np.int32)[:, None], 4, axis=1)  # block i holds token i
    # No held-out loss during training (train.eval_steps defaults on and needs held-out windows): only the order
    # the training blocks are drawn in is under test.
    train = TrainConfig(seq_len=4, grad_accum=1, eval_steps=None,
                        data={"sources": ["python-stdlib-docs"], "seed": data_seed})
    trainer = build_trainer(model, PackedBlocks(blocks), train, tmp_path / f"out-{seed}-{data_seed}", seed,
                            torch.device("cpu"))
    loader = iter(trainer.get_train_dataloader())
    return [int(next(loader)["input_ids"][0, 0]) for _ in range(8)]


def test_the_run_seed_orders_the_blocks_and_the_data_seed_does_not(tmp_path, tiny_llama):
    model_dir = tiny_llama("m")
    order = first_blocks(0, 0, tmp_path, model_dir)
    assert first_blocks(0, 7, tmp_path, model_dir) == order
    assert first_blocks(1, 0, tmp_path, model_dir) != order
