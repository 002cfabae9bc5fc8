"""Calibration text, and what alignment records of a layer-by-layer pass over it.

Alignment looks at hidden states and unit outputs of models that do not fit in memory (llama-30b is 65 GB in
bf16, the box has 32-64 GB), so it runs them as a StreamedLlama: one decoder layer at a time, over every text,
dropped before the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from surgery.streamed_llama import StreamedLlama, text_token_ids

# Four registers (encyclopaedic prose, code, a recipe, dialogue), so a fit is not judged on one kind of text.
CALIBRATION_TEXTS = (
    "The Eiffel Tower was completed in 1889 as the entrance arch to the World's Fair in Paris. At first many "
    "artists called it an eyesore, but within a few decades it had become the symbol of the city. It is "
    "repainted every seven years, which takes about sixty tonnes of paint, and it grows by up to fifteen "
    "centimetres on hot summer days as the iron expands.",
    "def merge_sorted(left, right):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    result = []\n"
    "    i = j = 0\n    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n"
    "            result.append(left[i])\n            i += 1\n        else:\n            result.append(right[j])\n"
    "            j += 1\n    return result + left[i:] + right[j:]\n",
    "To make the bread, mix five hundred grams of flour with ten grams of salt and seven grams of dried yeast. "
    "Add three hundred and fifty millilitres of warm water and knead for ten minutes until the dough is smooth. "
    "Leave it to rise for an hour, shape it into a loaf, and bake at two hundred and twenty degrees for thirty "
    "minutes.",
    "Question: Why do leaves change colour in autumn?\nAnswer: As the days get shorter, trees stop making "
    "chlorophyll, the green pigment that captures sunlight. Without it, the yellow and orange pigments that were "
    "there all along become visible, and some trees also make red pigments from the sugars left in their leaves.",
)
MAX_TOKENS = 96  # per text: enough tokens for stable statistics, few enough for a quick pass over a 30b model
FALLBACK_TOKENS = 64


def calibration_ids(tokenizer_folder: Path, vocab_size: int) -> list[torch.Tensor]:
    """The calibration texts as (1, T) token ids; seeded random ids when the folder has no tokenizer."""
    return text_token_ids(tokenizer_folder, CALIBRATION_TEXTS, vocab_size, FALLBACK_TOKENS, MAX_TOKENS)


@dataclass
class LayerPass:
    """One decoder layer run over every text: the hidden states after it, the layer itself (weights on the
    device), and for captured layers what its heads and neurons produced (o_proj's and down_proj's inputs)."""

    index: int
    hidden: list[torch.Tensor]
    layer: torch.nn.Module
    heads: list[torch.Tensor] = field(default_factory=list)  # per text, (T, heads * head_dim)
    neurons: list[torch.Tensor] = field(default_factory=list)  # per text, (T, intermediate)


def layer_passes(stream: StreamedLlama, hidden: list[torch.Tensor], count: int,
                 capture: frozenset[int] = frozenset(), desc: str = "layers") -> Iterator[LayerPass]:
    """Run layers 0..count-1 over every text, each on the previous one's output; unit outputs are recorded for the
    layers in `capture` only."""
    for index in tqdm(range(count), desc=desc, unit="layer"):
        done = LayerPass(index, [], stream.layer(index))
        hooks = []
        if index in capture:
            hooks = [
                done.layer.self_attn.o_proj.register_forward_pre_hook(
                    lambda _, args, record=done.heads: record.append(args[0][0])),
                done.layer.mlp.down_proj.register_forward_pre_hook(
                    lambda _, args, record=done.neurons: record.append(args[0][0])),
            ]
        with torch.no_grad():
            done.hidden = [stream.run(done.layer, text) for text in hidden]
        for hook in hooks:
            hook.remove()
        hidden = done.hidden
        yield done
