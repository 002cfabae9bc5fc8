"""LoRA's dropout in a compiled layer: bit-packed masks (train/lora_dropout.py) against inductor's own RNG.

Baseline: `torch.nn.Dropout` as peft builds it, compiled by inductor (one Philox call per element inside the fused
kernels), in the same run, on the same data. The cell is the attention side of one 22b decoder layer's LoRA at
4096 tokens (seq 2048 x micro-batch 2, or 4096 x 1): RMSNorm of the fp32 residual stream, then q, k and v's dropout
(p 0.05) and rank-64 A products, forward and backward, compiled under the stage's selective checkpointing (so the
backward recomputes the masks, as in training). `none` (no dropout) is the floor. Timed with CUDA events over
`--repeats` calls. Before timing, the Triton mask kernel's words must equal `keep_words_in_torch`'s (the same
Philox bits computed on the CPU) and keep 1 - p of the elements.

The cell drops 3 x 4096 x 6656 elements per pass; a 22b layer drops 237M (seven adapters), so a step at 4096
tokens saves about (inductor - packed) x 237M / 82M x 40 layers. Ends with
`dropout_bench: q/k/v LoRA dropout forward+backward, packed X.XXx inductor's (... ms vs ... ms; no dropout ... ms),
mask bit-exact yes|no; predicted saving per 22b micro-batch of 4096 tokens ~N ms`.

On a lent H100 the cell ran packed at 0.62x inductor's while the training step ran 2-3% faster with it
(benchmarks/RESULTS.md, the fifth round): the cell is a ~1 ms graph, probably paced by the host's launches, which
training hides behind a busy GPU. Its mask check stands; for speed, train_bench's step is the measurement.

    python benchmarks/dropout_bench.py
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dequant_bench import time_calls
from train.fast_recipe import keep_frozen_products, selective_checkpoint
from train.lora_dropout import (
    WORD_BITS,
    PackedMaskDropout,
    drop_threshold,
    dropout_keep_words,
    keep_words_in_torch,
    unpack_keep_mask,
)

TOKENS, HIDDEN, INTERMEDIATE, RANK, P = 4096, 6656, 17920, 64, 0.05
LAYER_DROPPED = TOKENS * (6 * HIDDEN + INTERMEDIATE)  # q, k, v, o, gate, up: hidden wide; down: intermediate
LAYERS = 40


class AttentionLoraInputs(torch.nn.Module):
    """RMSNorm of the fp32 stream, then q, k and v's LoRA dropout and A product (bf16), as in a 22b layer."""

    def __init__(self, dropout):
        super().__init__()
        self.norm = torch.nn.Parameter(torch.ones(HIDDEN, device="cuda"), requires_grad=False)
        self.lora_a = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(RANK, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.01)
            for _ in range(3))
        self.dropouts = torch.nn.ModuleList(dropout() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm
        return sum(drop(h).to(torch.bfloat16) @ a.t() for drop, a in zip(self.dropouts, self.lora_a, strict=True))


def mask_checks() -> tuple[bool, float]:
    """Triton's words against the CPU's for several sizes, seeds and p; the kept share of a large mask."""
    exact = True
    for words, seed, p in ((1000, 1, 0.05), (5000, 2**40 + 7, 0.05), (3000, 12345, 0.5), (1, 99, 0.1)):
        threshold = drop_threshold(p)
        gpu = dropout_keep_words(torch.tensor(seed, device="cuda"), words * WORD_BITS, threshold)
        exact &= torch.equal(gpu.cpu(), keep_words_in_torch(seed, words, threshold))
    seed = torch.randint(0, 2**62, (), device="cuda")
    words = dropout_keep_words(seed, LAYER_DROPPED, drop_threshold(P))
    kept = unpack_keep_mask(words, torch.Size([LAYER_DROPPED]), torch.float32).mean().item()
    return exact, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    exact, kept = mask_checks()
    print(f"[dropout_bench] Triton mask words equal the CPU's: {exact}; kept share {kept:.5f} (expected {1 - P})")

    variants = {"inductor": functools.partial(torch.nn.Dropout, P), "packed": functools.partial(PackedMaskDropout, P),
                "none": torch.nn.Identity}
    x = torch.randn(TOKENS, HIDDEN, device="cuda", requires_grad=True)
    grad = torch.randn(TOKENS, RANK, device="cuda", dtype=torch.bfloat16)
    seconds = {}
    for name, dropout in variants.items():
        cell = AttentionLoraInputs(dropout).cuda().train()
        compiled = torch.compile(selective_checkpoint(keep_frozen_products(RANK)), dynamic=False)

        def step(cell=cell, compiled=compiled):
            compiled(cell, x).backward(grad)

        seconds[name] = time_calls(step, args.repeats)
        print(f"[dropout_bench] {name}: {seconds[name] * 1e3:.3f} ms per forward+backward", flush=True)
    ratio = seconds["inductor"] / seconds["packed"]
    per_step = (seconds["inductor"] - seconds["packed"]) * LAYER_DROPPED / (3 * TOKENS * HIDDEN) * LAYERS
    print(f"dropout_bench: q/k/v LoRA dropout forward+backward, packed {ratio:.2f}x inductor's "
          f"({seconds['packed'] * 1e3:.3f} ms vs {seconds['inductor'] * 1e3:.3f} ms; no dropout "
          f"{seconds['none'] * 1e3:.3f} ms), mask bit-exact {'yes' if exact else 'no'}; predicted saving per 22b "
          f"micro-batch of 4096 tokens ~{per_step * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
