"""How far one model's next-token distributions are from another's on the same tokens: the one comparison.

Surgery's `verify` asks it of a widened model (is it exact?), eval's preservation of every model of a run (did
the surgery keep the base's function, how far did training move it?). Both must mean the same thing by "max
|delta|" and "KL", so both call `logit_agreement`; what each feeds it (which dtype, which tokens) is the
caller's policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LogitAgreement:
    """Agreement of `other`'s logits with `base`'s over every position of every text."""

    max_abs_delta: float
    relative_delta: float  # max_abs_delta / the largest |base logit|: comparable across models and vocabularies
    mean_kl: float  # KL(base || other) in nats, averaged over positions
    top1_agreement: float
    positions: int
    texts: int
    finite: bool  # every logit of `other` is finite

    def to_dict(self) -> dict:
        return asdict(self)


def logit_agreement(base: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> LogitAgreement:
    """Compare [positions, vocab] logits text by text; both lists come from the same token ids."""
    if not base or len(base) != len(other) or any(b.shape != o.shape for b, o in zip(base, other, strict=True)):
        raise ValueError("logits to compare must come from the same (non-empty) tokens and vocabulary")
    max_delta = max_logit = kl_sum = 0.0
    agree = positions = 0
    finite = True
    for b, o in zip(base, other, strict=True):
        b, o = b.double(), o.double()
        finite = finite and bool(torch.isfinite(o).all())
        max_delta = max(max_delta, (b - o).abs().max().item())
        max_logit = max(max_logit, b.abs().max().item())
        # float64: the KL of near-identical distributions is a difference of nearly equal sums
        log_p, log_q = F.log_softmax(b, dim=-1), F.log_softmax(o, dim=-1)
        kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        agree += (b.argmax(-1) == o.argmax(-1)).sum().item()
        positions += b.shape[0]
    return LogitAgreement(
        max_abs_delta=max_delta,
        relative_delta=max_delta / max(max_logit, 1e-12),
        mean_kl=max(kl_sum / positions, 0.0),  # KL is >= 0; a tiny negative value is rounding
        top1_agreement=agree / positions,
        positions=positions,
        texts=len(base),
        finite=finite,
    )
