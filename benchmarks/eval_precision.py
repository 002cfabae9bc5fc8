"""How close eval's preservation numbers come to the README's bar for an exact surgery, against the old rule.

An exact `readers` widening of SmolLM2-135M-Instruct stored in fp16 (the base, as Llama-2-13b ships), written by
`python -m surgery` in bf16 to SmolLM2-360M's widths (as the 22b is written), compared with its base on the same
held-out tokens through eval's own functions (preservation_token_ids, logits_on, pipeline.logits):

- `old rule` (the baseline): what eval did when float32 did not fit the device: each model in its stored dtype
  (base fp16, widening bf16);
- `both bf16`: one half precision for both, with nothing in float32;
- `eval now`: float32 logits for both, as the stage computes preservation whatever its scoring precision.

Prints KL(base || widened), top-1 agreement and max |delta logit| per variant, and the old rule's KL over the new
one's. The README's bar: KL <= 1e-3 and top-1 >= 98%.

    python benchmarks/eval_precision.py                      # CPU, ~3 min on 2 busy cores
    python benchmarks/eval_precision.py --device cuda        # the same on a GPU (its own half-precision kernels)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from eval.preservation import fallback_texts, logits_on, preservation_token_ids
from pipeline.logits import logit_agreement
from pipeline.models import resolve_model
from surgery.cli import main as surgery_main

WIDTHS_360M = ["--hidden-size", "960", "--num-attention-heads", "15", "--num-key-value-heads", "5",
               "--intermediate-size", "2560"]
VARIANTS = {  # name -> (base dtype, widened dtype)
    "old rule: each in its stored dtype (baseline)": (torch.float16, torch.bfloat16),
    "both bf16": (torch.bfloat16, torch.bfloat16),
    "eval now: float32 logits for both": (torch.float32, torch.float32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--texts", type=int, default=16, help="preservation texts (eval.preservation.texts)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per text (eval.preservation.max_tokens)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    smollm2 = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    with tempfile.TemporaryDirectory() as tmp:
        base, widened = Path(tmp) / "base-fp16", Path(tmp) / "readers-bf16"
        AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float16).save_pretrained(base)
        tokenizer.save_pretrained(base)
        assert surgery_main(["--base", str(base), "--donor", "random", "--out", str(widened), "--mode", "readers",
                             "--dtype", "bfloat16", *WIDTHS_360M]) == 0
        ids = preservation_token_ids(tokenizer, fallback_texts(), args.texts, args.max_tokens)

        def logits(folder: Path, dtype: torch.dtype) -> list[torch.Tensor]:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
            return logits_on(model, ids)

        results = {name: logit_agreement(logits(base, b), logits(widened, w)) for name, (b, w) in VARIANTS.items()}
    print(f"SmolLM2-135M fp16 -> readers bf16 at 360M widths, {next(iter(results.values())).positions} positions "
          f"of {len(ids)} texts, on {args.device}")
    print("| variant | KL(base ‖ widened) | top-1 agreement | max abs Δ logit | within the bar |")
    print("|---|---|---|---|---|")
    for name, agreement in results.items():
        ok = agreement.mean_kl <= 1e-3 and agreement.top1_agreement >= 0.98
        print(f"| {name} | {agreement.mean_kl:.3g} | {agreement.top1_agreement:.1%} | "
              f"{agreement.max_abs_delta:.3g} | {'yes' if ok else 'no'} |")
    old, new = results[next(iter(VARIANTS))], results[list(VARIANTS)[-1]]
    print(f"eval_precision: the old rule's KL is {old.mean_kl / new.mean_kl:.1f}x eval's float32 preservation KL")


if __name__ == "__main__":
    main()
