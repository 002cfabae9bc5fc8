"""A Trainer callback that stops a run whose greedy samples degenerate, before it spends the GPU budget.

The 2023 A=0 model trained to a beautiful loss curve and then emitted one token forever; loss does not show
it, samples do. Every `every_steps` optimizer steps this generates greedily from a few probe prompts, scores
the outputs with pipeline.degeneration against the outputs of the same prompts when training (re)started,
and logs samples and scores to `<output_dir>/watchdog.jsonl` (and a wandb table when a wandb run is active).
On DEGENERATE with `stop_on_degenerate`, it asks the Trainer to save a checkpoint and stop.

A model already degenerate when training starts is judged on absolute thresholds and stopped at the first
step: training it further is the waste this exists to prevent.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from pipeline.config import WatchdogConfig
from pipeline.degeneration import Judgement, OutputSignals, degeneration_verdict
from pipeline.probing import ProbePrompt, ProbeSample, generate_probe_samples, load_probe_prompts

log = logging.getLogger(__name__)

LOG_NAME = "watchdog.jsonl"


def _as_prompts(prompts: Sequence[ProbePrompt | str]) -> list[ProbePrompt]:
    return [p if isinstance(p, ProbePrompt) else ProbePrompt(id=f"w{i:02d}", kind="plain", text=p)
            for i, p in enumerate(prompts)]


class DegenerationWatchdog(TrainerCallback):
    """Greedy probe samples every K steps; save and stop when they degenerate.

    After training, `tripped` holds the judgement that stopped it (None if none did), so the caller can
    exit non-zero with the reason.
    """

    def __init__(
        self,
        tokenizer,
        every_steps: int,
        prompts: Sequence[ProbePrompt | str],
        max_new_tokens: int = 48,
        stop_on_degenerate: bool = True,
        output_dir: Path | str = ".",
    ):
        if every_steps <= 0:
            raise ValueError("every_steps must be positive")
        if not prompts:
            raise ValueError("the watchdog needs at least one probe prompt")
        self.tokenizer = tokenizer
        self.every_steps = every_steps
        self.prompts = _as_prompts(prompts)
        self.max_new_tokens = max_new_tokens
        self.stop_on_degenerate = stop_on_degenerate
        self.log_path = Path(output_dir) / LOG_NAME
        self.reference: list[OutputSignals] | None = None
        self.tripped: Judgement | None = None
        self._degenerate_at_start: Judgement | None = None

    @classmethod
    def from_config(cls, config: WatchdogConfig, tokenizer, output_dir: Path | str) -> DegenerationWatchdog:
        """The watchdog a train config asks for: the first `config.prompts` shipped probe prompts."""
        return cls(
            tokenizer,
            every_steps=config.every_steps,
            prompts=load_probe_prompts(config.prompts),
            max_new_tokens=config.max_new_tokens,
            stop_on_degenerate=config.stop_on_degenerate,
            output_dir=output_dir,
        )

    def _probe(self, model) -> list[ProbeSample]:
        """Greedy samples in eval mode (no dropout), then back to whatever mode training was in."""
        was_training = model.training
        model.eval()
        try:
            return generate_probe_samples(
                model, self.tokenizer, self.prompts, self.max_new_tokens, batch_size=len(self.prompts),
                progress=False,
            )
        finally:
            if was_training:
                model.train()

    def _record(self, state, step: int, samples: list[ProbeSample], judgement: Judgement) -> None:
        if not state.is_world_process_zero:
            return
        record = {"step": step, **judgement.to_dict(), "samples": [s.to_dict() for s in samples]}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        log.info("watchdog step %d: %s%s", step, judgement.verdict,
                 f" ({'; '.join(judgement.reasons)})" if judgement.reasons else "")
        wandb = sys.modules.get("wandb")  # a run can only be active if someone imported wandb
        if wandb is not None and getattr(wandb, "run", None) is not None:
            table = wandb.Table(
                columns=["step", "prompt", "output", "failure", "longest_run", "seq_rep_4", "eos_reached"],
                data=[[step, s.prompt.text, s.output_text, s.signals.failure or "", s.signals.longest_run,
                       s.signals.seq_rep_4, s.signals.eos_reached] for s in samples],
            )
            rates = judgement.rates
            wandb.log({
                "watchdog/samples": table,
                "watchdog/degenerate": int(judgement.verdict == "DEGENERATE"),
                "watchdog/single_token_loop_rate": rates.single_token_loop,
                "watchdog/any_loop_rate": rates.any_loop,
                "watchdog/eos_reached_rate": rates.eos_reached,
                "train/global_step": step,
            })

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        samples = self._probe(model)
        self.reference = [s.signals for s in samples]
        judgement = degeneration_verdict(self.reference)
        self._record(state, state.global_step, samples, judgement)
        if judgement.verdict == "DEGENERATE":
            log.error("watchdog: the model is already DEGENERATE as training starts (%s); check the surgery "
                      "output with `python -m eval probe --model <folder>`", "; ".join(judgement.reasons))
            self._degenerate_at_start = judgement
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._degenerate_at_start is not None:
            judgement, self._degenerate_at_start = self._degenerate_at_start, None
        elif state.global_step % self.every_steps == 0:
            samples = self._probe(model)
            judgement = degeneration_verdict([s.signals for s in samples], self.reference)
            self._record(state, state.global_step, samples, judgement)
        else:
            return control
        if judgement.verdict == "DEGENERATE" and self.stop_on_degenerate:
            self.tripped = judgement
            control.should_save = True
            control.should_training_stop = True
            example = f"; e.g. {judgement.examples[0]}" if judgement.examples else ""
            log.error(
                "watchdog: greedy samples DEGENERATE at step %d (%s%s). Saving checkpoint-%d and stopping "
                "training; samples are in %s",
                state.global_step, "; ".join(judgement.reasons), example, state.global_step, self.log_path,
            )
        return control
