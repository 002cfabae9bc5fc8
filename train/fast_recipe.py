"""The fast QLoRA recipe: the plain recipe's math at 1.5x its tokens/s (1.7x with micro-batch 2) on 24 GB.

Measured on an H200 capped at 23 GiB with the 22b shape (benchmarks/RESULTS.md has the table and the notes),
each lever kept only if it paid on its own:

- **fp32 residual stream, bf16 frozen tables** (train.model.keep_residual_stream_fp32, on every device): the
  plain recipe's fp32 upcast of the two 32000 x 6656 tables costs 1.7 GB; its side effect, an fp32 residual
  stream, is what keeps the early LoRA deltas from being rounded away, and that part is kept.
- **Dequantize once per layer and pass.** bitsandbytes dequantizes each 4-bit weight in the forward and again
  in the backward. A plain `F.linear` on the dequantized weight lets autograd keep that bf16 weight for the
  backward instead; under activation checkpointing the first forward keeps nothing, so the extra memory is one
  decoder layer's weights (about 1 GB on the 22b shape) during its recompute and backward.
- **Compiled decoder layers** (`torch.compile` per layer): fuses the residual adds, norms, SwiGLU, RoPE and the
  LoRA elementwise work that otherwise run as hundreds of small kernels per layer.
- **Fused linear cross-entropy** (liger-kernel, optional): the 32000-wide fp32 logits and their gradient are
  never materialized, which frees the memory for a micro-batch of 2 at 2048 tokens.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _dequantize_once_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x)  # generation keeps bitsandbytes' fast small-batch kernels
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state).to(self.compute_dtype or x.dtype)
    # Like bitsandbytes: compute in the compute dtype, hand back the input's dtype (fp32 stream stays fp32).
    return F.linear(x.to(weight.dtype), weight, self.bias).to(x.dtype)


def dequantize_once_per_pass(model: torch.nn.Module) -> int:
    """Route every training forward of a 4-bit linear through F.linear on its dequantized weight."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.forward = types.MethodType(_dequantize_once_forward, layer)
    return len(layers)


def fuse_linear_cross_entropy(model: torch.nn.Module) -> bool:
    """liger-kernel's fused lm_head + cross-entropy on this model instance; False when liger is absent."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        log.info("train: liger-kernel not installed, keeping the plain cross-entropy (pip install liger-kernel)")
        return False
    apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)
    return True


def compile_decoder_layers(layers: torch.nn.ModuleList) -> int:
    """torch.compile each decoder layer's training forward; checkpointing stays outside the compiled region.

    Training blocks all have one shape, so one static graph serves every step; generation (the watchdog's
    probes, with a growing KV cache) keeps the eager forward instead of recompiling for every length.
    """
    for layer in layers:
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=False)
        layer.forward = lambda *args, _layer=layer, _eager=eager, _compiled=compiled, **kwargs: (
            _compiled(*args, **kwargs) if _layer.training else _eager(*args, **kwargs)
        )
    return len(layers)


def apply_cuda_levers(peft_model: torch.nn.Module) -> list[str]:
    """Apply every lever to a LoRA-wrapped 4-bit Llama on CUDA; returns their names for the log."""
    causal_lm = peft_model.get_base_model()
    applied = [f"one dequantization per pass on {dequantize_once_per_pass(causal_lm)} 4-bit linears"]
    if fuse_linear_cross_entropy(causal_lm):
        applied.append("fused linear cross-entropy (liger-kernel)")
    applied.append(f"{compile_decoder_layers(causal_lm.model.layers)} compiled decoder layers")
    return applied
