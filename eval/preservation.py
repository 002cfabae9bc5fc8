"""Does the widened model still compute the base's function? Logits of both on the same held-out tokens.

The surgery's exact modes promise identical logits up to float rounding; a trained model is expected to
drift, and how far (KL) is worth seeing too. The base's logits are kept (fp32, on CPU) so that only one
model is ever loaded at a time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FALLBACK_TEXT = Path(__file__).with_name("fixtures") / "heldout_text.jsonl"


@dataclass(frozen=True)
class Preservation:
    """Agreement of a model's next-token distributions with the base's over `tokens` positions."""

    max_abs_logit_delta: float
    mean_kl_base_to_model: float  # KL(base || model) in nats, averaged over positions
    top1_agreement: float
    tokens: int
    texts: int

    def to_dict(self) -> dict:
        return asdict(self)


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
    """fp32 logits on CPU, one [tokens, vocab] tensor per text."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in token_ids]


def compare_logits(base: list[torch.Tensor], other: list[torch.Tensor]) -> Preservation:
    """max |delta logits|, mean KL(base || other) and top-1 agreement over every position of every text."""
    if len(base) != len(other) or any(b.shape != o.shape for b, o in zip(base, other, strict=True)):
        raise ValueError("logits to compare must come from the same tokens and vocabulary")
    max_delta, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    for b, o in zip(base, other, strict=True):
        max_delta = max(max_delta, (b - o).abs().max().item())
        # float64: the KL of near-identical distributions is a difference of nearly equal sums
        log_p, log_q = F.log_softmax(b.double(), dim=-1), F.log_softmax(o.double(), dim=-1)
        kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        agree += (b.argmax(-1) == o.argmax(-1)).sum().item()
        positions += b.shape[0]
    return Preservation(
        max_abs_logit_delta=max_delta,
        mean_kl_base_to_model=kl_sum / positions,
        top1_agreement=agree / positions,
        tokens=positions,
        texts=len(base),
    )
