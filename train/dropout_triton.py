"""The Triton kernel behind train/lora_dropout.py's `dropout_keep_words`: imported on CUDA only.

One program writes 1024 mask words (32768 elements): four `tl.randint4x` calls per word, each of whose four 32-bit
outputs decides two elements by its low and high 16 bits, in the bit order `keep_words_in_torch` documents.
"""

import torch
import triton
import triton.language as tl

WORDS_PER_PROGRAM = 1024


@triton.jit
def _two_keep_bits(output, shift: tl.constexpr, THRESHOLD: tl.constexpr):
    low = ((output & 0xFFFF) >= THRESHOLD).to(tl.uint32)
    high = ((output >> 16) >= THRESHOLD).to(tl.uint32)
    return (low << shift) | (high << (shift + 1))


@triton.jit
def _keep_words_kernel(seed_ptr, out_ptr, n_words, THRESHOLD: tl.constexpr, WORDS: tl.constexpr):
    seed = tl.load(seed_ptr)
    word = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
    packed = tl.zeros([WORDS], dtype=tl.uint32)
    for call in tl.static_range(4):
        r0, r1, r2, r3 = tl.randint4x(seed, (word * 4 + call).to(tl.uint32))
        packed |= _two_keep_bits(r0.to(tl.uint32, bitcast=True), call * 8, THRESHOLD)
        packed |= _two_keep_bits(r1.to(tl.uint32, bitcast=True), call * 8 + 2, THRESHOLD)
        packed |= _two_keep_bits(r2.to(tl.uint32, bitcast=True), call * 8 + 4, THRESHOLD)
        packed |= _two_keep_bits(r3.to(tl.uint32, bitcast=True), call * 8 + 6, THRESHOLD)
    tl.store(out_ptr + word, packed.to(tl.int32, bitcast=True), mask=word < n_words)


def launch(seed: torch.Tensor, threshold: int, out: torch.Tensor) -> None:
    """Fill `out` (int32 words) with the keep mask drawn from the one-element int64 `seed` on the GPU."""
    if out.numel() * 4 > 2**32:
        raise ValueError(f"a dropout mask of {out.numel() * 32} elements outruns Philox's 32-bit call counter")
    grid = (triton.cdiv(out.numel(), WORDS_PER_PROGRAM),)
    _keep_words_kernel[grid](seed, out, out.numel(), THRESHOLD=threshold, WORDS=WORDS_PER_PROGRAM)
