"""Held-out loss during training: a fixed small set of held-out windows, scored by the HF Trainer's evaluation loop.

The set is the first documents of the slice's held-out share (heldout.jsonl, never trained on), scored the way the
eval stage scores its held-out perplexity: each document on its own, in windows of `seq_len` tokens that overlap by
one (every token but the document's first is predicted exactly once, the context restarting at each window), right
padding masked out of attention and loss. It stops at `eval_blocks` windows; the document that would run past them
is cut, as text, to a prefix that fits, so every byte counted is a byte scored.

Reported, for `frankenllama compare` and wandb: `heldout_loss` (nats per predicted token, summed over the whole set,
not a mean of batch means) and `heldout_bits_per_byte` (the same sum in bits over the UTF-8 bytes those tokens
cover; comparable across tokenizers). The Trainer's loop shards the windows over the processes and gathers the
per-window sums back, dropping the windows it repeats to even out the shards, so several processes report what one
does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # what HF causal LMs leave out of the loss


@dataclass(frozen=True)
class HeldoutWindows:
    """The evaluation set: windows ready for the Trainer, and what they cover."""

    windows: list[dict[str, torch.Tensor]]
    texts: list[str]  # the documents scored, the last one possibly cut to a prefix
    predicted_tokens: int
    predicted_bytes: int


def read_texts(path: Path) -> Iterator[str]:
    """The `text` of each line of a held-out jsonl file, in order, read lazily (only the first few are needed)."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)["text"]


def _fit(text: str, tokenize, max_ids: int) -> tuple[str, list[int]]:
    """`text` if it tokenizes to at most `max_ids` ids, else a prefix of it (cut by characters) that does."""
    ids = tokenize(text)
    while len(ids) > max_ids and text:
        text = text[: int(len(text) * max_ids / len(ids) * 0.95)]
        ids = tokenize(text)
    return text, ids


def heldout_windows(texts: Iterable[str], tokenizer, seq_len: int, max_windows: int) -> HeldoutWindows:
    """Up to `max_windows` windows of `seq_len` tokens from the first documents of `texts`.

    Bytes are counted like the eval stage's perplexity: a document's UTF-8 bytes, less those of its first token
    when that token is text (it is never predicted) rather than a special token such as BOS.
    """
    special = set(tokenizer.all_special_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, verbose=False).input_ids

    windows: list[dict[str, torch.Tensor]] = []
    scored: list[str] = []
    tokens = n_bytes = 0
    for text in texts:
        room = max_windows - len(windows)
        if room <= 0:
            break
        text, ids = _fit(text, tokenize, room * (seq_len - 1) + 1)
        if len(ids) < 2:
            continue
        for start in range(0, len(ids) - 1, seq_len - 1):
            chunk = ids[start : start + seq_len]
            input_ids = torch.full((seq_len,), pad, dtype=torch.long)
            input_ids[: len(chunk)] = torch.tensor(chunk)
            mask = torch.zeros(seq_len, dtype=torch.long)
            mask[: len(chunk)] = 1
            labels = torch.where(mask.bool(), input_ids, IGNORE_INDEX)
            windows.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
        scored.append(text)
        tokens += len(ids) - 1
        n_bytes += len(text.encode("utf-8")) - (0 if ids[0] in special else len(tokenizer.decode(ids[:1]).encode()))
    return HeldoutWindows(windows, scored, tokens, n_bytes)


def window_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per window: [summed NLL in nats, predicted tokens]; the Trainer's preprocess_logits_for_metrics hook.

    Reducing here keeps the evaluation loop from gathering (windows x seq_len x vocab) logits; one window's logits
    are upcast at a time.
    """
    sums = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        targets = row_labels[1:]
        nll = F.cross_entropy(row_logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        sums.append(torch.stack([nll, (targets != IGNORE_INDEX).sum().to(nll.dtype)]))
    return torch.stack(sums)


class HeldoutMetrics:
    """The Trainer's compute_metrics: the gathered per-window sums -> heldout_loss and heldout_bits_per_byte."""

    def __init__(self, heldout: HeldoutWindows):
        self.heldout = heldout

    def __call__(self, prediction) -> dict[str, float]:
        sums = np.asarray(prediction.predictions, dtype=np.float64).reshape(-1, 2)
        nll, predicted = sums[:, 0].sum(), round(float(sums[:, 1].sum()))
        if predicted != self.heldout.predicted_tokens:
            raise RuntimeError(f"held-out evaluation scored {predicted} tokens, expected "
                               f"{self.heldout.predicted_tokens}: a window was lost or repeated")
        return {
            "heldout_loss": nll / predicted,
            "heldout_bits_per_byte": nll / math.log(2) / self.heldout.predicted_bytes,
            "heldout_tokens": predicted,
        }
