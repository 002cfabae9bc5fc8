"""One precision for every model of a run, so that differences between models are the models' own.

Measured on SmolLM2-135M (its weights stored in fp16 as the base, an exact `readers` widening of it to 360M
widths stored in bf16, 246 held-out tokens, CPU): both computed in fp32 agree to KL 1.3e-4 and 99.2% top-1; the
old per-model rule on a GPU too small for fp32 (the base in its stored fp16, the widening in its bf16) gave KL
1.7e-3 and 98.0%, and both in bf16 2.0e-3 and 97.6%. Half-precision arithmetic alone thus fails the README's
bar for an exact surgery (KL <= 1e-3, top-1 >= 98%), whatever the models. So:

- scoring (probe, perplexity, benchmarks) runs every model in one dtype: float32 when the largest model fits the
  device in float32 with room for activations, else one half-precision dtype for all, the largest model's
  stored one (the widened model's: bfloat16 from surgery's default), bfloat16 when that is float32;
- preservation logits are always float32: from the same load when scoring is float32, else from a second load in
  float32 that accelerate spreads over the GPU, CPU RAM and the checkpoint files, read once by one batched
  forward.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eval.placement import MEMORY_MARGIN, available_memory, human_bytes
from pipeline.checkpoint import CheckpointReader

HALF_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class Precision:
    """The run's dtypes and why: what models are scored in, and what preservation's logits are computed in."""

    compute: str
    preservation: str
    reason: str

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute)

    @property
    def preservation_reloads(self) -> bool:
        """Whether preservation needs its own float32 load (scoring ran in half precision)."""
        return self.compute != self.preservation

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_count(folder: Path) -> int:
    reader = CheckpointReader(folder)
    return sum(math.prod(reader.shape(name)) for name in reader.names)


def stored_dtype(folder: Path) -> str:
    """The dtype that holds most of a checkpoint's parameters, from the safetensors headers (no data read)."""
    reader = CheckpointReader(folder)
    counts: Counter[str] = Counter()
    for name in reader.names:
        counts[str(reader.dtype(name)).removeprefix("torch.")] += math.prod(reader.shape(name))
    return counts.most_common(1)[0][0]


def choose_precision(setting: str, models: dict[str, Path], device: torch.device) -> Precision:
    """The precision for `models` (label -> folder) on `device`; `setting` is eval.dtype ("auto" or a dtype)."""
    if setting != "auto":
        return Precision(setting, "float32", f"eval.dtype is {setting}")
    sizes = {label: parameter_count(folder) for label, folder in models.items()}
    largest = max(sizes, key=sizes.get)
    count = sizes[largest]
    size = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"
    needed = count * 4 * MEMORY_MARGIN
    free = available_memory(device)
    where = f"the {human_bytes(free)} free on {device}"
    if needed <= free:
        return Precision("float32", "float32", f"float32 for every model, preservation included: the largest "
                         f"({largest}, {size} parameters) fits {where} with room for activations")
    stored = stored_dtype(models[largest])
    half = stored if stored in HALF_DTYPES else "bfloat16"
    why_half = "its stored dtype" if stored == half else "the half precision with float32's range"
    return Precision(half, "float32", f"{half} for every model: the largest ({largest}, {size} parameters) needs "
                     f"{human_bytes(needed)} in float32 with room for activations, more than {where}; {half} is "
                     f"{why_half}. Preservation's logits are float32, from a second load of each model spread over "
                     "the GPU, CPU RAM and disk")
