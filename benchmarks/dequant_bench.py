"""NF4 dequantization: train/nf4_kernel.py's one Triton kernel, and torch ops compiled by inductor, vs bitsandbytes.

Baseline: `bitsandbytes.functional.dequantize_4bit` (three kernels: the 8-bit absmax, its offset, the 4-bit
weights), in the same run, on the same packed weights: the 22b's two weight shapes (6656 x 6656 for q/k/v/o,
17920 x 6656 for gate/up/down), double-quantized NF4 in blocks of 64, bf16 out. Each is timed over `--repeats`
calls after a warm-up (CUDA events), reported as time per call and the bandwidth it reaches (0.5 byte read + 2 bytes
written per weight, the absmax ignored). Outputs must equal bitsandbytes' bit for bit. The compiled-torch version
(the 4-bit part in torch ops for inductor, the absmax still by bitsandbytes) was the first idea; it measured slower.
Ends with `dequant_bench: one Triton kernel vs bitsandbytes X.XXx, compiled torch ops Y.YYx (bit-exact: ...)`.

    python benchmarks/dequant_bench.py
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"q/k/v/o (6656 x 6656)": (6656, 6656), "gate/up/down (17920 x 6656)": (17920, 6656)}


def time_calls(fn, repeats: int) -> float:
    """Seconds per call, CUDA-event timed after three warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf

    from train.nf4_kernel import dequantize, dequantize_in_torch

    def torch_ops(packed, state):
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return dequantize_in_torch(packed, absmax, state.code, state.blocksize, list(state.shape), state.dtype)

    methods = {"bitsandbytes": bnbf.dequantize_4bit, "one Triton kernel": dequantize,
               "compiled torch ops": torch.compile(torch_ops, dynamic=False)}
    torch.manual_seed(0)
    print("| weight | " + " | ".join(f"{name} ms | TB/s" for name in methods) + " |")
    print("|---|" + "---|---|" * len(methods))
    total = dict.fromkeys(methods, 0.0)
    exact = dict.fromkeys(methods, True)
    for label, shape in SHAPES.items():
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        expected = bnbf.dequantize_4bit(packed, state)
        cells = []
        for name, method in methods.items():
            exact[name] &= torch.equal(method(packed, state), expected)
            seconds = time_calls(functools.partial(method, packed, state), args.repeats)
            total[name] += seconds
            cells.append(f"{seconds * 1e3:.3f} | {weight.numel() * 2.5 / seconds / 1e12:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    ratio = {name: total["bitsandbytes"] / seconds for name, seconds in total.items()}
    print(f"dequant_bench: one Triton kernel vs bitsandbytes {ratio['one Triton kernel']:.2f}x, compiled torch ops "
          f"{ratio['compiled torch ops']:.2f}x (bit-exact: Triton {'yes' if exact['one Triton kernel'] else 'no'}, "
          f"torch {'yes' if exact['compiled torch ops'] else 'no'})")


if __name__ == "__main__":
    main()
