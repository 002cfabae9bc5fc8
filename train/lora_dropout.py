"""LoRA's dropout with a bit-packed mask: one Philox call draws the keep bits of 8 elements instead of 1.

Compiled layers otherwise draw LoRA's dropout inside inductor's fused kernels, one Philox-4x32-10 call (about 85
integer operations) per element, of whose four 32-bit outputs `tl.rand` keeps one. A 22b layer drops 237M elements
per pass at 4096 tokens (seven adapters: q, k, v, gate and up read hidden-wide inputs, o too, down an
intermediate-wide one). Here one kernel per dropout draws the mask with every bit of each call (16 random bits per
element, so 8 elements a call) and writes it packed, one bit per element; the fused kernels read it back (1/32 of a
float's bytes) with a shift and a mask. Measured in training (22b, H100, benchmarks/RESULTS.md, the fifth round):
22 ms less per micro-batch at seq 2048 and 34 ms at 4096 (2-3%), a third of what the integer-work estimate
predicted.

The random stream is Triton's: Philox-4x32-10 keyed by a 64-bit seed, the counter's first word the call's index.
`keep_words_in_torch` computes the same bits with torch's integer ops, on CPU, and is what the Triton kernel is
checked against. The drop probability is rounded to 16 bits (p = 0.05 becomes 3277/65536 = 0.050003) and kept
elements are scaled by 1 / (1 - that), so the expectation is still the input.

Each call draws its seed with `torch.randint` on the input's device, so torch.compile's own RNG bookkeeping gives
the backward's recompute the forward's seed, and with it the same mask, as it does for its own dropout.
"""

from __future__ import annotations

import torch

WORD_BITS = 32  # mask bits per stored int32 word
RANDOM_BITS = 16  # random bits that decide one element: a 32-bit Philox output serves two elements
ELEMENTS_PER_CALL = 4 * 32 // RANDOM_BITS  # one Philox-4x32 call: four 32-bit outputs
CALLS_PER_WORD = WORD_BITS // ELEMENTS_PER_CALL
SEED_RANGE = 2**62  # seeds are drawn in [0, 2^62): non-negative int64 whose two 32-bit halves key Philox

# Philox-4x32-10's constants (Salmon et al., SC'11), as Triton's tl.randint4x uses them.
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_LOW32 = 0xFFFFFFFF


def drop_threshold(p: float) -> int:
    """An element is dropped when its 16 random bits, read as an integer, fall below this."""
    return round(p * 2**RANDOM_BITS)


def mask_words(numel: int) -> int:
    """int32 words that hold the keep bits of `numel` elements (the op and its fake must agree on it)."""
    return -(-numel // WORD_BITS)


def keep_scale(p: float) -> float:
    """1 / (1 - the drop probability actually used), so that a dropped-out tensor's expectation is its input."""
    return 2**RANDOM_BITS / (2**RANDOM_BITS - drop_threshold(p))


def _mulhilo(a: torch.Tensor, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * constant, for uint32 values held in int64, without overflowing int64."""
    low_product = a * (constant & 0xFFFF)
    middle = a * (constant >> 16) + (low_product >> 16)
    return middle >> 16, ((middle & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox4x32(key: tuple[int, int], counter: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of four counter words under a two-word key, for uint32 values held in int64 tensors.

    Triton's `tl.randint4x(seed, offset)` is this with key (seed's low word, its high word) and counter
    (offset, 0, 0, 0).
    """
    (k0, k1), (c0, c1, c2, c3) = key, counter
    for _ in range(10):
        high_b, low_b = _mulhilo(c2, _ROUND_B)
        high_a, low_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _KEY_A) & _LOW32, (k1 + _KEY_B) & _LOW32
    return c0, c1, c2, c3


def keep_words_in_torch(seed: int, words: int, threshold: int) -> torch.Tensor:
    """The packed keep mask in torch ops: bit b of word w keeps element 32w + b.

    Element e is decided by Philox call 4w + b // 8 (w = e // 32, b = e % 32), output (b % 8) // 2, its low 16 bits
    for even b, its high 16 for odd b: kept when they are at least `threshold`.
    """
    word_index = torch.arange(words, dtype=torch.int64)
    packed = torch.zeros(words, dtype=torch.int64)
    for call in range(CALLS_PER_WORD):
        counter = (word_index * CALLS_PER_WORD + call) & _LOW32
        zero = torch.zeros_like(counter)
        outputs = philox4x32((seed & _LOW32, (seed >> 32) & _LOW32), (counter, zero, zero, zero))
        for index, output in enumerate(outputs):
            for half in range(2):
                bit = call * ELEMENTS_PER_CALL + index * 2 + half
                kept = ((output >> (RANDOM_BITS * half)) & 0xFFFF) >= threshold
                packed |= kept.to(torch.int64) << bit
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, as int32


@torch.library.custom_op("frankenllama::dropout_keep_words", mutates_args=())
def dropout_keep_words(seed: torch.Tensor, numel: int, threshold: int) -> torch.Tensor:
    """The packed keep mask of `numel` elements (int32 words, 32 elements each) from a one-element int64 seed.

    A custom op: compiled layers call it as one opaque kernel, and under selective checkpointing rerun it in the
    backward from the saved seed instead of keeping the mask.
    """
    words = mask_words(numel)
    if seed.is_cuda:
        from train.dropout_triton import launch

        out = torch.empty(words, dtype=torch.int32, device=seed.device)
        launch(seed, threshold, out)
        return out
    return keep_words_in_torch(int(seed), words, threshold).to(seed.device)


@dropout_keep_words.register_fake
def _(seed, numel, threshold):
    return seed.new_empty(mask_words(numel), dtype=torch.int32)


def unpack_keep_mask(words: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """1 where an element is kept, 0 where dropped, in `dtype` and `shape` (row-major element order).

    Plain tensor ops, so inductor folds the shift and mask into the kernel that applies them: that kernel reads one
    int32 word per 32 elements.
    """
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.view(-1)[: shape.numel()].view(shape).to(dtype)


class PackedMaskDropout(torch.nn.Module):
    """Dropout with probability `p` (to 16 bits) through `dropout_keep_words`; the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p} is outside [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = drop_threshold(self.p)
        if not self.training or threshold == 0:
            return x
        seed = torch.randint(0, SEED_RANGE, (), device=x.device, dtype=torch.int64)
        keep = unpack_keep_mask(dropout_keep_words(seed, x.numel(), threshold), x.shape, x.dtype)
        return x * keep * keep_scale(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def pack_lora_dropout_masks(model: torch.nn.Module) -> int:
    """Replace every LoRA adapter's torch dropout with `PackedMaskDropout` of the same p; returns how many.

    peft keeps one `nn.Dropout` per adapter in each LoRA layer's `lora_dropout` (an `nn.Identity` when p is 0,
    left alone). They hold no state, so saved adapters and merging are unchanged.
    """
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                dropouts[name] = PackedMaskDropout(dropout.p)
                replaced += 1
    return replaced
