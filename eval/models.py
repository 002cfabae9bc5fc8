"""Which models a run evaluates, under which labels, and loading one of them onto a device.

Only one model is in memory at a time: the base's numbers that later models are compared with (probe
signals, preservation logits, benchmark item scores) are kept instead of the base model itself.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointReader
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.models import resolve_model
from pipeline.runs import read_manifest

log = logging.getLogger(__name__)

# Room for activations, the KV cache and the allocator on top of the weights.
MEMORY_MARGIN = 1.3


@dataclass(frozen=True)
class ModelEntry:
    """A model to evaluate: a short label for tables, the reference as configured, and its local folder."""

    label: str
    ref: str
    path: Path


def default_model_refs(config: RunConfig) -> list[str]:
    """surgery.base, the surgery output and the merged trained model, each only if its stage completed."""
    refs = [config.surgery.base] if config.surgery else []
    surgery_dir = config.stage_dir("surgery")
    train_dir = config.stage_dir("train")
    for folder, stage_folder in ((surgery_dir, surgery_dir), (train_dir / "merged", train_dir)):
        if not stage_folder.exists():
            continue
        if read_manifest(stage_folder) is None:
            log.warning("not evaluating %s: its stage has no complete manifest (it did not finish)", folder)
        elif not (folder / "config.json").is_file():
            log.warning("not evaluating %s: the stage finished but wrote no model folder there", folder)
        else:
            refs.append(str(folder))
    return refs


def _label(ref: str, config: RunConfig, base_ref: str) -> str:
    if ref == base_ref:
        return "base"
    path = Path(ref).expanduser().resolve()
    if path == config.stage_dir("surgery").resolve():
        return "surgery"
    if path == (config.stage_dir("train") / "merged").resolve():
        return "trained"
    return Path(ref).name or ref


def models_to_evaluate(config: RunConfig) -> list[ModelEntry]:
    """The base first (every comparison needs its numbers), then the others in configured order."""
    refs = list(config.eval.models) if config.eval.models else default_model_refs(config)
    base_ref = config.eval.base or (config.surgery.base if config.surgery else (refs[0] if refs else None))
    if base_ref is None:
        raise UserError("nothing to evaluate: set eval.models (model folders or hub ids) or a surgery section")
    refs = [base_ref] + [ref for ref in refs if ref != base_ref]
    entries: list[ModelEntry] = []
    for ref in refs:
        label = _label(ref, config, base_ref)
        while label in {e.label for e in entries}:
            label += "'"
        entries.append(ModelEntry(label, ref, resolve_model(ref)))
    return entries


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("eval.device is cuda but no CUDA device is visible; set eval.device=auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def parameter_count(folder: Path) -> int:
    reader = CheckpointReader(folder)
    return sum(math.prod(reader.shape(name)) for name in reader.names)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_dtype(setting: str, folder: Path, device: torch.device) -> torch.dtype | str:
    """float32 where the weights (with margin) fit in free memory, else the checkpoint's dtype ("auto").

    fp32 makes the preservation numbers mean something: bf16 rounding alone moves logits by ~0.1.
    """
    if setting != "auto":
        return getattr(torch, setting)
    needed = parameter_count(folder) * 4 * MEMORY_MARGIN
    return torch.float32 if needed < free_memory_bytes(device) else "auto"


def placement(folder: Path, dtype: torch.dtype | str, device: torch.device) -> tuple[str, dict | None]:
    """(device_map, max_memory) for `from_pretrained`: the whole model on `device` when its weights fit with room
    for activations; on a GPU too small for them (a 22b in bf16 is 44 GB, a 24 GB card holds about 18), accelerate
    keeps the first layers on the GPU and the rest in CPU RAM. Slower, since those weights cross PCIe at every
    forward, but the scores and logits stay those of the unquantized model."""
    if device.type != "cuda":
        return str(device), None
    if dtype == "auto":
        weight_bytes = CheckpointReader(folder).total_bytes()
    else:
        weight_bytes = parameter_count(folder) * torch.empty((), dtype=dtype).element_size()
    free = free_memory_bytes(device)
    if weight_bytes * MEMORY_MARGIN < free:
        return str(device), None
    gpu_budget = int(free / MEMORY_MARGIN)
    log.warning("%s: %.1f GB of weights do not fit in %.1f GB of free GPU memory; keeping %.1f GB on the GPU and "
                "the rest in CPU RAM (slower)", folder, weight_bytes / 1e9, free / 1e9, gpu_budget / 1e9)
    cpu_budget = int(free_memory_bytes(torch.device("cpu")) * 0.9)
    return "auto", {device.index or 0: gpu_budget, "cpu": cpu_budget}


def load_tokenizer(folder: Path, fallback: Path | None = None):
    """The model's own tokenizer; a widened model without tokenizer files shares its base's vocabulary."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        if fallback is None:
            raise UserError(f"{folder} has no tokenizer files; copy the base model's tokenizer into it") from None
        log.warning("%s has no tokenizer files; using the base's tokenizer from %s", folder, fallback)
        return AutoTokenizer.from_pretrained(fallback)


def load_model(entry: ModelEntry, device: torch.device, dtype_setting: str):
    """The causal LM in eval mode on `device`, in the dtype `choose_dtype` picks."""
    from transformers import AutoModelForCausalLM

    dtype = choose_dtype(dtype_setting, entry.path, device)
    device_map, max_memory = placement(entry.path, dtype, device)
    log.info("loading %s (%s) on %s in %s", entry.label, entry.path, device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=dtype, device_map=device_map,
                                                     max_memory=max_memory)
    except OSError as err:
        raise UserError(f"cannot load {entry.path} as a causal LM ({str(err).splitlines()[0]})") from None
    return model.eval()


def free_memory() -> None:
    """Return a dropped model's memory before the next one loads (the caller drops its reference first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
