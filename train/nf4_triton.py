"""The Triton kernel behind train/nf4_kernel.py's `dequantize_nf4`: imported on CUDA only (no Triton on CPU machines).

One program reads 2048 packed bytes with their block scales and writes the 4096 weights; FMA contraction is off
so that the absmax's multiply and add round separately, as in bitsandbytes.
"""

import torch
import triton
import triton.language as tl

BYTES_PER_PROGRAM = 2048  # packed bytes per program: 4096 weights, 64 blocks of 64


@triton.jit
def _dequantize_nf4_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n_bytes,
                           NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                           BYTES: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BYTES
    index = start + tl.arange(0, BYTES)
    inside = index < n_bytes
    byte = tl.load(packed_ptr + index, mask=inside, other=0)
    block = index * 2 // BLOCKSIZE  # a byte's two weights share a block: blocks hold an even number of weights
    if NESTED:
        level = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + level) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=inside, other=0.0)
        absmax = scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    high = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax
    low = tl.load(code_ptr + (byte & 15).to(tl.int32)) * absmax
    weights = tl.interleave(high, low)  # the first weight of a pair sits in the high nibble
    out_index = start * 2 + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + out_index, weights.to(out_ptr.dtype.element_ty), mask=out_index < n_bytes * 2)


def launch(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None, code2: torch.Tensor | None,
           offset: torch.Tensor | None, code: torch.Tensor, blocksize: int, blocksize2: int,
           out: torch.Tensor) -> None:
    n_bytes = packed.numel()
    nested = absmax2 is not None
    grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
    _dequantize_nf4_kernel[grid](packed, absmax, absmax2 if nested else absmax, code2 if nested else code,
                                 offset if nested else absmax, code, out, n_bytes, NESTED=nested,
                                 BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, BYTES=BYTES_PER_PROGRAM,
                                 enable_fp_fusion=False)
