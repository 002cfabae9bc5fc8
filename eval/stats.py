"""Estimates with standard errors: per-benchmark means, MMLU's macro mean, the Average, paired differences.

A subset score without its error bar invites reading noise as signal (5 points at n=100). Every number the
report shows comes from here with its standard error and n. Standard errors use the sample standard
deviation (ddof=1), as lm-eval does; with fewer than two items there is none (None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Estimate:
    """A score (0..1 scale for accuracies), its standard error (None when n < 2), and the items behind it."""

    value: float
    stderr: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def mean_estimate(scores: Sequence[float]) -> Estimate:
    """Mean of per-item scores and the standard error of that mean."""
    n = len(scores)
    if n == 0:
        raise ValueError("no scores to average")
    mean = sum(scores) / n
    if n < 2:
        return Estimate(mean, None, n)
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def combine_equal_weight(parts: Sequence[Estimate]) -> Estimate:
    """Plain mean of independent estimates; its variance is the sum of their variances over k^2.

    This is MMLU's "mean over subjects" and the leaderboard's Average over benchmarks.
    """
    if not parts:
        raise ValueError("nothing to combine")
    k = len(parts)
    value = sum(p.value for p in parts) / k
    known = [p.stderr for p in parts if p.stderr is not None]
    stderr = math.sqrt(sum(se**2 for se in known)) / k if len(known) == k else None
    return Estimate(value, stderr, sum(p.n for p in parts))


def paired_difference(scores: Mapping[object, float], base_scores: Mapping[object, float]) -> Estimate:
    """Mean of per-item differences (model - base) over the items both scored, with the paired standard error.

    Pairing removes the item difficulty both models share, so the error bar on a difference is far smaller
    than the two scores' error bars combined.
    """
    common = [key for key in scores if key in base_scores]
    if not common:
        raise ValueError("the two models share no scored items")
    return mean_estimate([scores[key] - base_scores[key] for key in common])


def grouped_estimate(groups: Mapping[str, Sequence[float]]) -> Estimate:
    """Equal-weight mean over groups (MMLU subjects) of each group's mean; one group is a plain mean."""
    return combine_equal_weight([mean_estimate(list(scores)) for scores in groups.values()])


def grouped_paired_difference(
    groups: Mapping[str, Mapping[object, float]], base_groups: Mapping[str, Mapping[object, float]]
) -> Estimate:
    """Paired difference per group, then the equal-weight mean over the groups both models have."""
    shared = [name for name in groups if name in base_groups]
    if not shared:
        raise ValueError("the two models share no scored groups")
    return combine_equal_weight([paired_difference(groups[name], base_groups[name]) for name in shared])
