"""The merged export: every adapted tensor equals base + scale * B @ A in the base's dtype, every other tensor is
the base's bit for bit, and the merged folder computes what peft's base-plus-adapter computes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.checkpoint import CheckpointReader
from pipeline.errors import UserError
from train.export import merge_adapter, save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(base_dir, r: int, alpha: float, seed: int = 0, task_type: str | None = None):
    """A peft model on the base with random (nonzero) A and B, as after some training."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, task_type=task_type)
    return get_peft_model(model, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_export_equals_base_plus_scaled_lora_product(tiny_llama, tmp_path, dtype):
    base_dir = tiny_llama("base", dtype=dtype, num_hidden_layers=2, max_shard_size="40KB")
    peft_model = random_adapter(base_dir, r=4, alpha=8)
    adapter_dir = save_adapter(peft_model, tmp_path / "adapter")
    merged_dir = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", max_shard_size="40KB")

    base, merged = CheckpointReader(base_dir), CheckpointReader(merged_dir)
    assert merged.names == base.names and len(list(merged_dir.glob("*.safetensors"))) > 1
    modules = dict(peft_model.base_model.model.named_modules())
    adapted = 0
    for name in base.names:
        module = modules.get(name.removesuffix(".weight"))
        if module is not None and hasattr(module, "lora_A"):
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            expected = (base.get(name).float() + (8 / 4) * (lora_b.float() @ lora_a.float())).to(dtype)
            assert merged.dtype(name) == dtype
            assert torch.equal(merged.get(name), expected), name
            adapted += 1
        else:
            assert torch.equal(merged.get(name), base.get(name)), name
    assert adapted == 2 * len(TARGETS)
    assert json.loads((merged_dir / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())

    if dtype == torch.float32:  # peft's own forward is the independent reference
        ids = torch.tensor([[1, 5, 17, 42, 99, 3]])
        reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_refuses_an_adapter_for_another_model(tiny_llama, tmp_path):
    adapter_dir = save_adapter(random_adapter(tiny_llama("small"), r=2, alpha=2), tmp_path / "adapter")
    other = tiny_llama("wider", hidden_size=48, num_attention_heads=6, num_key_value_heads=6)
    with pytest.raises(UserError, match=r"adapter for model\.layers\.0\..* is .* the base is"):
        merge_adapter(other, adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_picked_from_a_gathered_state_dict_is_the_one_peft_saves(tiny_llama, tmp_path):
    """FSDP's export path (the full state dict gathered from the shards) writes what peft's own save writes."""
    from safetensors.torch import load_file

    peft_model = random_adapter(tiny_llama("base"), r=2, alpha=4, task_type="CAUSAL_LM")  # as the stage trains
    by_peft = save_adapter(peft_model, tmp_path / "by_peft")
    by_name = save_adapter(peft_model, tmp_path / "by_name", state_dict=peft_model.state_dict())
    want, got = load_file(by_peft / "adapter_model.safetensors"), load_file(by_name / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and len(want) == 2 * 2 * len(TARGETS)
    assert all(torch.equal(got[key], want[key]) for key in want)
    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in (by_name, by_peft)]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])  # a set in peft: its order varies
    assert configs[0] == configs[1]


def test_an_adapter_without_lora_tensors_is_never_exported(tiny_llama, tmp_path):
    peft_model = random_adapter(tiny_llama("base"), r=2, alpha=4)
    with pytest.raises(RuntimeError, match="holds no LoRA tensors"):
        save_adapter(peft_model, tmp_path / "adapter", state_dict={"base_model.model.lm_head.weight": torch.ones(2)})
    assert not (tmp_path / "adapter").exists()
