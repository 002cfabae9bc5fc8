"""What aligning a llama-30b donor costs: one decoder layer rotated, against re-indexing it (the permutation).

Baseline: `permutation` on the same in-memory bf16 layer (a signed permutation of the residual coordinates: only
indexing, what `surgery.align: permutation` does per tensor). Measured in the same run on the same tensors:
`rotation, whole layer` (every matrix of the layer, as `python -m surgery align` writes it: ~7 TFLOP at
llama-30b's widths), and `rotation, graft` (only the rows a 13b -> 22b graft reads from one donor layer, as
`surgery.align: rotation` computes them). Rotations run in fp32 on CUDA when there is one (TF32 off), including
the copies to and from the device; tensors start and end in CPU memory, as the aligned reader has them. Then the
one-off fits on the embeddings: the rotation's float64 least squares on the CPU, and the permutation's Hungarian
assignment (skipped when scipy is missing).

    python benchmarks/align_bench.py                 # llama-30b layer, llama-2-13b base widths
    python benchmarks/align_bench.py --quick         # small widths: proves the script runs, in seconds
    python benchmarks/align_bench.py --skip-fit      # layer timings only

Needs torch only (plus scipy for the permutation fit); run from the repository root.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.alignment import Rotation, SignedPermutation, fit_permutation, fit_rotation

FULL = {"donor_hidden": 6656, "donor_inter": 17920, "base_hidden": 5120, "base_inter": 13824, "vocab": 32000}
QUICK = {"donor_hidden": 1024, "donor_inter": 2816, "base_hidden": 768, "base_inter": 2048, "vocab": 8000}
READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def layer_tensors(widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """A random bf16 llama decoder layer (no GQA, as in llama-30b), in CPU memory."""
    hidden, inter = widths["donor_hidden"], widths["donor_inter"]
    generator = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter), "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,)}
    return {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}


def new_rows(name: str, widths: dict[str, int]) -> slice:
    """The rows of a donor tensor that a graft onto the base reads (its new units, or the new residual dims)."""
    if name in ("gate_proj", "up_proj"):
        return slice(widths["base_inter"], widths["donor_inter"])
    return slice(widths["base_hidden"], widths["donor_hidden"])


def transform_layer(transform, layer: dict[str, torch.Tensor], rows_of=None) -> float:
    """Apply the transform to every matrix of the layer; `rows_of(name)` limits each to the graft's rows.
    Returns the fp32 FLOPs of its matmuls (0 for a permutation, which has none)."""
    gains = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
             "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
    everything, flops = slice(None), 0.0
    matmuls = transform.method == "rotation"
    for name, weight in layer.items():
        if weight.dim() == 1:
            transform.gain(weight, everything)
            continue
        rows = rows_of(name) if rows_of else everything
        if name in READERS:
            part = weight[rows]
            out = transform.read(part, everything, layer[gains[name]] if transform.folds_gains else None)
            flops += 2 * part.shape[0] * part.shape[1] * out.shape[1] * matmuls
        else:
            out = transform.write(weight, rows)
            flops += 2 * out.shape[0] * weight.shape[0] * weight.shape[1] * matmuls
    return flops


def timed(run, repeats: int, device: torch.device) -> tuple[float, float]:
    """(best seconds, FLOPs) of `run()` over `repeats` runs, after one warm-up on CUDA (kernel selection, the
    allocator's first blocks)."""
    if device.type == "cuda":
        run()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        flops = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best, flops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small widths, to prove the script runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default: 3 on CUDA, 1 "
                        "on CPU)")
    parser.add_argument("--skip-fit", action="store_true", help="leave out the embedding fits")
    args = parser.parse_args()
    widths = QUICK if args.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    torch.backends.cuda.matmul.allow_tf32 = False  # the aligned donor must compute the donor's function in fp32
    hidden = widths["donor_hidden"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    warm_up = " after a warm-up" if device.type == "cuda" else ""
    print(f"device: {name}; torch {torch.__version__}; donor layer hidden {hidden}, intermediate "
          f"{widths['donor_inter']}; graft from base hidden {widths['base_hidden']}, "
          f"intermediate {widths['base_inter']}; best of {repeats}{warm_up}")

    layer = layer_tensors(widths)
    generator = torch.Generator().manual_seed(1)
    rotation = Rotation(torch.linalg.qr(torch.randn(hidden, hidden, generator=generator)).Q.to(device))
    permutation = SignedPermutation(torch.randperm(hidden, generator=generator),
                                    torch.where(torch.rand(hidden, generator=generator) < 0.5, -1.0, 1.0))
    results = [
        ("permutation, whole layer (baseline)", *timed(lambda: transform_layer(permutation, layer), repeats, device)),
        ("rotation, whole layer", *timed(lambda: transform_layer(rotation, layer), repeats, device)),
        ("rotation, graft rows only", *timed(
            lambda: transform_layer(rotation, layer, lambda n: new_rows(n, widths)), repeats, device)),
    ]
    baseline = results[0][1]
    print("\n| variant | TFLOP | seconds | TFLOP/s | vs permutation |\n|---|---|---|---|---|")
    for label, seconds, flops in results:
        rate = f"{flops / seconds / 1e12:.2f}" if flops else "-"
        print(f"| {label} | {flops / 1e12:.2f} | {seconds:.3f} | {rate} | {seconds / baseline:.1f}x |")

    if args.skip_fit:
        return 0
    vocab, base_hidden = widths["vocab"], widths["base_hidden"]
    donor_embed = (torch.randn(vocab, hidden, generator=generator) * 0.02).to(torch.bfloat16)
    base_embed = (torch.randn(vocab, base_hidden, generator=generator) * 0.02).to(torch.bfloat16)
    print(f"\nfits on the embeddings ({vocab} x {hidden} donor, {vocab} x {base_hidden} base), once per donor, "
          f"on {device.type} as the surgery runs them:")
    started = time.perf_counter()
    fit_rotation(donor_embed, base_embed, device)
    print(f"| rotation: float64 least squares + nearest orthonormal columns | {time.perf_counter() - started:.1f} s |")
    try:
        started = time.perf_counter()
        fit_permutation(donor_embed, base_embed, device)
        print(f"| permutation: correlations + Hungarian assignment (CPU) | {time.perf_counter() - started:.1f} s |")
    except ImportError as err:
        print(f"| permutation: skipped ({err}) | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
