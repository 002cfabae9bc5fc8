"""Greedy generation from the shipped probe prompts, scored by the degeneration detector.

Shared by the eval stage's probe and the training watchdog, so that a model is judged the same way during
training and after it. Decoding is greedy with every loop-hiding knob explicitly off (repetition_penalty=1,
no_repeat_ngram_size=0): those knobs exist to mask exactly the failure this looks for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from pipeline.degeneration import OutputSignals, output_signals

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).with_name("probe_prompts.jsonl")


@dataclass(frozen=True)
class ProbePrompt:
    """A probe prompt: `plain` text to continue, or a `chat` user turn (rendered with the chat template)."""

    id: str
    kind: str
    text: str


@dataclass(frozen=True)
class ProbeSample:
    """One prompt's greedy output and what the detector made of it."""

    prompt: ProbePrompt
    rendered: str
    output_ids: list[int]
    output_text: str
    signals: OutputSignals

    def to_dict(self) -> dict:
        return {
            "prompt_id": self.prompt.id,
            "kind": self.prompt.kind,
            "prompt": self.prompt.text,
            "output": self.output_text,
            "signals": self.signals.to_dict(),
        }


@cache
def _all_prompts() -> tuple[ProbePrompt, ...]:
    lines = PROMPTS_FILE.read_text().splitlines()
    return tuple(ProbePrompt(**json.loads(line)) for line in lines if line.strip())


def load_probe_prompts(count: int | None = None) -> list[ProbePrompt]:
    """The first `count` shipped prompts (all if None); the file alternates plain and chat prompts, so any
    prefix mixes both kinds."""
    prompts = list(_all_prompts())
    if count is not None and not 1 <= count <= len(prompts):
        raise ValueError(f"probe prompt count must be 1..{len(prompts)}, got {count}")
    return prompts if count is None else prompts[:count]


def render_prompt(tokenizer, prompt: ProbePrompt) -> tuple[str, bool]:
    """The text to feed the model, and whether the tokenizer should add its special tokens.

    Chat prompts use the tokenizer's chat template when it has one (the template writes its own BOS); a
    tokenizer without one gets a plain Q/A frame that base models continue naturally.
    """
    if prompt.kind == "chat":
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt.text}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
        return f"Q: {prompt.text}\nA:", True
    return prompt.text, True


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return sorted(ids)


class NonFiniteRecorder:
    """A logits processor that records, per step and row, whether the raw logits were non-finite.

    It passes scores through untouched. Greedy argmax over all-NaN logits returns id 0, which would look
    like an ordinary one-token loop; this tells the two apart. -inf alone is legitimate (masking), so a row
    counts when it has a NaN, a +inf, or nothing but -inf.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        self.steps.append(bad.cpu())
        return scores

    def row(self, index: int, n_steps: int) -> bool:
        return any(bool(step[index]) for step in self.steps[:n_steps])


@torch.no_grad()
def generate_probe_samples(
    model,
    tokenizer,
    prompts: list[ProbePrompt],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
) -> list[ProbeSample]:
    """Greedy, batched, left-padded generation for every prompt, each output scored by the detector.

    Prompts are batched in length order (less padding) and returned in the given order. The caller decides
    train/eval mode; this only needs the model to be in eval mode for deterministic output.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    # A fresh config, not the model's: checkpoints ship sampling defaults (temperature, top_p, penalties).
    generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
        use_cache=True,
    )
    device = next(model.parameters()).device
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    encoded = [tokenizer(text, add_special_tokens=special).input_ids for text, special in rendered]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: dict[int, ProbeSample] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="probe", unit="batch", disable=not progress, leave=False):
        # Left padding, so every row's generated tokens start at the same column; torch's own padding rather than
        # tokenizer.pad, which refuses tokenizers without a pad token (Llama-2's) and would need one set on the
        # caller's tokenizer (the watchdog's is the trainer's).
        rows = [torch.tensor(encoded[i], dtype=torch.long) for i in batch]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
        attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
        recorder = NonFiniteRecorder()
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([recorder]),
        )
        generated = output[:, input_ids.shape[1] :].cpu().tolist()
        for row, index in enumerate(batch):
            ids = generated[row]
            cut = next((k for k, t in enumerate(ids) if t in eos_ids), None)
            kept = ids if cut is None else ids[:cut]
            text = tokenizer.decode(kept, skip_special_tokens=False)
            signals = output_signals(
                ids,
                eos_token_ids=eos_ids,
                text=text,
                nonfinite_logits=recorder.row(row, len(ids) if cut is None else cut + 1),
                token_text=lambda t: tokenizer.decode([t], skip_special_tokens=False),
            )
            results[index] = ProbeSample(prompts[index], rendered[index][0], kept, text, signals)
    return [results[i] for i in range(len(prompts))]
