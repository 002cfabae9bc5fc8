"""One precision for every model of a run, so that differences between models are the models' own.

Measured on SmolLM2-135M (its weights stored in fp16 as the base, an exact `readers` widening of it to 360M
widths stored in bf16, 246 held-out tokens, CPU): both computed in fp32 agree to KL 1.3e-4 and 99.2% top-1; the
old per-model rule on a GPU too small for fp32 (the base in its stored fp16, the widening in its bf16) gave KL
1.7e-3 and 98.0%, and both in bf16 2.0e-3 and 97.6%. Half-precision arithmetic alone thus fails the README's
bar for an exact surgery (KL <= 1e-3, top-1 >= 98%), whatever the models. So:

- scoring (probe, perplexity, benchmarks) runs every model in one dtype: float32 when the largest model's float32
  weights fit the device's weight budget (its free memory less the largest forward's float32 activations and the
  allocator's slack: pipeline/sizing.py's eval_memory, which the doctor applies too), else one half-precision
  dtype for all, the largest model's stored one (the widened model's: bfloat16 from surgery's default), bfloat16
  when that is float32;
- preservation logits are always float32: from the same load when scoring is float32, else from a second load in
  float32 that accelerate spreads over the GPU, CPU RAM and the checkpoint files, read once by one batched
  forward.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eval.placement import available_memory, human_bytes
from pipeline.checkpoint import CheckpointReader
from pipeline.config import EvalConfig
from pipeline.errors import UserError
from pipeline.sizing import EVAL_ALLOCATOR_SLACK, LlamaShape, eval_memory


@dataclass(frozen=True)
class Precision:
    """The run's dtypes and why: what models are scored in, what preservation's logits are computed in, and the
    bytes of activations of the largest forward in those dtypes, which every load keeps free on the GPU."""

    compute: str
    preservation: str
    reason: str
    activations: int

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute)

    @property
    def preservation_reloads(self) -> bool:
        """Whether preservation needs its own float32 load (scoring ran in half precision)."""
        return self.compute != self.preservation

    def to_dict(self) -> dict:
        return asdict(self)


def model_shape(folder: Path) -> LlamaShape:
    """The widths in a model's config.json, which size its weights and its forwards."""
    config = json.loads((folder / "config.json").read_text())
    try:
        return LlamaShape.from_config(config)
    except KeyError as err:
        raise UserError(f"{folder / 'config.json'} has no {err.args[0]}: eval sizes its memory from a Llama's widths; "
                        "evaluate Llama-architecture models only") from None


def stored_dtype(folder: Path) -> str:
    """The dtype that holds most of a checkpoint's parameters, from the safetensors headers (no data read)."""
    reader = CheckpointReader(folder)
    counts: Counter[str] = Counter()
    for name in reader.names:
        counts[str(reader.dtype(name)).removeprefix("torch.")] += math.prod(reader.shape(name))
    return counts.most_common(1)[0][0]


def choose_precision(settings: EvalConfig, models: dict[str, Path], device: torch.device) -> Precision:
    """The precision for `models` (label -> folder) on `device` under eval settings `settings` (eval.dtype "auto"
    or a dtype; the phases and batch sizes that size the activations)."""
    shapes = {label: model_shape(folder) for label, folder in models.items()}
    largest = max(shapes, key=lambda label: shapes[label].params)
    free = available_memory(device)
    memory = eval_memory(settings, [(shapes[label], stored_dtype(models[label])) for label in models], free)
    compute, activations = memory.dtype, memory.activations
    if settings.dtype != "auto":
        return Precision(compute, "float32", f"eval.dtype is {compute}", activations)
    count = shapes[largest].params
    size = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"
    fp32 = human_bytes(count * 4)
    budget = (f"the {human_bytes(memory.float32_budget)} that {human_bytes(free)} free on {device} leave beside "
              f"{human_bytes(memory.float32_activations)} of float32 activations (the largest forward) and "
              f"{human_bytes(EVAL_ALLOCATOR_SLACK)} of allocator slack")
    if compute == "float32":
        return Precision("float32", "float32", f"float32 for every model, preservation included: the largest "
                         f"({largest}, {size} parameters, {fp32} in float32) fits {budget}", activations)
    stored = stored_dtype(models[largest])
    why_half = "its stored dtype" if stored == compute else "the half precision with float32's range"
    return Precision(compute, "float32", f"{compute} for every model: the largest ({largest}, {size} parameters) "
                     f"needs {fp32} in float32, more than {budget}; {compute} is {why_half}. Preservation's logits "
                     "are float32, from a second load of each model spread over the GPU, CPU RAM and disk",
                     activations)
