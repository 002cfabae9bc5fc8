"""LoRA's bit-packed dropout (train/lora_dropout.py) on CPU: the Philox stream is the published one, the masks drop
p of the elements without a favourite bit position, and a compiled, selectively checkpointed layer recomputes the
forward's masks in its backward. The Triton kernel writes the same bits as the CPU's Philox (through Triton's
interpreter here, on the GPU in benchmarks/dropout_bench.py)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from train.lora_dropout import (
    PackedMaskDropout,
    drop_threshold,
    keep_scale,
    keep_words_in_torch,
    philox4x32,
    unpack_keep_mask,
)

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter (4 words), key (2 words), result (4 words).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KNOWN_ANSWERS)
def test_philox_matches_random123s_known_answers(counter, key, expected):
    words = philox4x32(key, tuple(torch.tensor([c], dtype=torch.int64) for c in counter))
    assert tuple(int(w) for w in words) == expected


def test_the_gpu_kernel_writes_the_cpu_bits():
    """train/dropout_triton.py's kernel, run by Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
    imported, hence a process of its own): the same words as `keep_words_in_torch` for a partial program, several
    programs, a seed with its high word set, p = 0.5 and a one-word mask."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from train.dropout_triton import launch
        from train.lora_dropout import drop_threshold, keep_words_in_torch
        for words, seed, p in ((1000, 1, 0.05), (2100, 2**40 + 7, 0.05), (1500, 12345, 0.5), (1, 2**62 - 1, 0.1)):
            out = torch.full((words,), 7, dtype=torch.int32)
            launch(torch.tensor(seed), drop_threshold(p), out)
            expected = keep_words_in_torch(seed, words, drop_threshold(p))
            assert torch.equal(out, expected), (words, seed, p, int((out != expected).sum()))
        print("bit-exact")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "bit-exact" in done.stdout, done.stderr[-2000:]


def _keep_bits(words: torch.Tensor) -> torch.Tensor:
    """[words, 32] booleans, bit b of word w at [w, b] (read independently of unpack_keep_mask)."""
    return torch.stack([torch.bitwise_and(words, 1 << b).ne(0) for b in range(32)], 1)


def test_masks_drop_p_of_the_elements_at_every_bit_position_and_differ_by_seed():
    p, words = 0.05, 8192
    bits = _keep_bits(keep_words_in_torch(seed=2**40 + 3, words=words, threshold=drop_threshold(p)))
    expected = 1 - drop_threshold(p) / 2**16
    sigma = (expected * (1 - expected) / bits.numel()) ** 0.5
    assert abs(bits.float().mean().item() - expected) < 5 * sigma
    per_position = bits.float().mean(0)  # each of the 32 bit positions draws from its own 16 random bits
    assert (per_position - expected).abs().max().item() < 5 * (expected * (1 - expected) / words) ** 0.5
    dropped = ~bits.reshape(-1)
    neighbours = (dropped[1:] & dropped[:-1]).float().mean().item()  # both of two adjacent elements dropped: p^2
    assert neighbours < 3 * (1 - expected) ** 2
    again = _keep_bits(keep_words_in_torch(seed=2**40 + 3, words=words, threshold=drop_threshold(p)))
    other = _keep_bits(keep_words_in_torch(seed=2**40 + 4, words=words, threshold=drop_threshold(p)))
    assert torch.equal(bits, again) and not torch.equal(bits, other)


def test_the_unpacked_mask_follows_row_major_order_for_any_shape():
    words = keep_words_in_torch(seed=11, words=4, threshold=drop_threshold(0.5))
    mask = unpack_keep_mask(words, torch.Size((3, 7, 5)), torch.float32)  # 105 elements: a partial last word
    assert torch.equal(mask.reshape(-1).bool(), _keep_bits(words).reshape(-1)[:105])


def test_dropout_keeps_the_expectation_backpropagates_its_mask_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    dropout = PackedMaskDropout(0.3)
    x = torch.randn(64, 96, requires_grad=True)
    y = dropout(x)
    keep = y.detach() != 0
    assert torch.allclose(y, x.detach() * keep * keep_scale(0.3))
    ones = dropout(torch.ones(512, 512))
    assert ones.mean().item() == pytest.approx(1.0, abs=5 * (0.3 / 0.7 / ones.numel()) ** 0.5)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(x.grad, grad * keep * keep_scale(0.3))
    dropout.eval()
    assert dropout(x) is x
    assert PackedMaskDropout(0.0).train()(x) is x


def test_compiled_selective_checkpointing_recomputes_the_forwards_masks():
    """Inductor (CPU) compiles the stage's selective checkpointing around the dropout: the backward reruns the mask
    kernel from the seed the forward drew, so the gradient is the one of the forward's mask."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def recompute_all(ctx, op, *args, **kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE

    dropout = PackedMaskDropout(0.25)

    def layer(x, w):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        dropped = dropout(normed)
        return dropped * w, dropped

    context = functools.partial(create_selective_checkpoint_contexts, recompute_all)
    compiled = torch.compile(lambda x, w: checkpoint(layer, x, w, use_reentrant=False, context_fn=context))
    torch.manual_seed(0)
    x, w = torch.randn(4, 96, requires_grad=True), torch.randn(4, 96)
    out, dropped = compiled(x, w)
    out.sum().backward()
    keep = dropped.detach() != 0
    assert 0 < keep.float().mean() < 1

    reference = x.detach().clone().requires_grad_(True)
    normed = reference * torch.rsqrt(reference.pow(2).mean(-1, keepdim=True) + 1e-6)
    (normed * w * keep * keep_scale(0.25)).sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-5)
