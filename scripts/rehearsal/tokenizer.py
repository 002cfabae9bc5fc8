"""A tokenizer with Llama's vocabulary size (32000) and special tokens, built offline from the bundled corpus.

The GPU box has no internet and Llama's own tokenizer may not be redistributed, yet the rehearsal needs one
whose ids fill a 32000-row embedding and whose texts come out at realistic token counts. A byte-level BPE
trained on the bundled Python-docs corpus gives both: `<unk>`, `<s>`, `</s>` at ids 0, 1, 2 (Llama's), a BOS
before every text, and English prose at a Llama-like ~1.3 tokens per word. Which vocabulary it is does not
matter for memory and plumbing; the sizes do.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "train" / "samples" / "python_stdlib_docs.jsonl.gz"
SPECIAL = ["<unk>", "<s>", "</s>"]


def corpus_texts() -> list[str]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def build_tokenizer(folder: Path, vocab_size: int = 32000):
    """Train the BPE and save it as a HF fast tokenizer in `folder`; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_texts(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=10**30)  # as Llama-2's own
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast
