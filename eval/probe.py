"""The degeneration probe: greedy outputs on the shipped prompts, judged against the base on the same prompts.

Generation and scoring are pipeline.probing / pipeline.degeneration (the training watchdog uses the same);
this module runs them for one model and formats what a person reads in a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ProbeConfig
from pipeline.degeneration import Judgement, degeneration_verdict
from pipeline.probing import ProbeSample, generate_probe_samples, load_probe_prompts

EXIT_DEGENERATE = 3


@dataclass(frozen=True)
class ProbeResult:
    """One model's probe samples and the verdict on them."""

    label: str
    samples: list[ProbeSample]
    judgement: Judgement


def probe_model(
    label: str, model, tokenizer, config: ProbeConfig, base: ProbeResult | None = None
) -> ProbeResult:
    """Generate on the first `config.prompts` prompts; judge against `base` (absolute thresholds without)."""
    samples = generate_probe_samples(
        model, tokenizer, load_probe_prompts(config.prompts), config.max_new_tokens, config.batch_size
    )
    base_signals = [s.signals for s in base.samples] if base is not None else None
    return ProbeResult(label, samples, degeneration_verdict([s.signals for s in samples], base_signals))


def summary_lines(result: ProbeResult, flagged: int = 3) -> list[str]:
    """A few lines per model: verdict, rates, reasons, and the first flagged outputs verbatim."""
    rates = result.judgement.rates
    lines = [
        f"{result.label}: {result.judgement.verdict} over {rates.n} prompts: one-token loops "
        f"{rates.single_token_loop:.0%}, any loop {rates.any_loop:.0%}, empty {rates.empty:.0%}, "
        f"EOS reached {rates.eos_reached:.0%}, non-finite logits {rates.nonfinite:.0%}"
    ]
    lines += [f"  - {reason}" for reason in result.judgement.reasons]
    shown = [s for s in result.samples if s.signals.failure][:flagged]
    for sample in shown:
        signals = sample.signals
        detail = (f"{signals.run_token_text!r} (id {signals.run_token_id}) x{signals.longest_run}"
                  if signals.failure == "single-token loop" else f"{sample.output_text[:80]!r}")
        lines.append(f"  {sample.prompt.id} [{sample.prompt.kind}] {signals.failure}: {detail}")
    return lines
