"""Calibration text, and a Llama run one decoder layer at a time straight from its checkpoint.

Alignment looks at hidden states and unit outputs of models that do not fit in memory (llama-30b is 65 GB in
bf16, the box has 32-64 GB): each decoder layer is built on the meta device, given its weights from the reader
(a CheckpointReader, or the aligned view of one), run on every text, and dropped before the next. Weights and
activations are fp32 on the device, CUDA when there is one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from surgery.plan import EMBED, FINAL_NORM, LM_HEAD, layer_prefix

log = logging.getLogger(__name__)

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
    if any((tokenizer_folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        return [tokenizer(text, return_tensors="pt").input_ids[:, :MAX_TOKENS] for text in CALIBRATION_TEXTS]
    log.info("%s has no tokenizer; calibrating on seeded random token ids instead of text", tokenizer_folder)
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(vocab_size, (1, FALLBACK_TOKENS), generator=generator) for _ in CALIBRATION_TEXTS]


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LayerPass:
    """One decoder layer run over every text: the hidden states after it, the layer itself (weights on the
    device), and for captured layers what its heads and neurons produced (o_proj's and down_proj's inputs)."""

    index: int
    hidden: list[torch.Tensor]
    layer: torch.nn.Module
    heads: list[torch.Tensor] = field(default_factory=list)  # per text, (T, heads * head_dim)
    neurons: list[torch.Tensor] = field(default_factory=list)  # per text, (T, intermediate)


class StreamedLlama:
    """A LlamaForCausalLM evaluated layer by layer from a reader, holding one layer's weights at a time."""

    def __init__(self, reader, config: dict, device: torch.device | None = None):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.reader, self.device = reader, device or compute_device()
        self.config = LlamaConfig.from_dict(config)
        # sdpa with no mask is causal; the default (eager) would attend to every position when given no mask
        self.config._attn_implementation = "sdpa"
        self.rotary = LlamaRotaryEmbedding(self.config).to(self.device)

    def _weight(self, name: str) -> torch.Tensor:
        return self.reader.get(name).to(self.device, torch.float32)

    def embed(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        table = self._weight(EMBED)
        return [table[text.to(self.device)] for text in ids]

    def layer(self, index: int):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, index)
        prefix = layer_prefix(index)
        layer.load_state_dict({name: self._weight(prefix + name) for name in layer.state_dict()}, assign=True)
        return layer.eval()

    def _run(self, layer, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=self.device)[None]
        return layer(hidden, attention_mask=None, position_embeddings=self.rotary(hidden, positions))

    def layers(
        self, hidden: list[torch.Tensor], count: int, capture: frozenset[int] = frozenset(), desc: str = "layers"
    ) -> Iterator[LayerPass]:
        """Run layers 0..count-1 over every text, each on the previous one's output; unit outputs are recorded
        for the layers in `capture` only."""
        for index in tqdm(range(count), desc=desc, unit="layer"):
            done = LayerPass(index, [], self.layer(index))
            hooks = []
            if index in capture:
                hooks = [
                    done.layer.self_attn.o_proj.register_forward_pre_hook(
                        lambda _, args, record=done.heads: record.append(args[0][0])),
                    done.layer.mlp.down_proj.register_forward_pre_hook(
                        lambda _, args, record=done.neurons: record.append(args[0][0])),
                ]
            with torch.no_grad():
                done.hidden = [self._run(done.layer, text) for text in hidden]
            for hook in hooks:
                hook.remove()
            hidden = done.hidden
            yield done

    def logits(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final norm and lm_head on each text's last hidden states: (T, vocab) per text."""
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(self._weight(FINAL_NORM), requires_grad=False)
        head = self._weight(LM_HEAD if LM_HEAD in self.reader else EMBED)
        with torch.no_grad():
            return [(norm(text[0]) @ head.T).cpu() for text in hidden]
