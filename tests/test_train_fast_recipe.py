"""The fast recipe's CPU-checkable parts: one dequantization per pass computes exactly what bitsandbytes does."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from train.fast_recipe import dequantize_once_per_pass  # noqa: E402


def _nf4_linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 128) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True).to("cpu")
    return layer


def _forward_backward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.square().sum()).backward()
    return out.detach(), x.grad


def test_dequantize_once_matches_bitsandbytes_in_training_and_defers_in_eval():
    reference, patched = torch.nn.Sequential(_nf4_linear(0)), torch.nn.Sequential(_nf4_linear(0))
    assert dequantize_once_per_pass(patched) == 1
    x = torch.randn(3, 5, 128)
    reference.train()
    patched.train()
    out_ref, grad_ref = _forward_backward(reference, x)
    out_new, grad_new = _forward_backward(patched, x)
    assert torch.allclose(out_new, out_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_new, grad_ref, rtol=1e-5, atol=1e-6)
    # The patched forward keeps the dequantized weight for the backward: no second dequantization there.
    assert grad_new.abs().sum() > 0

    reference.eval()
    patched.eval()
    with torch.no_grad():
        assert torch.equal(patched(x), reference(x))


def test_output_keeps_the_input_dtype_so_an_fp32_stream_stays_fp32():
    layer = torch.nn.Sequential(_nf4_linear(1))
    layer[0].compute_dtype = torch.bfloat16
    dequantize_once_per_pass(layer)
    layer.train()
    out = layer(torch.randn(2, 128, dtype=torch.float32, requires_grad=True))
    assert out.dtype == torch.float32
