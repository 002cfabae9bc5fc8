"""Random Llama checkpoints at real widths, K layers deep, written as HF sharded safetensors.

Each tensor is drawn on the GPU when there is one (seconds for tens of GB, where a CPU takes minutes), moved to
the CPU and streamed into its shard by pipeline.checkpoint.ShardedWriter, so memory stays at one tensor. Linear
and embedding weights are N(0, 0.02) as in Llama's initialization; norm gains are drawn around 1 so that the
surgery's RMSNorm compensation has something to get wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.checkpoint import ShardedWriter, TensorSpec

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# What a flag-built config.json carries besides the widths: Llama-2-13b's own values.
LLAMA_DEFAULTS = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "bos_token_id": 1,
    "eos_token_id": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
}


def llama_config(widths: tuple[int, int, int, int], vocab_size: int, **overrides) -> dict:
    """A config.json from (hidden, heads, kv_heads, intermediate) and Llama-2's other settings."""
    hidden, heads, kv_heads, intermediate = widths
    return {**LLAMA_DEFAULTS, "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "intermediate_size": intermediate, "vocab_size": vocab_size, "head_dim": hidden // heads, **overrides}


def tensor_specs(config: dict, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor of a LlamaForCausalLM with this config, in HF's order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), dtype)]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        specs += [
            TensorSpec(f"{prefix}.input_layernorm.weight", (h,), dtype),
            TensorSpec(f"{prefix}.self_attn.q_proj.weight", (q, h), dtype),
            TensorSpec(f"{prefix}.self_attn.k_proj.weight", (kv, h), dtype),
            TensorSpec(f"{prefix}.self_attn.v_proj.weight", (kv, h), dtype),
            TensorSpec(f"{prefix}.self_attn.o_proj.weight", (h, q), dtype),
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", (h,), dtype),
            TensorSpec(f"{prefix}.mlp.gate_proj.weight", (i, h), dtype),
            TensorSpec(f"{prefix}.mlp.up_proj.weight", (i, h), dtype),
            TensorSpec(f"{prefix}.mlp.down_proj.weight", (h, i), dtype),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), dtype))
    if not config.get("tie_word_embeddings"):
        specs.append(TensorSpec("lm_head.weight", (v, h), dtype))
    return specs


def write_random_llama(folder: Path, config: dict, dtype: str, seed: int, max_shard_size: str = "5GB") -> int:
    """Write config.json and the random weights into `folder` (which must exist); returns the bytes written."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    torch_dtype = DTYPES[dtype]
    specs = tensor_specs(config, torch_dtype)
    writer = ShardedWriter(folder, specs, max_shard_size)
    for spec in specs:
        if spec.name.endswith("norm.weight"):
            values = torch.empty(spec.shape, device=device).uniform_(0.8, 1.2, generator=generator)
        else:
            values = torch.empty(spec.shape, device=device).normal_(0.0, 0.02, generator=generator)
        writer.write(spec.name, values.to(torch_dtype).cpu())
        del values
    writer.close()
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
    return writer.bytes_written


def main() -> int:
    """`python -m rehearsal.checkpoints FOLDER CONFIG_JSON DTYPE SEED`: run by the rehearsal in its own process, so
    the CUDA context used to draw the weights is gone before the stages start."""
    import sys

    folder, config_file, dtype, seed = sys.argv[1:5]
    written = write_random_llama(Path(folder), json.loads(Path(config_file).read_text()), dtype, int(seed))
    print(f"checkpoints: {written / 1e9:.2f} GB of random {dtype} weights in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
