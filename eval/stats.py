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


def paired_ratio_difference(
    numerator: Sequence[float], reference_numerator: Sequence[float], denominator: Sequence[float]
) -> Estimate:
    """(sum numerator - sum reference_numerator) / sum denominator over the same units, with its standard error.

    Bits per byte is a ratio of totals (bits over bytes, each document weighing by its length), so a difference of
    two models' bits per byte on the same documents is this ratio, d_i being a document's bits difference and b_i its
    bytes. Its standard error is the ratio estimator's linearised one over the documents,
    sqrt(n/(n-1) * sum (d_i - D b_i)^2) / sum b_i: pairing removes each document's own difficulty, as
    paired_difference does for benchmark items.
    """
    n = len(denominator)
    if n == 0 or len(numerator) != n or len(reference_numerator) != n:
        raise ValueError("a paired ratio needs the same units on both sides")
    total = sum(denominator)
    differences = [a - b for a, b in zip(numerator, reference_numerator, strict=True)]
    value = sum(differences) / total
    if n < 2:
        return Estimate(value, None, n)
    residuals = sum((d - value * b) ** 2 for d, b in zip(differences, denominator, strict=True))
    return Estimate(value, math.sqrt(n / (n - 1) * residuals) / total, n)
