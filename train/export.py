"""Export: the LoRA adapter on its own, and merged into the base weights as a plain HF folder.

The merge never loads a model: it streams the base checkpoint tensor by tensor (pipeline.checkpoint), adds
scale * B @ A to each adapted weight in fp32, stores it back in the base's dtype, and writes shards as it goes, so
a 22b merge needs one tensor's worth of memory, not 44 GB.

What the adapter is added to (`into`):
- `dequantized_nf4` (the default for NF4 training): each weight that loading quantizes is first quantized exactly
  as loading does and dequantized, so the export computes what was trained (NF4 base + adapter): the adapter
  learned a correction to the NF4 weights it saw, including their rounding. benchmarks/export_fidelity.py measured
  this merge closer to the trained model than the other one (benchmarks/RESULTS.md).
- `base`: the stored (bf16) weights, QLoRA's usual export, which drops the NF4 rounding the adapter was trained
  with. With `quantization: none` the two are the same thing and the merge is always `base`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.checkpoint import CheckpointReader, ShardedWriter, TensorSpec
from pipeline.config import MergeInto
from pipeline.errors import UserError
from pipeline.models import TOKENIZER_FILES
from pipeline.runs import atomic_output_dir
from train.fsdp_adapter import adapter_file_entries, is_lora_key
from train.model import nf4_round_trip, quantized_on_load

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Everything of a model folder except its weights: the merged folder must load with from_pretrained alone.
MODEL_FOLDER_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
MERGE_TARGETS = {"base": "stored base weights", "dequantized_nf4": "dequantized NF4 weights"}


def save_adapter(peft_model, adapter_dir: Path, state_dict: dict | None = None) -> Path:
    """The trained adapter as peft writes it (adapter_config.json + adapter_model.safetensors), atomically.

    `state_dict`: the model's full state gathered from the processes that hold its shards (FSDP); its LoRA
    tensors are picked by name (train/fsdp_adapter.py says why peft cannot pick them there). None: peft saves
    the weights of `peft_model` itself. An adapter without LoRA tensors is an error, never a silent export.
    """
    with atomic_output_dir(adapter_dir, force=True) as tmp:
        if state_dict is None:
            peft_model.save_pretrained(tmp, safe_serialization=True)
        else:
            name = peft_model.active_adapter
            tensors = {key: value.contiguous() for key, value in adapter_file_entries(state_dict, name).items()}
            save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            config = copy.deepcopy(peft_model.peft_config[name])
            config.inference_mode = True  # as peft's own save_pretrained writes it
            config.save_pretrained(tmp)
        with safe_open(tmp / ADAPTER_WEIGHTS, framework="pt") as saved:
            if not any(is_lora_key(key) for key in saved.keys()):  # noqa: SIM118 (safe_open is not a mapping)
                raise RuntimeError(f"export: the adapter written to {adapter_dir} holds no LoRA tensors")
    log.info("export: adapter saved to %s", adapter_dir)
    return adapter_dir


def lora_scale(adapter_config: dict) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise UserError("the adapter uses per-module rank/alpha patterns, which the streaming merge does not handle")
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{base weight name: (A [r, in], B [out, r])} and the LoRA scale."""
    try:
        adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {adapter_dir / ADAPTER_CONFIG} ({err}); export the adapter again") from None
    if adapter_config.get("fan_in_fan_out"):
        raise UserError("the adapter was trained with fan_in_fan_out (GPT-2 style Conv1D); Llama never needs it")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise UserError(f"{adapter_dir}: unexpected adapter tensor {key}; only LoRA A/B weights are merged")
            factors.setdefault(f"{module}.weight", {})[kind[0]] = handle.get_tensor(key)
    pairs = {}
    for name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{adapter_dir}: {name} has a LoRA {'A' if 'A' in pair else 'B'} factor but not the other")
        pairs[name] = (pair["A"], pair["B"])
    return pairs, lora_scale(adapter_config)


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A in fp32, whatever the dtypes (the caller stores it in the checkpoint's), on W's device."""
    delta = lora_b.to(weight.device, torch.float32) @ lora_a.to(weight.device, torch.float32)
    return weight.to(torch.float32) + scale * delta


def copy_model_folder_files(base_dir: Path, out_dir: Path) -> None:
    for name in MODEL_FOLDER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)


def merge_adapter(base_dir: Path, adapter_dir: Path, merged_dir: Path, max_shard_size: str = "5GB",
                  into: MergeInto = "base", device: torch.device | None = None) -> dict[str, Any]:
    """Write base + adapter as a normal HF model folder at `merged_dir`, streaming one tensor at a time.

    `into` says what the adapter is added to (see the module docstring); `device` is where the arithmetic runs
    (the training device: there NF4 quantization matches loading's bit for bit). Returns what was merged, for the
    manifest.
    """
    device = device or torch.device("cpu")
    reader = CheckpointReader(base_dir)
    pairs, scale = read_adapter(adapter_dir)
    unknown = sorted(set(pairs) - set(reader.names))
    if unknown:
        raise UserError(f"the adapter adapts {unknown[0]}, which {base_dir} does not have; wrong base model?")
    for name, (lora_a, lora_b) in pairs.items():
        rows, cols = reader.shape(name)
        if (lora_b.shape[0], lora_a.shape[1]) != (rows, cols):
            raise UserError(f"adapter for {name} is {lora_b.shape[0]}x{lora_a.shape[1]}, the base is {rows}x{cols}")
    specs = [TensorSpec(name, reader.shape(name), reader.dtype(name)) for name in reader.names]
    dequantized = 0
    with atomic_output_dir(merged_dir, force=True) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_size)
        for spec in tqdm(specs, desc=f"merging LoRA into the {MERGE_TARGETS[into]}", unit="tensor"):
            tensor = reader.get(spec.name)
            if into == "dequantized_nf4" and quantized_on_load(spec.name, spec.shape):
                tensor = nf4_round_trip(tensor, device)
                dequantized += 1
            if spec.name in pairs:
                tensor = merged_weight(tensor.to(device), *pairs[spec.name], scale)
            writer.write(spec.name, tensor.to("cpu", spec.dtype))
        writer.close()
        copy_model_folder_files(base_dir, tmp)
    log.info("export: merged %d adapted tensors (scale %g) into the %s: %s", len(pairs), scale, MERGE_TARGETS[into],
             merged_dir)
    return {"into": into, "scale": scale, "adapted_tensors": len(pairs), "dequantized_tensors": dequantized,
            "device": str(device)}
