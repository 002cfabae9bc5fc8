"""One Triton kernel that dequantizes a double-quantized NF4 weight, bit for bit what bitsandbytes computes.

bitsandbytes spends three kernels on it (the 8-bit absmax, its offset, then the 4-bit weights) and its 4-bit kernel
moves 1 to 2 TB/s on an H200 (benchmarks/dequant_bench.py); the train stage dequantizes every 4-bit weight twice
per micro-batch, about 6% of a 22b step. This kernel reads each packed byte and block scale once and writes the
two weights, at closer to the GPU's bandwidth. Exactness: the same fp32 operations in the same order as
bitsandbytes (absmax = code2[q] * absmax2 + offset, two roundings: FMA contraction is off; weight = NF4 level x
absmax, rounded to the output dtype to nearest-even), so training matches the bitsandbytes path exactly.

Imported only on CUDA (Triton is not there on CPU machines); `dequantize_nf4` is a torch custom op so that the
compiled decoder layers treat it like bitsandbytes' own op: opaque, and recomputed in the backward.
"""

from typing import Optional

import torch


def dequantize_in_torch(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                        shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The same dequantization in torch ops, from an already expanded fp32 absmax (CPU, and the benchmark's
    compiled-torch alternative). The first weight of each pair sits in the high nibble."""
    flat = packed.view(-1)
    levels = torch.stack((flat >> 4, flat & 15), dim=-1).view(-1, blocksize)
    return (code[levels.int()] * absmax.float()[:, None]).to(dtype).view(shape)


# Optional, not `X | None`: custom_op reads the schema off these annotations.
@torch.library.custom_op("frankenllama::dequantize_nf4", mutates_args=())
def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],  # noqa: UP045
                   code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], code: torch.Tensor,  # noqa: UP045
                   blocksize: int, blocksize2: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A double-quantized (`absmax2` given) or plain NF4 weight, dequantized in one kernel on CUDA."""
    if packed.is_cuda:
        from train.nf4_triton import launch

        out = torch.empty(shape, dtype=dtype, device=packed.device)
        launch(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2, out)
        return out
    if absmax2 is not None:  # bitsandbytes' order: expand the 8-bit absmax, then add the offset
        blocks = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        absmax = (code2[absmax.int()] * absmax2[blocks]) + offset
    return dequantize_in_torch(packed, absmax, code, blocksize, shape, dtype)


@dequantize_nf4.register_fake
def _(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def dequantize(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """A Linear4bit's weight from its packed bytes and bitsandbytes QuantState (NF4, whole blocks)."""
    if quant_state.nested:
        state2 = quant_state.state2
        nested = (state2.absmax, state2.code, quant_state.offset, state2.blocksize)
    else:
        nested = (None, None, None, 0)
    absmax2, code2, offset, blocksize2 = nested
    return dequantize_nf4(packed, quant_state.absmax, absmax2, code2, offset, quant_state.code,
                          quant_state.blocksize, blocksize2, list(quant_state.shape), quant_state.dtype)
