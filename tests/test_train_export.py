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
    merged_dir = tmp_path / "merged"
    assert merge_adapter(base_dir, adapter_dir, merged_dir, max_shard_size="40KB")["into"] == "base"

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


def nf4_linears(model) -> dict[str, torch.nn.Module]:
    """The 4-bit linears of an NF4-loaded model by checkpoint weight name (peft wrappers removed from the name)."""
    import bitsandbytes as bnb

    return {name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight": module
            for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # on a GPU box: CUDA's kernels, the real run's


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_the_dequantized_nf4_merge_starts_from_exactly_the_weights_nf4_loading_makes(tiny_llama, tmp_path, stored,
                                                                                      device):
    """With an untrained adapter (B = 0) the merge is the NF4 model's own dequantized weights, bit for bit, for exactly
    the tensors loading quantizes; every other tensor is the stored one."""
    import bitsandbytes.functional as bnbf

    from train.model import load_base_model

    base_dir = tiny_llama("base", dtype=stored)
    adapter_dir = save_adapter(get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(
        r=2, lora_alpha=4, target_modules=TARGETS)), tmp_path / "adapter")
    summary = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", into="dequantized_nf4",
                            device=torch.device(device))
    linears = nf4_linears(load_base_model(base_dir, "nf4", torch.device(device)))
    assert summary["into"] == "dequantized_nf4" and summary["dequantized_tensors"] == len(linears) == 2 * 7

    base, merged = CheckpointReader(base_dir), CheckpointReader(tmp_path / "merged")
    for name in base.names:
        if name in linears:
            weight = linears[name].weight
            nf4 = bnbf.dequantize_4bit(weight.data, weight.quant_state).to("cpu", stored)
            assert torch.equal(merged.get(name), nf4), name
            assert not torch.equal(merged.get(name), base.get(name)), name
        else:
            assert torch.equal(merged.get(name), base.get(name)), name


def test_the_dequantized_nf4_merge_computes_what_was_trained_and_the_base_merge_does_not(tiny_llama, tmp_path):
    """The NF4 base + adapter, as training computes it, against the two exports of the same adapter."""
    from train.model import load_base_model

    base_dir = tiny_llama("base")
    torch.manual_seed(0)
    trained = get_peft_model(load_base_model(base_dir, "nf4", torch.device("cpu")), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    adapter_dir = save_adapter(trained, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 64, 8]])
    logits = {}
    with torch.no_grad():
        logits["trained"] = trained.eval()(ids).logits
        for into in ("dequantized_nf4", "base"):
            merge_adapter(base_dir, adapter_dir, tmp_path / into, into=into)
            logits[into] = AutoModelForCausalLM.from_pretrained(tmp_path / into, dtype=torch.float32)(ids).logits
    off = {into: (logits[into] - logits["trained"]).abs().max().item() for into in ("dequantized_nf4", "base")}
    assert off["dequantized_nf4"] < 1e-4 * logits["trained"].abs().max().item(), off
    assert off["base"] > 1000 * off["dequantized_nf4"], off  # the NF4 rounding the adapter was trained with is gone
