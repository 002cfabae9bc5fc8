"""A worker for tests/test_train_fsdp_adapter.py, started by torch.distributed.run (gloo, CPU).

It wraps a tiny peft Llama in FSDP1 the way the HF Trainer does under `train.distributed: fsdp` (peft's auto-wrap
policy: every decoder layer and every LoRA matrix its own unit, full sharding, flat parameters) and runs
train/fsdp_adapter.py on it. Results go to FOLDER as torch files for the test to compare:

- `save FOLDER`: LoRA weights from seed 1, saved sharded; the expected tensors; the export entries picked from
  the gathered full state dict; and peft's own adapter state dict of the same weights without FSDP;
- `load FOLDER [TARGETS]`: LoRA weights from seed 2 (on TARGETS, default q_proj,v_proj), then the sharded load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from peft import get_peft_model_state_dict
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import LlamaConfig, LlamaForCausalLM

from train.fsdp_adapter import adapter_file_entries, load_sharded_adapter, save_sharded_adapter
from train.model import prepare_for_training

WRAPPER = "_fsdp_wrapped_module."


def peft_model(lora_seed: int, targets: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)  # the same base weights in every process and run
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=8, vocab_size=101)
    lora = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=targets)
    model = prepare_for_training(LlamaForCausalLM(config), lora, gradient_checkpointing=False, sharded=True)
    generator = torch.Generator().manual_seed(lora_seed)
    for name, param in model.named_parameters():
        if "lora_" in name:  # both matrices random (peft starts B at zero), so a lost tensor cannot look restored
            param.data.copy_(torch.randn(param.shape, generator=generator))
    return model


def wrap(model: torch.nn.Module) -> FSDP:
    return FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                device_id=torch.device("cpu"), use_orig_params=False)


def lora_values(model: FSDP) -> dict[str, torch.Tensor]:
    with FSDP.summon_full_params(model):
        return {name.replace(WRAPPER, ""): param.detach().clone() for name, param in model.named_parameters()
                if "lora_" in name}


def main() -> None:
    mode, folder = sys.argv[1], Path(sys.argv[2])
    targets = sys.argv[3].split(",") if len(sys.argv) > 3 else ["q_proj", "v_proj"]
    dist.init_process_group("gloo")
    main_process = dist.get_rank() == 0
    if mode == "save":
        model = wrap(peft_model(1, targets))
        save_sharded_adapter(model, folder / "adapter")
        expected = lora_values(model)
        gathered = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, gathered):
            exported = adapter_file_entries(model.state_dict(), "default")
        if main_process:
            torch.save(expected, folder / "expected.pt")
            torch.save(exported, folder / "exported.pt")
            torch.save(get_peft_model_state_dict(peft_model(1, targets)), folder / "peft_reference.pt")
    else:
        model = wrap(peft_model(2, targets))
        before = lora_values(model)
        count = load_sharded_adapter(model, folder / "adapter")
        after = lora_values(model)
        if main_process:
            result = {"count": count, "before": before, "after": after}
            torch.save(result, folder / f"loaded-{dist.get_world_size()}.pt")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo's destructor can hang on exit (train/world.py)


if __name__ == "__main__":
    main()
