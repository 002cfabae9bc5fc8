"""A Trainer callback that stops a run whose greedy samples degenerate, before it spends the GPU budget.

The 2023 A=0 model trained to a beautiful loss curve and then emitted one token forever; loss does not show
it, samples do. Every `every_steps` optimizer steps this generates greedily from a few probe prompts, scores
the outputs with pipeline.degeneration against the *reference*, and logs samples and scores to
`<output_dir>/watchdog.jsonl` (and a wandb table when a wandb run is active). On DEGENERATE with
`stop_on_degenerate`, it asks the Trainer to save a checkpoint and stop.

The reference is the model as the run started: the first probe of a run is written to watchdog.jsonl marked
`"reference": true`, and every later judgement, across any number of resumes, is against it. A resumed run
probes once more as it starts and judges that against the stored reference, so a run that crashed while it
was degenerating is caught at once; a partly trained model never becomes its own reference. Only a run without
a stored reference for the same prompts and output length (the watchdog was off, or its settings changed)
probes a new one.

A model already degenerate when training starts is judged on absolute thresholds and stopped at the first
step: training it further is the waste this exists to prevent. Measured against such a reference nothing
would look worse, so a degenerate reference keeps every later judgement absolute.
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
        self.reference_step: int | None = None
        self._reference_degenerate = False
        self.tripped: Judgement | None = None
        self._degenerate_on_start: Judgement | None = None

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

    def _stored_reference(self) -> tuple[int, list[OutputSignals]] | None:
        """(step, signals) of the first reference record in watchdog.jsonl made with this watchdog's prompts and
        output length; None if there is none. Unreadable lines (a write torn by a kill) are skipped."""
        if not self.log_path.is_file():
            return None
        prompt_ids = [p.id for p in self.prompts]
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
                if (record.get("reference") and record.get("max_new_tokens") == self.max_new_tokens
                        and [s["prompt_id"] for s in record["samples"]] == prompt_ids):
                    return record["step"], [OutputSignals(**s["signals"]) for s in record["samples"]]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        return None

    def _judge(self, samples: list[ProbeSample]) -> Judgement:
        """Against the reference; on absolute thresholds when the reference itself was degenerate."""
        signals = [s.signals for s in samples]
        return degeneration_verdict(signals, None if self._reference_degenerate else self.reference)

    def _record(self, state, step: int, samples: list[ProbeSample], judgement: Judgement,
                reference: bool = False) -> None:
        if not state.is_world_process_zero:
            return
        record = {"step": step, **judgement.to_dict(), "reference": reference, "reference_step": self.reference_step,
                  "max_new_tokens": self.max_new_tokens, "samples": [s.to_dict() for s in samples]}
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
        stored = self._stored_reference()
        if stored is None:
            self.reference_step, self.reference = state.global_step, [s.signals for s in samples]
            judgement = degeneration_verdict(self.reference)
            self._reference_degenerate = judgement.verdict == "DEGENERATE"
            if state.global_step > 0:
                log.info("watchdog: no start-of-run reference for these probe settings in %s; the model at step %d "
                         "becomes the reference", self.log_path, state.global_step)
            self._record(state, state.global_step, samples, judgement, reference=True)
        else:
            self.reference_step, self.reference = stored
            self._reference_degenerate = degeneration_verdict(self.reference).verdict == "DEGENERATE"
            judgement = self._judge(samples)
            log.info("watchdog: judging against the step-%d reference in %s", self.reference_step, self.log_path)
            self._record(state, state.global_step, samples, judgement)
        if judgement.verdict == "DEGENERATE":
            log.error("watchdog: the model is already DEGENERATE as training %s at step %d (%s); check the model "
                      "with `python -m eval probe --model <folder>`", "resumes" if stored else "starts",
                      state.global_step, "; ".join(judgement.reasons))
            self._degenerate_on_start = judgement
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._degenerate_on_start is not None:
            judgement, self._degenerate_on_start = self._degenerate_on_start, None
        elif state.global_step % self.every_steps == 0:
            samples = self._probe(model)
            judgement = self._judge(samples)
            self._record(state, state.global_step, samples, judgement)
        else:
            return control
        if judgement.verdict == "DEGENERATE" and self.stop_on_degenerate:
            self.tripped = judgement
            control.should_save = True
            control.should_training_stop = True
            example = f"; e.g. {judgement.examples[0]}" if judgement.examples else ""
            log.error(
                "watchdog: greedy samples DEGENERATE at step %d against the step-%d reference (%s%s). Saving "
                "checkpoint-%d and stopping training; samples are in %s",
                state.global_step, self.reference_step, "; ".join(judgement.reasons), example, state.global_step,
                self.log_path,
            )
        return control
