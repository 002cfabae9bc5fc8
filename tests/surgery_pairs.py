"""Tiny base/donor pairs and the helpers the surgery tests share: run a surgery, read every tensor, fp32 logits."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.checkpoint import CheckpointReader
from surgery.cli import main as surgery_main

BASE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3}
DONOR = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 5, "seed": 1}
HEADS = {False: ((4, 4), (6, 6)), True: ((4, 2), (6, 3))}  # gqa -> ((base heads, kv), (donor heads, kv))


def make_pair(tiny_llama, gqa: bool = False, tied: bool = False, donor_tied: bool | None = None, **donor_kwargs):
    (base_heads, base_kv), (donor_heads, donor_kv) = HEADS[gqa]
    base = tiny_llama("base", **BASE, num_attention_heads=base_heads, num_key_value_heads=base_kv,
                      tie_word_embeddings=tied, max_shard_size="40KB")
    donor = tiny_llama("donor", **{**DONOR, **donor_kwargs}, num_attention_heads=donor_heads,
                       num_key_value_heads=donor_kv, tie_word_embeddings=tied if donor_tied is None else donor_tied)
    return base, donor


def run(base: Path, donor: Path | str, out: Path, *flags: str) -> Path:
    assert surgery_main(["--base", str(base), "--donor", str(donor), "--out", str(out), "--dtype", "float32",
                         *flags]) == 0
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.names}


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0]


IDS = torch.randint(101, (1, 24), generator=torch.Generator().manual_seed(0))
