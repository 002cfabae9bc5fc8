"""Degenerate-output detector: per-output signals on generated ids, and a PASS / WARN / DEGENERATE verdict.

The failure this exists for is the 2023 "A=0" model: smooth loss curves, then one token forever. No library
ships a detector, so the signals are the ones the literature uses, computed on the *generated* ids only
(never the prompt, never the padding after EOS):

- longest run of one token, and which token (the A=0 signature; also what all-NaN logits look like, since
  argmax over NaN returns id 0);
- seq-rep-4 (Welleck et al. 2019): share of 4-grams that repeat an earlier 4-gram of the same output;
- tail loop: the shortest period p <= MAX_LOOP_PERIOD whose repetition fills the end of the output;
- distinct tokens over a fixed window (the last DISTINCT_WINDOW tokens), comparable across lengths;
- zlib compression ratio of the text (Whisper rejects decodes above 2.4);
- whether EOS was reached, and whether any step's logits were non-finite.

Healthy small models also loop under greedy decoding, so a model is judged against its base on the same
prompts (rates of failed outputs, not single outputs). Everything here is pure: ids and text in, numbers out.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

Verdict = Literal["PASS", "WARN", "DEGENERATE"]
Failure = Literal["non-finite logits", "empty output", "single-token loop", "phrase loop"]

# A run of 8 identical tokens does not occur in prose; BPE merges whitespace and punctuation runs into one
# token, so even code and tables stay far below it. The A=0 model produces runs as long as the output.
SINGLE_TOKEN_RUN = 8
# Phrase loops in the wild have short periods (a clause, a list item). 20 tokens covers a sentence.
MAX_LOOP_PERIOD = 20
# A tail loop counts when its phrase repeats at least 3 times and fills at least 40% of the output: two
# repetitions happen in normal text (a refrain, "step 1 ... step 2"), a loop that owns half the output is
# the model no longer conditioning on anything but itself.
MIN_LOOP_REPEATS = 3
TAIL_LOOP_SHARE = 0.4
# Half of all 4-grams repeated: far above prose (typically < 0.1 over 64 tokens), reached by any loop that
# survived a few periods even when it is not at the very end (a loop that was closed by EOS).
SEQ_REP_4 = 0.5
# Whisper's rule (openai/whisper transcribe.py, compression_ratio_threshold=2.4).
ZLIB_RATIO = 2.4
DISTINCT_WINDOW = 32


@dataclass(frozen=True)
class OutputSignals:
    """What the detector measured on one generated output."""

    n_tokens: int
    eos_reached: bool
    nonfinite_logits: bool
    longest_run: int
    run_token_id: int | None
    run_token_text: str | None
    seq_rep_4: float
    tail_loop_period: int
    tail_loop_share: float
    distinct_window: float
    zlib_ratio: float
    failure: Failure | None

    def to_dict(self) -> dict:
        return asdict(self)


def longest_token_run(ids: Sequence[int]) -> tuple[int, int | None]:
    """Length of the longest run of one repeated id, and that id (0, None for an empty output)."""
    best, best_id, run = 0, None, 0
    for i, token in enumerate(ids):
        run = run + 1 if i and ids[i - 1] == token else 1
        if run > best:
            best, best_id = run, token
    return best, best_id


def seq_rep_n(ids: Sequence[int], n: int = 4) -> float:
    """Welleck's seq-rep-n: 1 - unique n-grams / n-grams (0 when the output has no n-gram)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def tail_loop(ids: Sequence[int], max_period: int = MAX_LOOP_PERIOD) -> tuple[int, float]:
    """The shortest period whose repetition (>= MIN_LOOP_REPEATS times) covers the most of the output's end.

    Returns (period, share of the output covered); (0, 0.0) when no period repeats often enough.
    """
    n = len(ids)
    best_period, best_cover = 0, 0
    for period in range(1, min(max_period, n // MIN_LOOP_REPEATS) + 1):
        matched = 0  # tokens at the end equal to the token one period earlier
        while matched < n - period and ids[n - 1 - matched] == ids[n - 1 - matched - period]:
            matched += 1
        cover = matched + period
        if cover >= MIN_LOOP_REPEATS * period and cover > best_cover:
            best_period, best_cover = period, cover
    return best_period, (best_cover / n if n else 0.0)


def distinct_share(ids: Sequence[int], window: int = DISTINCT_WINDOW) -> float:
    """Distinct ids among the last `window` tokens (fewer if the output is shorter), as a share."""
    tail = list(ids[-window:])
    return len(set(tail)) / len(tail) if tail else 0.0


def zlib_ratio(text: str) -> float:
    """Raw bytes / zlib-compressed bytes of the text; repetitive text compresses far better than prose."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def classify_output(
    n_tokens: int, nonfinite: bool, longest_run: int, tail_share: float, tail_period: int, rep4: float, ratio: float
) -> Failure | None:
    """The one failure an output shows, most fundamental first (NaN logits explain any loop they cause)."""
    if nonfinite:
        return "non-finite logits"
    if n_tokens == 0:
        return "empty output"
    if longest_run >= SINGLE_TOKEN_RUN:
        return "single-token loop"
    if (tail_period and tail_share >= TAIL_LOOP_SHARE) or rep4 >= SEQ_REP_4 or ratio > ZLIB_RATIO:
        return "phrase loop"
    return None


def output_signals(
    generated_ids: Sequence[int],
    *,
    eos_token_ids: Sequence[int] = (),
    text: str | None = None,
    nonfinite_logits: bool = False,
    token_text: Callable[[int], str] | None = None,
) -> OutputSignals:
    """Measure one output. `generated_ids` excludes the prompt; it is cut at the first EOS (padding follows).

    `text` is the decoded output (for the zlib ratio); without it the ratio is taken over the ids' digits,
    which keeps the function usable on bare ids. `token_text` turns the repeated id into readable text.
    """
    ids = [int(t) for t in generated_ids]
    eos = set(eos_token_ids)
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    eos_reached = cut is not None
    ids = ids[:cut] if eos_reached else ids
    run, run_id = longest_token_run(ids)
    period, share = tail_loop(ids)
    rep4 = seq_rep_n(ids, 4)
    ratio = zlib_ratio(text if text is not None else " ".join(map(str, ids)))
    return OutputSignals(
        n_tokens=len(ids),
        eos_reached=eos_reached,
        nonfinite_logits=nonfinite_logits,
        longest_run=run,
        run_token_id=run_id,
        run_token_text=token_text(run_id) if token_text and run_id is not None else None,
        seq_rep_4=rep4,
        tail_loop_period=period,
        tail_loop_share=share,
        distinct_window=distinct_share(ids),
        zlib_ratio=ratio,
        failure=classify_output(len(ids), nonfinite_logits, run, share, period, rep4, ratio),
    )


@dataclass(frozen=True)
class FailureRates:
    """Per-model rates over a prompt set; the unit a verdict compares."""

    n: int
    single_token_loop: float
    any_loop: float
    empty: float
    nonfinite: float
    eos_reached: float
    mean_distinct: float

    @classmethod
    def of(cls, outputs: Sequence[OutputSignals]) -> FailureRates:
        n = len(outputs)
        if n == 0:
            raise ValueError("cannot judge a model on zero outputs")

        def share(pred: Callable[[OutputSignals], bool]) -> float:
            return sum(1 for o in outputs if pred(o)) / n

        return cls(
            n=n,
            single_token_loop=share(lambda o: o.failure == "single-token loop"),
            any_loop=share(lambda o: o.failure in ("single-token loop", "phrase loop")),
            empty=share(lambda o: o.failure == "empty output"),
            nonfinite=share(lambda o: o.nonfinite_logits),
            eos_reached=share(lambda o: o.eos_reached),
            mean_distinct=sum(o.distinct_window for o in outputs) / n,
        )


@dataclass(frozen=True)
class Limits:
    """How much worse than the reference a rate may get before WARN or DEGENERATE."""

    single_token_loop: tuple[float, float]  # (warn, degenerate)
    any_loop: tuple[float, float]
    empty: tuple[float, float]
    eos_drop_warn: float | None  # fall in the EOS-reached rate (masked-EOS training symptom)
    distinct_drop_warn: float | None


# Against the base on the same prompts. DEGENERATE needs half of all prompts to newly fail: the watchdog
# probes only a handful of prompts, where one flipped output is already 10-25 points, and the A=0 failure
# flips nearly all of them. WARN at a fifth to a quarter of the prompts: worth a look, not a stop.
RELATIVE_LIMITS = Limits(
    single_token_loop=(0.2, 0.5), any_loop=(0.25, 0.5), empty=(0.25, 0.5), eos_drop_warn=0.3, distinct_drop_warn=0.2
)
# With no base (the base itself, or a model evaluated alone): the rates are compared with zero. Healthy
# models loop under greedy decoding too (SmolLM2-135M-Instruct: 6 of the 60 shipped prompts over 64 tokens,
# none of them one-token loops; base models without instruction tuning, and longer outputs, loop more), so
# phrase loops alone only WARN when they are the rule and DEGENERATE only when nearly every output loops.
ABSOLUTE_LIMITS = Limits(
    single_token_loop=(0.2, 0.5), any_loop=(0.75, 0.95), empty=(0.25, 0.5), eos_drop_warn=None, distinct_drop_warn=None
)


@dataclass(frozen=True)
class Judgement:
    """A verdict with the reasons a reader needs to act on it, and the rates behind it."""

    verdict: Verdict
    reasons: list[str]
    rates: FailureRates
    base_rates: FailureRates | None = None
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "rates": asdict(self.rates),
            "base_rates": asdict(self.base_rates) if self.base_rates else None,
            "examples": self.examples,
        }


def _worst(verdicts: Sequence[Verdict]) -> Verdict:
    order: list[Verdict] = ["PASS", "WARN", "DEGENERATE"]
    return max(verdicts, key=order.index, default="PASS")


def degeneration_verdict(
    outputs: Sequence[OutputSignals], base_outputs: Sequence[OutputSignals] | None = None
) -> Judgement:
    """PASS / WARN / DEGENERATE for one model's outputs, against its base's outputs on the same prompts.

    Non-finite logits are DEGENERATE whatever the base does: no healthy model produces them.
    """
    rates = FailureRates.of(outputs)
    base = FailureRates.of(base_outputs) if base_outputs is not None else None
    limits = RELATIVE_LIMITS if base is not None else ABSOLUTE_LIMITS
    found: list[tuple[Verdict, str]] = []
    if rates.nonfinite > 0:
        found.append(("DEGENERATE", f"non-finite logits in {rates.nonfinite:.0%} of outputs"))
    for name, label in (
        ("single_token_loop", "repeat one token"),
        ("any_loop", "loop (one token or a phrase)"),
        ("empty", "are empty"),
    ):
        value, reference = getattr(rates, name), getattr(base, name) if base else 0.0
        warn, degenerate = getattr(limits, name)
        excess = value - reference
        level: Verdict | None = "DEGENERATE" if excess >= degenerate else "WARN" if excess >= warn else None
        if level:
            base_note = f" (base {reference:.0%})" if base else ""
            found.append((level, f"{value:.0%} of outputs {label}{base_note}"))
    if base is not None and limits.eos_drop_warn is not None and base.eos_reached - rates.eos_reached >= (
        limits.eos_drop_warn
    ):
        found.append(("WARN", f"EOS reached in {rates.eos_reached:.0%} of outputs (base {base.eos_reached:.0%}): "
                              "the model may have stopped learning to stop"))
    if base is not None and limits.distinct_drop_warn is not None and base.mean_distinct - rates.mean_distinct >= (
        limits.distinct_drop_warn
    ):
        found.append(("WARN", f"distinct tokens per {DISTINCT_WINDOW}-token window fell to "
                              f"{rates.mean_distinct:.2f} (base {base.mean_distinct:.2f})"))
    examples = [
        f"{o.run_token_text!r} (id {o.run_token_id}) x{o.longest_run}"
        for o in outputs
        if o.failure == "single-token loop"
    ][:3]
    return Judgement(
        verdict=_worst([level for level, _ in found]),
        reasons=[reason for _, reason in found],
        rates=rates,
        base_rates=base,
        examples=examples,
    )
