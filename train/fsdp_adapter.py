"""The LoRA adapter of an FSDP-wrapped model: kept in each checkpoint, restored on resume, exported, by name.

Why this exists: under FSDP the HF Trainer checkpoints a peft model through accelerate's adapter-only path, which
asks peft which entries of the sharded state dict are the adapter's. With the decoder layers and LoRA matrices
wrapped one by one (peft's own FSDP policy, which the Trainer applies), peft 0.21 finds none (its structural key
prefixes keep the inner `_fsdp_wrapped_module.` segments) and peft 0.20's restore matches no parameter. An FSDP
run then resumed with freshly initialized LoRA weights (seen on 2 H200s) and exported an adapter without tensors
(reproduced on CPU with FSDP1 over gloo), silently. torch's own sharded state dict names the LoRA tensors plainly,
so they are selected by name here, which works with either peft.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)

CHECKPOINT_ADAPTER = "fsdp_adapter"  # inside checkpoint-N/: the LoRA tensors, sharded (torch.distributed.checkpoint)
LORA_MATRICES = (".lora_A.", ".lora_B.")


def is_lora_key(key: str) -> bool:
    """A LoRA matrix of a peft model (bias "none", no DoRA: what the train stage trains), in any key layout."""
    return any(part in key for part in LORA_MATRICES)


def lora_entries(state_dict: dict) -> dict:
    """The LoRA matrices of a peft model's state dict."""
    return {key: value for key, value in state_dict.items() if is_lora_key(key)}


def save_sharded_adapter(model: torch.nn.Module, folder: Path) -> None:
    """Write this process's shard of every LoRA matrix into `folder`; every process must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    with FullyShardedDataParallel.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        dcp.save(lora_entries(model.state_dict()), checkpoint_id=str(folder))


def load_sharded_adapter(model: torch.nn.Module, folder: Path) -> int:
    """Load the LoRA matrices saved by save_sharded_adapter (at any process count) into `model`; returns how many.

    Every process must call it. A LoRA matrix missing from the folder is an error, never a silent fresh start.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    with FullyShardedDataParallel.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        entries = lora_entries(model.state_dict())
        dcp.load(entries, checkpoint_id=str(folder))
        model.load_state_dict(entries, strict=False)
    return len(entries)


def adapter_file_entries(full_state_dict: dict, adapter_name: str) -> dict:
    """The adapter in peft's file layout (`...q_proj.lora_A.weight`: the adapter's name taken out of each key),
    from the model's full (gathered) state dict."""
    infix = f".{adapter_name}."
    return {key.replace(infix, ".", 1): value for key, value in lora_entries(full_state_dict).items()}


class FsdpAdapterCheckpoints(TrainerCallback):
    """Keeps the LoRA matrices in every checkpoint (before CheckpointProcesses marks it complete, so add this one
    first) and loads them back before the first step of a resumed run."""

    def __init__(self, resume_from: Path | None):
        self.resume_from = resume_from

    def on_save(self, args, state, control, model=None, **kwargs):
        save_sharded_adapter(model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_ADAPTER)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.resume_from is None:
            return
        count = load_sharded_adapter(model, self.resume_from / CHECKPOINT_ADAPTER)
        if args.should_save:
            log.info("restored %d LoRA matrices (sharded) from %s", count, self.resume_from)
        self.resume_from = None
