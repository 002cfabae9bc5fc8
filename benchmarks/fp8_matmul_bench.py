"""The frozen base's matmuls in FP8 (e4m3, per-token activation scales) against bf16, one decoder layer's worth.

Baseline: the bf16 products the fast recipe runs today, in the same run, on the same data: for each of the 22b's
three weight shapes (q/k/v/o 6656 x 6656, gate/up 17920 x 6656, down 6656 x 17920) at 4096 tokens (seq 2048 x
micro-batch 2, or 4096 x 1), the forward product x W^T and the input gradient g W. The FP8 side pays for
everything it adds: each activation or gradient quantized per row, the dequantized bf16 weight quantized per tensor
(and, for the backward, transposed, because the second operand of an FP8 product must be column-major), each step
compiled on its own (inside a compiled layer inductor fuses them with their neighbours, so this is the dearer
case). Timed with CUDA events over `--repeats` calls; the relative error of each FP8 product against the fp32
product of the same bf16 operands is printed next to bf16's own. Ends with
`fp8_matmul_bench: one layer's frozen products, FP8 vs bf16 X.XXx (forward Y.YYx, input gradient Z.ZZx)`.

    python benchmarks/fp8_matmul_bench.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dequant_bench import time_calls

TOKENS = 4096
# name: (out_features, in_features, how many of them a Llama layer has)
SHAPES = {"q/k/v/o": (6656, 6656, 4), "gate/up": (17920, 6656, 2), "down": (6656, 17920, 1)}
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


@torch.compile(dynamic=False)
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(E4M3), scale


@torch.compile(dynamic=False)
def quantize_tensor(w: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    w = w.t() if transpose else w
    return (w / scale).to(E4M3).contiguous(), scale


def relative_error(product: torch.Tensor, reference: torch.Tensor) -> float:
    return ((product.float() - reference).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--fast-accum", action="store_true", help="cuBLAS/CUTLASS fast accumulation in FP8 products")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| product | count | bf16 ms | FP8 product ms | FP8 with quantization ms | ratio | rel. error bf16 | "
          "rel. error FP8 |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {"forward": [0.0, 0.0], "input gradient": [0.0, 0.0]}
    for label, (out_features, in_features, count) in SHAPES.items():
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(TOKENS, out_features, device="cuda", dtype=torch.bfloat16) * 1e-3
        cases = {"forward": (x, weight, False), "input gradient": (grad, weight.t(), True)}
        for kind, (a, b, transpose) in cases.items():
            reference = a.float() @ b.t().float()

            def bf16(a=a, b=b):
                return a @ b.t()

            aq, a_scale = quantize_rows(a)
            bq, b_scale = quantize_tensor(weight, transpose)  # rows of bq are b's rows: b's columns in memory
            b_scales = b_scale.expand(1, bq.shape[0]).contiguous()

            def fp8_product(aq=aq, bq=bq, a_scale=a_scale, b_scales=b_scales):
                return torch._scaled_mm(aq, bq.t(), scale_a=a_scale, scale_b=b_scales, out_dtype=torch.bfloat16,
                                        use_fast_accum=args.fast_accum)

            def fp8_all(a=a, weight=weight, transpose=transpose):
                aq, a_scale = quantize_rows(a)
                bq, b_scale = quantize_tensor(weight, transpose)
                b_scales = b_scale.expand(1, bq.shape[0]).contiguous()
                return torch._scaled_mm(aq, bq.t(), scale_a=a_scale, scale_b=b_scales, out_dtype=torch.bfloat16,
                                        use_fast_accum=args.fast_accum)

            errors = relative_error(bf16(), reference), relative_error(fp8_all(), reference)
            seconds = [time_calls(fn, args.repeats) for fn in (bf16, fp8_product, fp8_all)]
            totals[kind][0] += seconds[0] * count
            totals[kind][1] += seconds[2] * count
            print(f"| {label} {kind} | {count} | {seconds[0] * 1e3:.3f} | {seconds[1] * 1e3:.3f} | "
                  f"{seconds[2] * 1e3:.3f} | {seconds[0] / seconds[2]:.2f}x | {errors[0]:.4f} | {errors[1]:.4f} |")
    ratio = {kind: bf16 / fp8 for kind, (bf16, fp8) in totals.items()}
    overall = sum(t[0] for t in totals.values()) / sum(t[1] for t in totals.values())
    print(f"fp8_matmul_bench: one layer's frozen products, FP8 vs bf16 {overall:.2f}x (forward "
          f"{ratio['forward']:.2f}x, input gradient {ratio['input gradient']:.2f}x)")


if __name__ == "__main__":
    main()
