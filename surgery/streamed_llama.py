"""A Llama run one piece at a time straight from its tensors: what surgery's checks run models that do not fit with.

`verify` proves a 44 GB output exact, and alignment reads the hidden states and unit outputs of llama-30b (65 GB in
bf16, on a 32-64 GB box), in the memory of about one decoder layer: each piece is transformers' own
`LlamaDecoderLayer` or `LlamaRMSNorm` (so the arithmetic is the model's, not a re-implementation), built on the
meta device and given its weights from a reader (a CheckpointReader, or the aligned view of a donor), then dropped.
Weights and activations are fp32 on the device, CUDA when there is one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from surgery.plan import EMBED, FINAL_NORM, LM_HEAD, layer_prefix

if TYPE_CHECKING:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

log = logging.getLogger(__name__)


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def text_token_ids(tokenizer_folder: Path, texts: Sequence[str], vocab_size: int, fallback_tokens: int,
                   max_tokens: int | None = None) -> list[torch.Tensor]:
    """Each text as (1, T) token ids through the folder's tokenizer (the first `max_tokens`); seeded random ids,
    `fallback_tokens` per text, when the folder has no tokenizer (tiny test models, random-weight rehearsals)."""
    if any((tokenizer_folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        return [tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens] for text in texts]
    log.info("%s has no tokenizer; using seeded random token ids instead of text", tokenizer_folder)
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(vocab_size, (1, fallback_tokens), generator=generator) for _ in texts]


class StreamedLlama:
    """One checkpoint's embeddings, decoder layers, final norm and lm_head, each loaded in fp32 on demand.

    `round_through`: a half dtype every weight is rounded through first, so a base compared with a bf16 output
    carries the same storage rounding and only the surgery's own error remains.
    """

    def __init__(self, reader, config: dict, device: torch.device, round_through: torch.dtype | None = None):
        # transformers on first use, not with the module: every `python -m surgery` imports this one (through the
        # alignment code) and would pay the 1.5-3 s of importing it
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.reader, self.device, self.round_through = reader, device, round_through
        self.config = LlamaConfig.from_dict(config)
        # sdpa with an explicit causal mask: the same function on CPU and CUDA, whatever the config asked for
        self.config._attn_implementation = "sdpa"
        self._rotary = LlamaRotaryEmbedding(self.config).to(device)
        self._position_inputs: dict[int, dict] = {}

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def tied(self) -> bool:
        """lm_head is embed_tokens (a tied checkpoint may still store a duplicate lm_head; it is not read, as
        transformers does not read it). A reader that unties (a rotated donor's view) comes with an untied config."""
        return bool(self.config.tie_word_embeddings)

    def tensor(self, name: str) -> torch.Tensor:
        value = self.reader.get(name).to(self.device)
        if self.round_through is not None:
            value = value.to(self.round_through)
        return value.to(torch.float32)

    def embed(self, ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each text's (1, T) ids as input hidden states (1, T, hidden); the table is read once and dropped."""
        table = self.tensor(EMBED)
        return [torch.nn.functional.embedding(text.to(self.device), table) for text in ids]

    def lm_head(self) -> torch.Tensor:
        return self.tensor(EMBED if self.tied else LM_HEAD)

    def final_norm(self) -> LlamaRMSNorm:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = LlamaRMSNorm(self.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(self.tensor(FINAL_NORM), requires_grad=False)
        return norm

    def logits(self, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Final norm and lm_head on each text's last hidden states: (T, vocab) per text, on the CPU."""
        norm, head = self.final_norm(), self.lm_head()
        with torch.no_grad():
            return [(norm(text)[0] @ head.T).cpu() for text in hidden]

    def layer(self, index: int) -> LlamaDecoderLayer:
        """Decoder layer `index` with its fp32 weights and no gradients (`requires_grad_()` the parameters to
        backpropagate into them). Built on the meta device, so no memory is spent on a random init."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, layer_idx=index)
        prefix = layer_prefix(index)
        state = {name: self.tensor(prefix + name) for name in layer.state_dict()}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.requires_grad_(False).eval()

    def run(self, layer: LlamaDecoderLayer, hidden: torch.Tensor) -> torch.Tensor:
        """One decoder layer on one text's hidden states (1, T, hidden), at positions 0..T-1 under a causal mask."""
        return layer(hidden, **self._inputs(hidden.shape[1]))

    def _inputs(self, length: int) -> dict:
        """What a decoder layer takes besides the hidden states: rope cos/sin, positions, a causal mask."""
        if length not in self._position_inputs:
            positions = torch.arange(length, device=self.device)[None]
            probe = torch.empty(1, length, 1, device=self.device, dtype=torch.float32)
            blocked = torch.ones(length, length, dtype=torch.bool, device=self.device).triu(1)
            mask = torch.zeros(length, length, device=self.device).masked_fill(blocked, torch.finfo(torch.float32).min)
            self._position_inputs[length] = {"position_embeddings": self._rotary(probe, positions),
                                             "position_ids": positions, "attention_mask": mask[None, None]}
        return self._position_inputs[length]
