"""A Llama checkpoint as fp32 pieces built one at a time from its safetensors files.

What lets `verify` prove a 44 GB model exact in the memory of one decoder layer: transformers' own
`LlamaDecoderLayer` and `LlamaRMSNorm` (so the arithmetic is the model's, not a re-implementation), each built on
the meta device and given its weights straight from `CheckpointReader`, never the whole model at once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from pipeline.checkpoint import CheckpointReader
from pipeline.errors import UserError, error_reason
from surgery.plan import EMBED, FINAL_NORM, LM_HEAD


class StreamedLlama:
    """One checkpoint's embeddings, decoder layers, final norm and lm_head, each loaded in fp32 on demand.

    `round_through`: a half dtype every weight is rounded through first, so a base compared with a bf16 output
    carries the same storage rounding and only the surgery's own error remains.
    """

    def __init__(self, folder: Path, device: torch.device, round_through: torch.dtype | None = None):
        self.folder = Path(folder)
        self.reader = CheckpointReader(self.folder)
        try:
            self.config = AutoConfig.from_pretrained(self.folder)
        except Exception as err:
            raise UserError(f"cannot read {self.folder}/config.json with transformers ({error_reason(err)})") from None
        # sdpa with an explicit causal mask: the same function on CPU and CUDA, whatever the config asked for
        self.config._attn_implementation = "sdpa"
        self.device = device
        self.round_through = round_through

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def tied(self) -> bool:
        """lm_head is embed_tokens (a tied checkpoint may still store a duplicate lm_head; it is not read)."""
        return bool(self.config.tie_word_embeddings)

    def tensor(self, name: str) -> torch.Tensor:
        value = self.reader.get(name).to(self.device)
        if self.round_through is not None:
            value = value.to(self.round_through)
        return value.to(torch.float32)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input hidden states [1, T, hidden]; the table itself is dropped again."""
        return torch.nn.functional.embedding(ids.to(self.device), self.tensor(EMBED))

    def lm_head(self) -> torch.Tensor:
        return self.tensor(EMBED if self.tied else LM_HEAD)

    def final_norm(self) -> LlamaRMSNorm:
        norm = LlamaRMSNorm(self.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(self.tensor(FINAL_NORM), requires_grad=False)
        return norm

    def layer(self, index: int) -> LlamaDecoderLayer:
        """Decoder layer `index` with its fp32 weights and no gradients (`requires_grad_()` the parameters to
        backpropagate into them). Built on the meta device, so no memory is spent on a random init."""
        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, layer_idx=index)
        prefix = f"model.layers.{index}."
        state = {name: self.tensor(prefix + name) for name in layer.state_dict()}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.requires_grad_(False).eval()

    def position_inputs(self, length: int) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """What every decoder layer takes besides the hidden states: rope cos/sin, positions, a causal mask."""
        positions = torch.arange(length, device=self.device)[None]
        rotary = LlamaRotaryEmbedding(self.config).to(self.device)
        probe = torch.empty(1, length, 1, device=self.device, dtype=torch.float32)
        blocked = torch.ones(length, length, dtype=torch.bool, device=self.device).triu(1)
        mask = torch.zeros(length, length, device=self.device).masked_fill(blocked, torch.finfo(torch.float32).min)
        return {"position_embeddings": rotary(probe, positions), "position_ids": positions,
                "attention_mask": mask[None, None]}
