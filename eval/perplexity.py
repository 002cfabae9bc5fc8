"""Bits per byte and token perplexity on the held-out documents the train stage set aside.

Bits per byte is comparable across tokenizers (a widened model keeps its base's, but a reader may compare
with other models); token perplexity is the number training logs speak in. Each document is scored in
windows of `window` tokens; every token but the document's first is predicted exactly once, from the
tokens before it in its window (the context restarts at each window, which costs a little perplexity on
documents longer than a window and keeps memory flat).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eval.placement import input_device
from pipeline.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Perplexity:
    """Totals over all documents, so documents weigh by their length (as one long text would)."""

    bits_per_byte: float
    token_perplexity: float
    nll_nats: float
    predicted_tokens: int
    predicted_bytes: int
    documents: int
    # Per scored document, in the held-out file's order: so two models scored on the same documents can be compared
    # document by document (frankenllama compare's paired error bar on a bits-per-byte difference).
    document_nll_nats: list[float] = field(default_factory=list)
    document_bytes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def read_heldout_texts(path: Path, max_texts: int | None = None) -> list[str]:
    """The `text` of each line of a jsonl file (the train stage's held-out slice)."""
    texts = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{number} is not a JSON object with a 'text' field; rerun the train "
                                "stage or fix the file") from None
            if max_texts is not None and len(texts) >= max_texts:
                break
    return texts


@torch.no_grad()
def document_nll(model, ids: list[int], window: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ids[1:] and how many tokens that covers."""
    device = input_device(model)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]], device=device)
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
        total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return total, count


def heldout_perplexity(model, tokenizer, texts: list[str], window: int) -> Perplexity:
    """Score every text; bytes count only the text the predicted tokens cover.

    When the tokenizer adds no BOS, a document's first token is never predicted, so its bytes are left out
    of the denominator too.
    """
    special = set(tokenizer.all_special_ids)
    nll, tokens, n_bytes, documents = 0.0, 0, 0, 0
    document_nlls, document_bytes = [], []
    for text in tqdm(texts, desc="perplexity", unit="doc", leave=False):
        ids = tokenizer(text).input_ids
        if len(ids) < 2:
            continue
        doc_nll, doc_tokens = document_nll(model, ids, window)
        unpredicted = 0 if ids[0] in special else len(tokenizer.decode(ids[:1]).encode("utf-8"))
        doc_bytes = len(text.encode("utf-8")) - unpredicted
        nll += doc_nll
        tokens += doc_tokens
        n_bytes += doc_bytes
        documents += 1
        document_nlls.append(doc_nll)
        document_bytes.append(doc_bytes)
    if tokens == 0 or n_bytes <= 0:
        raise UserError("the held-out texts are all shorter than two tokens; nothing to score")
    return Perplexity(
        bits_per_byte=nll / math.log(2) / n_bytes,
        token_perplexity=math.exp(nll / tokens),
        nll_nats=nll,
        predicted_tokens=tokens,
        predicted_bytes=n_bytes,
        documents=documents,
        document_nll_nats=document_nlls,
        document_bytes=document_bytes,
    )
