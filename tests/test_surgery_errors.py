"""Every bad input is refused with one line naming the problem and the fix, exit code 2, no traceback and no
output folder; a run killed mid-write leaves nothing that passes for complete, and a rerun succeeds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import CheckpointReader
from pipeline.config import load_config
from pipeline.orchestrate import stage_state
from pipeline.runs import MANIFEST
from surgery import execute as surgery_execute
from surgery.cli import main as surgery_main

REPO = Path(__file__).resolve().parents[1]
BASE = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}
DONOR = {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 96, "seed": 1}
RANDOM_WIDTHS = ["--hidden-size", "48", "--num-attention-heads", "6", "--num-key-value-heads", "3",
                 "--intermediate-size", "96"]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))


def refused(capsys, argv: list[str], fragment: str, out: Path) -> str:
    code = surgery_main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    assert_nothing_written(out)
    return errors[0]


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def base(tiny_llama) -> Path:
    return tiny_llama("base", **BASE)


@pytest.mark.parametrize(
    ("donor_kwargs", "config_edit", "fragment"),
    [
        ({"hidden_size": 24}, {}, "the donor is narrower than the base in hidden_size (24 < 32)"),
        ({"intermediate_size": 48}, {}, "narrower than the base in intermediate_size"),
        ({"vocab_size": 100}, {}, "vocab sizes differ (base 101, donor 100)"),
        ({"head_dim": 12}, {}, "head_dim differs (base 8, donor 12)"),
        ({}, {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, "rope settings differ"),
        ({"num_attention_heads": 6, "num_key_value_heads": 6}, {}, "heads per kv group differ (base 2, donor 1)"),
        ({}, {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "not a Llama-architecture"),
    ],
)
def test_ungraftable_donors_are_refused(tiny_llama, base, tmp_path, capsys, donor_kwargs, config_edit, fragment):
    donor = tiny_llama("donor", **{**DONOR, **donor_kwargs})
    edit_config(donor, **config_edit)
    out = tmp_path / "out"
    refused(capsys, ["--base", str(base), "--donor", str(donor), "--out", str(out)], fragment, out)


def single_file(folder: Path) -> Path:
    return folder / "model.safetensors"


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("missing", "tensor model.layers.1.mlp.up_proj.weight is missing"),
        ("extra", "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
        ("truncated", "truncated or corrupt"),
        ("garbage", "truncated or corrupt"),
        ("pickle", "never unpickles"),
        ("shape", "has shape [64, 16] but config.json implies [64, 32]"),
        ("not_llama", "is a 'gpt2' model"),
    ],
)
def test_broken_base_checkpoints_are_refused(base, tmp_path, capsys, damage, fragment):
    weights = single_file(base)
    if damage in ("missing", "extra", "shape"):
        tensors = load_file(weights)
        if damage == "missing":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        elif damage == "extra":
            tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
        else:
            tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 16)
        save_file(tensors, weights, metadata={"format": "pt"})
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "pickle":
        torch.save(load_file(weights), base / "pytorch_model.bin")
        weights.unlink()
    else:
        edit_config(base, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    out = tmp_path / "out"
    refused(capsys, ["--base", str(base), "--donor", "random", "--out", str(out), *RANDOM_WIDTHS], fragment, out)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--hidden-size", "48"], "--donor random needs every target width; add --num-attention-heads N"),
        (["--hidden-size", "16", "--num-attention-heads", "4", "--num-key-value-heads", "2",
          "--intermediate-size", "64"], "target hidden_size 16 is below the base's 32"),
        (["--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
          "--intermediate-size", "64"], "nothing to widen"),
        (["--hidden-size", "48", "--num-attention-heads", "6", "--num-key-value-heads", "2",
          "--intermediate-size", "96"], "changes the heads per kv group from the base's 2"),
        (["--hidden-size", "40", "--num-attention-heads", "6", "--num-key-value-heads", "3",
          "--intermediate-size", "96"], "not a multiple of its 6 heads"),
        ([*RANDOM_WIDTHS, "--mode", "readers", "--legacy"], "--legacy reproduces the 2023 script"),
        ([*RANDOM_WIDTHS, "--set", "surgery.mdoe=zero"], "unknown key 'surgery.mdoe'"),
    ],
)
def test_bad_targets_and_settings_are_refused(base, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    refused(capsys, ["--base", str(base), "--donor", "random", "--out", str(out), *extra], fragment, out)


def test_targets_beyond_the_donor_and_shallow_donors_are_refused(tiny_llama, base, tmp_path, capsys):
    donor = tiny_llama("donor", **DONOR, num_hidden_layers=1)
    out = tmp_path / "out"
    argv = ["--base", str(base), "--donor", str(donor), "--out", str(out)]
    refused(capsys, [*argv, "--hidden-size", "64"], "target hidden_size 64 is wider than the donor's 48", out)
    refused(capsys, [*argv, "--layer-map", "index"], "use --layer-map proportional", out)
    refused(capsys, [*argv, "--mode", "block_diagonal", "--legacy"], "layer map index needs a donor", out)
    refused(capsys, [*argv, "--mode", "block_diagonal", "--legacy", "--layer-map", "proportional"],
            "took donor layer i for target layer i; drop --layer-map proportional", out)


def test_missing_inputs_config_without_surgery_and_overlapping_output(base, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, ["--donor", "random", "--out", str(out)], "pass --base", out)
    refused(capsys, ["--base", str(base)], "pass --out DIR", out)
    refused(capsys, ["--base", str(tmp_path / "nowhere"), "--out", str(out)], "not found", out)
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")
    refused(capsys, ["--config", str(config)], "has no surgery section", tmp_path / "run" / "surgery")
    inside = base / "widened"
    refused(capsys, ["--base", str(base), "--out", str(inside), *RANDOM_WIDTHS], "overlaps the input", inside)


def test_not_enough_free_disk(base, tmp_path, capsys, monkeypatch):
    # Filling a real disk is not an option in a test; the file system reports 1 MB free instead.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(surgery_execute.shutil, "disk_usage", lambda path: usage(10**12, 10**12, 10**6))
    out = tmp_path / "out"
    refused(capsys, ["--base", str(base), "--donor", "random", "--out", str(out), *RANDOM_WIDTHS],
            "not enough free disk", out)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_real_cli_refusals_are_one_line_with_exit_code_2(tiny_llama, base, tmp_path):
    narrow = tiny_llama("narrow", **{**DONOR, "hidden_size": 24})
    out = tmp_path / "out"
    result = run_cli("--base", str(base), "--donor", str(narrow), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: the donor is narrower than the base in hidden_size (24 < 32); pick a donor at least as wide as the "
        "base in every width"
    )
    assert_nothing_written(out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("--base", str(base), "--donor", "random", "--out", str(out), *RANDOM_WIDTHS)
    assert result.returncode == 2 and result.stderr.startswith(f"error: output {out} already exists; pass --force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_killed_run_leaves_nothing_complete_and_rerun_succeeds(tiny_llama, tmp_path):
    base = tiny_llama("base", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                      intermediate_size=128, vocab_size=16000)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\nsurgery:\n  base: {base}\n  donor: random\n  dtype: float32\n"
        "  max_shard_size: 20MB\n  target:\n    hidden_size: 1024\n    num_attention_heads: 64\n"
        "    num_key_value_heads: 64\n    intermediate_size: 2816\n"
    )
    out = tmp_path / "run" / "surgery"
    process = subprocess.Popen([sys.executable, "-m", "surgery", "--config", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = out.with_name(f"surgery.tmp-{process.pid}")
    deadline = time.monotonic() + 120
    while len(list(tmp.glob("model-*.safetensors"))) < 2:  # the first shard is done, the second under way
        assert process.poll() is None, "surgery finished before it could be killed; make the model bigger"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run = load_config(config)
    assert not out.exists()
    assert tmp.is_dir() and not (tmp / MANIFEST).exists()
    assert stage_state(run, "surgery") == "partial"

    assert surgery_main(["--config", str(config)]) == 0
    assert stage_state(run, "surgery") == "complete"
    assert not tmp.exists(), "the rerun removes what the killed run left"
    assert len(CheckpointReader(out).names) == 2 + 2 * 9 + 1
    shutil.rmtree(tmp_path / "run")


def test_damaged_donor_values_stop_the_run_mid_write_and_leave_nothing(tiny_llama, base, tmp_path, capsys):
    donor = tiny_llama("donor", **DONOR)
    tensors = load_file(single_file(donor))
    tensors["model.layers.1.mlp.gate_proj.weight"][70, 3] = float("nan")  # a new row the readers mode grafts
    save_file(tensors, single_file(donor), metadata={"format": "pt"})
    out = tmp_path / "out"
    refused(capsys, ["--base", str(base), "--donor", str(donor), "--out", str(out)],
            "donor tensor model.layers.1.mlp.gate_proj.weight has NaN or inf values", out)
