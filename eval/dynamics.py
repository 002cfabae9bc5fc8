"""Training curves against tokens seen: read from a trainer's log_history.json, smoothed, read off at a token count.

Runs are compared at equal tokens, not equal steps: a step's tokens depend on batch size, sequence length and the
number of GPUs, the tokens do not. The training loss is noisy from step to step (each step sees other blocks), so
it is smoothed before it is read off; the held-out loss is measured on one fixed set of documents and is used as
logged. In the first pass over the data every step's loss is measured on blocks the model has not yet trained on,
and two runs with the same seed draw the same blocks in the same order: their per-step difference is then a
paired held-out comparison, block by block (`difference`, `window_differences`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eval.stats import Estimate, mean_estimate

TRAINING_LOSS = "loss"  # nats/token, every optimizer step
HELDOUT_BITS_PER_BYTE = "heldout_bits_per_byte"  # the train stage's fixed held-out set, every train.eval_steps
# Smoothing span of the training loss, as a share of the logged points (at least MIN_SPAN points).
SPAN_SHARE = 0.1
MIN_SPAN = 5


@dataclass(frozen=True)
class Curve:
    """A logged quantity against tokens seen, tokens increasing."""

    tokens: tuple[float, ...]
    values: tuple[float, ...]

    @property
    def final(self) -> float:
        return self.values[-1]

    @property
    def final_tokens(self) -> float:
        return self.tokens[-1]

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "values": list(self.values)}


def read_curve(history: list[dict], key: str) -> Curve | None:
    """`key` against `tokens_seen` from a log history; the last entry wins where a resumed run logged a token count
    twice. None when no entry has both (a run that never logged that key)."""
    points: dict[float, float] = {}
    for entry in history:
        value, tokens = entry.get(key), entry.get("tokens_seen")
        if isinstance(value, (int, float)) and isinstance(tokens, (int, float)) and math.isfinite(value):
            points[float(tokens)] = float(value)
    if not points:
        return None
    tokens = sorted(points)
    return Curve(tuple(tokens), tuple(points[t] for t in tokens))


def smoothed(curve: Curve, span: int | None = None) -> Curve:
    """An exponential moving average over `span` points (default: SPAN_SHARE of them), bias-corrected so the first
    points are not pulled towards zero (TensorBoard's debiasing)."""
    span = span or max(MIN_SPAN, round(SPAN_SHARE * len(curve.values)))
    decay = 1 - 2 / (span + 1)
    average, weight, values = 0.0, 0.0, []
    for value in curve.values:
        average = decay * average + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        values.append(average / weight)
    return Curve(curve.tokens, tuple(values))


def value_at(curve: Curve, tokens: float) -> float | None:
    """The curve at a token count, linear between logged points; None outside the logged range."""
    xs, ys = curve.tokens, curve.values
    if not xs or tokens < xs[0] or tokens > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if tokens <= xs[i]:
            share = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + share * (ys[i] - ys[i - 1])
    return ys[0]


def tokens_to_reach(curve: Curve, target: float) -> float | None:
    """The token count from which on the curve stays at or below `target`, linear between logged points; None when
    it ends above it. A dip below the target that the curve climbs back out of does not count as reaching it (a
    training loss dips on every easy block)."""
    xs, ys = curve.tokens, curve.values
    above = [i for i, value in enumerate(ys) if value > target]
    if not above:
        return xs[0]
    last = above[-1]
    if last == len(ys) - 1:
        return None
    share = (ys[last] - target) / (ys[last] - ys[last + 1])
    return xs[last] + share * (xs[last + 1] - xs[last])


@dataclass(frozen=True)
class SeedBand:
    """Several seeds' curves on one token grid: their mean and their range."""

    tokens: tuple[float, ...]
    mean: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


def seed_band(curves: list[Curve]) -> SeedBand:
    """Mean and range of the curves at the first one's token counts, within the range every curve covers."""
    grid = [t for t in curves[0].tokens if all(value_at(c, t) is not None for c in curves)]
    columns = [[value_at(c, t) for c in curves] for t in grid]
    return SeedBand(tuple(grid), tuple(sum(col) / len(col) for col in columns), tuple(min(col) for col in columns),
                    tuple(max(col) for col in columns))


def difference(curve: Curve, reference: Curve) -> Curve | None:
    """`curve - reference` at the token counts both logged (the same steps, for runs with the same batch)."""
    at = dict(zip(reference.tokens, reference.values, strict=True))
    points = [(t, v - at[t]) for t, v in zip(curve.tokens, curve.values, strict=True) if t in at]
    if not points:
        return None
    return Curve(tuple(t for t, _ in points), tuple(v for _, v in points))


def history_difference(history: list[dict], reference_history: list[dict], key: str) -> Curve | None:
    """`difference` of the `key` curves two log histories hold; None when either logged none."""
    curve, reference = read_curve(history, key), read_curve(reference_history, key)
    return difference(curve, reference) if curve is not None and reference is not None else None


def window_differences(delta: Curve, windows: int) -> list[tuple[float, float, Estimate]]:
    """The per-step differences cut into `windows` consecutive stretches of training: (first tokens, last tokens,
    mean difference with its standard error over the steps) for each stretch that holds any step."""
    size = math.ceil(len(delta.tokens) / windows)
    stretches = []
    for start in range(0, len(delta.tokens), size):
        tokens, values = delta.tokens[start : start + size], delta.values[start : start + size]
        stretches.append((tokens[0], tokens[-1], mean_estimate(list(values))))
    return stretches
