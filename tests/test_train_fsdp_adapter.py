"""The LoRA matrices of an FSDP-sharded model survive a checkpoint and the export (train/fsdp_adapter.py).

Real FSDP1 over gloo on CPU, 2 processes, wrapped as the HF Trainer wraps under `train.distributed: fsdp`
(tests/fsdp_adapter_worker.py). The Trainer itself cannot run FSDP without CUDA; its FSDP path was checked on GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_adapter_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_worker(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(WORKER), *args]  # --standalone: a free port, so parallel runs never collide
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A folder with the sharded adapter of 2 processes and what the worker expects back."""
    folder = tmp_path_factory.mktemp("fsdp_adapter")
    done = run_worker(2, "save", str(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) and want
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("processes", [2, 1], ids=["same-count", "2-to-1"])
def test_a_sharded_adapter_restores_every_lora_matrix(saved, processes):
    done = run_worker(processes, "load", str(saved))
    assert done.returncode == 0, done.stderr[-3000:]
    loaded, expected = torch.load(saved / f"loaded-{processes}.pt"), torch.load(saved / "expected.pt")
    assert loaded["count"] == len(expected) == 8  # 2 layers x (q_proj, v_proj) x (A, B)
    assert not any(torch.equal(loaded["before"][key], expected[key]) for key in expected)
    assert_same_tensors(loaded["after"], expected)


def test_a_lora_matrix_missing_from_the_checkpoint_fails_the_load(saved):
    done = run_worker(2, "load", str(saved), "q_proj,k_proj,v_proj")
    assert done.returncode != 0
    assert "k_proj.lora_A" in done.stderr


def test_the_export_picks_what_peft_saves_without_fsdp(saved):
    """Same keys and tensors as peft's own adapter state dict of the same weights on an unwrapped model."""
    assert_same_tensors(torch.load(saved / "exported.pt"), torch.load(saved / "peft_reference.pt"))
