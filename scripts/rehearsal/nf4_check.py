"""Two checks of what the train stage trains on, the widened model quantized to NF4 (as train/model.py loads it):

1. zero blocks stay zero: every weight the surgery wrote as exactly 0 (the `readers` mode's writer rows and
   the top-right blocks of every linear) dequantizes to exactly 0, else the base's outputs would read the new
   dims and the exact construction would be lost before training starts;
2. the NF4 widened model tracks the NF4 base: on the same tokens, KL(base NF4 || widened NF4) is no larger than
   what quantization itself costs the base, KL(base bf16 || base NF4).

    python -m rehearsal.nf4_check BASE WIDENED OUT_JSON [--texts N] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda", 0), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load(folder: Path, nf4: bool, device: torch.device, dtype: torch.dtype):
    """NF4 exactly as the train stage loads it (train.model.load_base_model, zero blocks coded included), or the
    stored weights in `dtype`."""
    from transformers import AutoModelForCausalLM

    from train.model import load_base_model

    if nf4:
        model = load_base_model(folder, "nf4", device)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": str(device)})
    model.config.use_cache = False
    return model.eval()


@torch.no_grad()
def logits(model, token_ids: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()
            for ids in token_ids]


def zero_block_violations(model, folder: Path) -> dict[str, int]:
    """Per projection kind: how many exact zeros of the stored weights dequantize to something else."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from pipeline.checkpoint import CheckpointReader

    reader = CheckpointReader(folder)
    counts = {"zeros_checked": 0}
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        stored = reader.get(f"{name}.weight")
        zeros = (stored == 0).to(module.weight.device)
        restored = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        kind = name.rsplit(".", 1)[-1]
        counts[kind] = counts.get(kind, 0) + int((restored[zeros] != 0).sum())
        counts["zeros_checked"] += int(zeros.sum())
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("widened", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pipeline.logits import logit_agreement
    from rehearsal.tokenizer import corpus_texts

    device, dtype = device_and_dtype()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    token_ids = [tokenizer(text).input_ids[: args.tokens] for text in corpus_texts()[-args.texts:]]

    widened = load(args.widened, True, device, dtype)
    violations = zero_block_violations(widened, args.widened)
    widened_nf4 = logits(widened, token_ids, device)
    del widened
    base = load(args.base, True, device, dtype)
    base_nf4 = logits(base, token_ids, device)
    del base
    base = load(args.base, False, device, dtype)
    base_full = logits(base, token_ids, device)
    del base

    surgery = logit_agreement(base_nf4, widened_nf4)
    quantization = logit_agreement(base_full, base_nf4)
    zeros_ok = all(count == 0 for kind, count in violations.items() if kind != "zeros_checked")
    result = {
        "device": str(device),
        "zero_block_violations": violations,
        "zero_blocks_kept": zeros_ok and violations["zeros_checked"] > 0,
        "widened_nf4_vs_base_nf4": surgery.to_dict(),
        "base_nf4_vs_base_full": quantization.to_dict(),
        "tracks": surgery.finite and surgery.mean_kl <= quantization.mean_kl,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"nf4: {violations['zeros_checked']:,} stored zeros, dequantized non-zero: "
          f"{ {k: v for k, v in violations.items() if k != 'zeros_checked'} }")
    print(f"nf4: KL(base NF4 || widened NF4) {surgery.mean_kl:.3g}, top-1 {100 * surgery.top1_agreement:.1f}%; "
          f"quantization's own KL(base {str(dtype).removeprefix('torch.')} || base NF4) {quantization.mean_kl:.3g}")
    return 0 if result["zero_blocks_kept"] and result["tracks"] else 1


if __name__ == "__main__":
    sys.exit(main())
