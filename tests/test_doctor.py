"""`frankenllama doctor`: the preflight table, and the size estimates it judges with."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.doctor import Device, ModelFacts, RunShapes, diagnose, gpu_checks, ram_check, widened_shape
from pipeline.sizing import GIB, NF4_BYTES_PER_PARAM, LlamaShape, pinned_activation_bytes, train_memory

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-2-13b's and llama-30b's config.json widths.
LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 40, "vocab_size": 32000, "torch_dtype": "float16"}
LLAMA_30B = {"hidden_size": 6656, "intermediate_size": 17920, "num_hidden_layers": 60, "num_attention_heads": 52,
             "vocab_size": 32000, "torch_dtype": "float16"}


def doctor(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "doctor", *args], cwd=REPO, env=env or ENV,
                            capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


@pytest.mark.slow
def test_doctor_passes_the_smoke_config_offline_on_cpu(tmp_path, smollm2_dir):
    result, _ = doctor("configs/smoke.yaml", "--set", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "doctor: all checks passed" in result.stdout
    assert "OK    model surgery.base" in result.stdout
    for row in ("GPU", "RAM", "disk: surgery", "disk: train", "disk: eval", "benchmark data", "wandb"):
        assert f"  {row}" in result.stdout, row


def test_doctor_fails_a_22b_config_offline_cleanly_and_fast(tmp_path):
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}  # an empty cache: nothing of Llama-2 is here
    result, seconds = doctor("configs/llama2-22b-readers.yaml", "--set", f"run_dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert seconds < 60
    assert "Traceback" not in result.stdout + result.stderr
    assert "FAIL  model surgery.base" in result.stdout and "HF_HUB_OFFLINE=1" in result.stdout
    assert "FAIL  model surgery.donor" in result.stdout
    assert "fix: " in result.stdout
    assert result.stdout.rstrip().endswith("fix the failures before running")
    assert not (tmp_path / "run").exists()  # the doctor writes nothing


def test_doctor_checks_only_the_stages_a_run_would_execute(tmp_path):
    config = load_config(REPO / "configs/llama2-22b-readers.yaml", [f"run_dir={tmp_path}"])
    names = [check.name for check in diagnose(config, ["surgery"])]
    assert "disk: surgery" in names
    assert not any(name in names for name in ("disk: train", "bitsandbytes", "benchmark data", "wandb"))


def shapes_22b(config) -> RunShapes:
    base = ModelFacts("surgery.base", "meta-llama/Llama-2-13b-hf", LLAMA2_13B, 0, None)
    widened = widened_shape(config, base.shape, LLAMA_30B)
    return RunShapes(base, widened, widened, [("base", base.shape, "float16"), ("surgery", widened, "bfloat16")])


def test_doctor_on_a_24gb_card_trains_the_22b_and_evaluates_it_partly_from_ram(tmp_path):
    config = load_config(REPO / "configs/llama2-22b-readers.yaml", [f"run_dir={tmp_path}"])
    shapes = shapes_22b(config)
    assert shapes.widened.params == pytest.approx(21.8e9, rel=0.01)
    card = Device("RTX 4090", int(23.5 * GIB), int(23.99 * GIB), 1)
    rows = {c.name: c for c in gpu_checks(config, shapes, ["surgery", "train", "eval"], card)}
    assert rows["GPU memory: train"].status == "ok"
    assert rows["GPU memory: eval"].status == "warn" and "in CPU RAM" in rows["GPU memory: eval"].found
    ram = ram_check(config, shapes, ["eval"], card)
    assert "peak ~2" in ram.found  # ~24 GB of the bf16 22b stay in RAM, plus the interpreter

    longer = load_config(REPO / "configs/llama2-22b-readers.yaml",
                         [f"run_dir={tmp_path}", "train.seq_len=4096", "train.batch_size=4"])
    too_big = {c.name: c for c in gpu_checks(longer, shapes, ["train"], card)}["GPU memory: train"]
    assert too_big.status == "fail" and "train.batch_size" in too_big.fix


@pytest.mark.parametrize(("host_saved_layers", "measured_gib"), [(0, 3.96), (12, 10.29), (20, 14.51)])
def test_pinned_ram_estimate_matches_what_the_offloaded_activations_pinned_on_the_h100(host_saved_layers,
                                                                                      measured_gib):
    """benchmarks/RESULTS.md (Train, the sixth round): torch's pinned allocator's peak in the stage's cells, 22b
    shape, 4096 tokens per micro-batch, the layer inputs offloaded and N layers' products sent to CPU memory."""
    from pipeline.config import FastRecipeConfig

    shape = LlamaShape(6656, 17920, 40, 52, 52, 128, 32000)
    fast = FastRecipeConfig(host_saved_layers=host_saved_layers)
    for seq, batch in ((2048, 2), (4096, 1)):
        estimate = pinned_activation_bytes(shape, fast, seq_len=seq, batch_size=batch) / GIB
        assert measured_gib - 0.02 <= estimate <= measured_gib + 0.02


def test_doctor_counts_the_pinned_activations_in_the_training_ram(tmp_path):
    """On CUDA the stage pins the offloaded layer inputs and the host-saved layers' products (10.3 GiB on the 22b
    with the defaults at 2 x 2048 tokens): the RAM check's train need holds them, and drops when they are turned
    off."""
    needs = {}
    for host_saved_layers in (12, 0):
        config = load_config(REPO / "configs/llama2-22b-readers.yaml",
                             [f"run_dir={tmp_path}", f"train.fast.host_saved_layers={host_saved_layers}"])
        card = Device("RTX 4090", int(23.5 * GIB), int(23.99 * GIB), 1)
        found = ram_check(config, shapes_22b(config), ["train"], card).found
        needs[host_saved_layers] = float(found.split("(train ")[1].split(" GiB")[0])
    assert needs[12] >= 3 + 10.28 and needs[12] - needs[0] == pytest.approx(10.29 - 3.96, abs=0.15)


@pytest.mark.parametrize(("recipe", "seq", "batch", "measured_gib"), [
    ("fast", 2048, 1, 16.36), ("fast", 2048, 2, 19.52), ("fast", 4096, 1, 19.52),
    ("plain", 2048, 1, 16.89), ("plain", 4096, 1, 19.87),
])
def test_train_estimate_matches_the_peaks_measured_on_the_h200(recipe, seq, batch, measured_gib):
    """benchmarks/RESULTS.md (Train): the stage and the plain recipe on the 22b shape under a 23 GiB cap; the fast
    recipe ran with liger's fused cross-entropy. The estimate may err high (safe for a preflight), not low."""
    shape = LlamaShape(6656, 17920, 40, 52, 52, 128, 32000)
    estimate = train_memory(shape, quantization="nf4", recipe=recipe, seq_len=seq, batch_size=batch, lora_r=64,
                            lora_targets=TARGETS, gradient_checkpointing=True, fused_cross_entropy=recipe == "fast")
    assert measured_gib - 0.1 <= estimate.total / GIB <= measured_gib * 1.05


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_a_real_llama(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=16, vocab_size=300, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    shape = LlamaShape.from_config(config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    lora = shape.lora_params_per_layer(8, TARGETS) * shape.num_hidden_layers
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS))
    assert lora == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_nf4_bytes_per_weight_match_bitsandbytes():
    import bitsandbytes.functional as bnbf

    weight = torch.randn(512, 1024)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    stored = (packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
              + state.state2.absmax.numel() * state.state2.absmax.element_size())
    assert stored == pytest.approx(NF4_BYTES_PER_PARAM * weight.numel(), rel=0.01)
