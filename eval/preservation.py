"""Does the widened model still compute the base's function? Logits of both on the same held-out tokens.

The surgery's exact modes promise identical logits up to float rounding; a trained model is expected to
drift, and how far (KL) is worth seeing too. The base's logits are kept (fp32, on CPU) so that only one
model is ever loaded at a time; they are computed in float32 for every model (eval/precision.py says why), and
the comparison itself is pipeline.logits.logit_agreement, the same one `python -m surgery verify` uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eval.placement import input_device

FALLBACK_TEXT = Path(__file__).with_name("fixtures") / "heldout_text.jsonl"


def preservation_token_ids(tokenizer, texts: list[str], count: int, max_tokens: int) -> list[list[int]]:
    """Up to `count` texts, each cut to `max_tokens` tokens (texts of one token say nothing)."""
    batches = []
    for text in texts:
        ids = tokenizer(text).input_ids[:max_tokens]
        if len(ids) > 1:
            batches.append(ids)
        if len(batches) == count:
            break
    return batches


def fallback_texts() -> list[str]:
    """A few shipped paragraphs, for runs without the train stage's held-out slice."""
    return [json.loads(line)["text"] for line in FALLBACK_TEXT.read_text().splitlines() if line.strip()]


@torch.no_grad()
def logits_on(model, token_ids: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits on CPU, one [tokens, vocab] tensor per text, from one batched forward without a KV cache.

    One forward for all texts, so a model whose layers accelerate streams from CPU RAM or disk reads its weights
    once. The texts are right-padded and need no attention mask: under causal attention no real token attends to
    a later position, and the pads' own logits are cut off.
    """
    device = input_device(model)
    rows = [torch.tensor(ids) for ids in token_ids]
    batch = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0).to(device)
    logits = model(input_ids=batch, use_cache=False).logits
    return [logits[row, : len(ids)].float().cpu() for row, ids in enumerate(token_ids)]
