"""The train stage as two processes through its real launch path (accelerate launch, gloo on CPU), on a tiny Llama
with SmolLM2's tokenizer and the bundled corpus.

Two runs train the same 8 steps, each SIGKILLed after a checkpoint and resumed on the other number of processes:
- `one_then_two`: one process, resumed by the orchestrator as `--num-gpus 2` (scripts/run_all.sh's path);
- `two_then_one`: two processes (`python -m train --set train.num_gpus=2`; only the launching process is killed,
  its workers must die with it), resumed by one process.
Without dropout every step's loss depends only on the weights and the blocks it trains on, so equal losses at
every step in both runs mean both saw the config's global batch, in the same order, across both resumptions; equal
held-out losses mean the evaluation split over two processes scores what one process scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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

from pipeline.runs import read_manifest
from train.cli import main as train_main
from train.trainer import checkpoint_processes, newest_complete_checkpoint
from train.world import keep_one_process_on_one_gpu

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
SEQ_LEN, GRAD_ACCUM = 32, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


def stage_config(run_dir: Path, model_dir: Path) -> dict:
    """Plain LoRA (no 4-bit: the launch path is under test, and tests/test_train_4bit.py covers NF4), no dropout."""
    train = {
        "model": str(model_dir), "max_steps": STEPS, "save_steps": 2, "seq_len": SEQ_LEN, "grad_accum": GRAD_ACCUM,
        "quantization": "none", "gradient_checkpointing": False, "learning_rate": 0.01, "warmup_ratio": 0.0,
        "data": {"sources": ["python-stdlib-docs"], "tokens": 1500, "heldout_fraction": 0.1},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "eval_steps": 2, "eval_blocks": 3,  # three windows over two processes: one is repeated to even the shards
        "watchdog": {"enabled": False},
        "wandb": {"mode": "offline"},
    }
    return {"run_dir": str(run_dir), "seed": 0, "train": train}


def write_config(folder: Path, model_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(stage_config(folder / "run", model_dir)))
    return path


def run(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, **popen)


def finish(args: list[str]) -> str:
    process = run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-4000:]
    return output


def history(train_dir: Path, key: str = "loss") -> dict[int, dict]:
    entries = json.loads((train_dir / "log_history.json").read_text())
    return {entry["step"]: entry for entry in entries if key in entry}


def processes_running(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker` (the test's own config path)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir) -> Path:
    folder = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", vocab_size=49152, hidden_size=64,
                              intermediate_size=128)
    return copy_tokenizer(smollm2_dir, folder)


def kill_launcher_after_first_checkpoint(config: Path, processes: int) -> Path:
    """Start `python -m train` on `processes` processes, aimed far past STEPS (with no warmup its schedule is the
    same), SIGKILL it (only it, not its workers) once a checkpoint is complete, check nothing it started lives on;
    returns the checkpoint (rotation deletes it later)."""
    train_dir = config.parent / "run" / "train"
    args = ["-m", "train", "--config", str(config), "--set", "train.max_steps=100000",
            "--set", f"train.num_gpus={processes}"]
    launcher = run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_first_checkpoint(launcher, train_dir, timeout=180)
    deadline = time.monotonic() + 10
    while processes_running(str(config)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_running(str(config)) == [], "worker processes survived their launcher"
    killed_at = newest_complete_checkpoint(train_dir)
    assert killed_at is not None and read_manifest(train_dir) is None
    assert checkpoint_processes(killed_at) == processes
    return killed_at


@pytest.fixture(scope="module")
def one_then_two(tmp_path_factory, tiny_model) -> tuple[Path, Path, str]:
    """(train folder, the checkpoint the killed one-process run left, output of the two-process resumption)."""
    config = write_config(tmp_path_factory.mktemp("one_then_two"), tiny_model)
    killed_at = kill_launcher_after_first_checkpoint(config, processes=1)
    resumed = finish(["-m", "pipeline", "run", str(config), "--only", "train", "--num-gpus", "2"])
    return config.parent / "run" / "train", killed_at, resumed


@pytest.fixture(scope="module")
def two_then_one(tmp_path_factory, tiny_model) -> tuple[Path, Path, str]:
    """(train folder, the checkpoint the killed two-process run left, output of the one-process resumption)."""
    config = write_config(tmp_path_factory.mktemp("two_then_one"), tiny_model)
    killed_at = kill_launcher_after_first_checkpoint(config, processes=2)
    resumed = finish(["-m", "train", "--config", str(config)])
    return config.parent / "run" / "train", killed_at, resumed


def test_two_processes_train_with_the_global_batch_and_resume_a_one_process_checkpoint(one_then_two, tiny_model):
    train_dir, killed_at, resumed = one_then_two
    assert f"resuming from {killed_at}" in resumed and "written by 1 process(es) and resumes on 2" in resumed

    manifest = read_manifest(train_dir)
    assert manifest["processes"] == 2 and manifest["steps"] == STEPS
    logged = history(train_dir)
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert checkpoint_processes(train_dir / f"checkpoint-{STEPS}") == 2
    assert sorted(p.name for p in (train_dir / f"checkpoint-{STEPS}").glob("rng_state*")) == [
        "rng_state_0.pth", "rng_state_1.pth"]

    # One export, by the main process: the adapter and a merged model that differs from the base.
    assert_merged_export_differs_from_base(train_dir, tiny_model)
    assert not list(train_dir.glob("*.tmp-*"))

    # One wandb run: one id, and one run folder per start (the two-process start made one, not two).
    run_id = (train_dir / "wandb_run_id").read_text().strip()
    assert manifest["wandb_run_id"] == run_id
    folders = sorted((train_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in folders)


def test_a_two_process_checkpoint_resumes_on_one_process_after_its_launcher_is_killed(two_then_one):
    train_dir, killed_at, resumed = two_then_one
    assert f"resuming from {killed_at}" in resumed and "written by 2 process(es) and resumes on 1" in resumed
    manifest = read_manifest(train_dir)
    assert manifest["processes"] == 1 and manifest["steps"] == STEPS
    assert checkpoint_processes(train_dir / f"checkpoint-{STEPS}") == 1
    assert (train_dir / "checkpoint-8" / "rng_state.pth").is_file()


def test_both_directions_train_the_same_steps_on_the_same_blocks(one_then_two, two_then_one):
    """Before its run's kill a step ran on 1 process in one run and on 2 in the other, after it the other way round
    (between the two kill points, on the same number after different resumptions): the same loss every time."""
    one_two, two_one = history(one_then_two[0]), history(two_then_one[0])
    assert sorted(one_two) == sorted(two_one) == list(range(1, STEPS + 1))
    for step in one_two:
        assert two_one[step]["loss"] == pytest.approx(one_two[step]["loss"], rel=1e-5), f"step {step}"
    assert one_two[STEPS]["loss"] < one_two[1]["loss"]
    # The held-out loss likewise, evaluated on one process in one run and on two in the other (step 0 included).
    one_two, two_one = history(one_then_two[0], "heldout_loss"), history(two_then_one[0], "heldout_loss")
    assert sorted(one_two) == sorted(two_one) == list(range(0, STEPS + 1, 2))
    for step in one_two:
        for key in ("heldout_loss", "heldout_bits_per_byte", "heldout_tokens"):
            assert two_one[step][key] == pytest.approx(one_two[step][key], rel=1e-5), f"step {step}: {key}"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.grad_accum=3"], "train.grad_accum=3 does not split evenly over 2 processes"),
        (["train.distributed=fsdp", "train.watchdog.enabled=true"],
         "watchdog does not run under train.distributed=fsdp"),
        pytest.param(["train.distributed=fsdp"], "train.distributed=fsdp needs CUDA GPUs",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP runs where there is CUDA")),
    ],
    ids=["grad-accum-does-not-split", "watchdog-under-fsdp", "fsdp-without-cuda"],
)
def test_a_setting_two_processes_cannot_run_fails_with_one_line_before_any_work(tmp_path, tiny_model, capsys,
                                                                                 overrides, fragment):
    config = write_config(tmp_path, tiny_model)
    args = ["--config", str(config), "--set", "train.num_gpus=2"]
    for assignment in overrides:
        args += ["--set", assignment]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("visible", "kept"), [(None, "0"), ("2,3", "2"), ("1", "1"), ("", "")],
                         ids=["all-visible", "a-list", "one-already", "none"])
def test_a_single_training_process_sees_at_most_one_gpu(monkeypatch, visible, kept):
    """Otherwise the HF Trainer runs torch.nn.DataParallel over every visible GPU inside the one process."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    keep_one_process_on_one_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == kept


@pytest.mark.parametrize(("preset", "kept"), [(None, "expandable_segments:True"),
                                              ("max_split_size_mb:128", "max_split_size_mb:128")],
                         ids=["unset", "the-user's"])
def test_the_train_command_lets_cuda_memory_grow_in_place_unless_the_user_chose(monkeypatch, tmp_path, preset, kept):
    """The stage's memory figures are measured with expandable segments; the command sets them before CUDA starts."""
    if preset is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", preset)
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) != 0  # a user error, after the setting is made
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == kept
