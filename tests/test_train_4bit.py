"""The NF4 path on the real SmolLM2: LoRA gradients still reach q_proj after an eval-mode generate() (the
AVX512-BF16 repacking trap of bitsandbytes on CPU), and the stage's own Trainer takes a few real steps; and the
surgery's all-zero blocks stay exactly zero in NF4."""

from __future__ import annotations

import gzip
import json
import logging

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from pipeline.config import LoraSettings, TrainConfig, WandbConfig
from train.data import BUNDLED_SOURCES, PackedBlocks, make_tokenize, pack_documents
from train.model import code_zero_blocks_exactly, load_base_model, load_for_training, zero_blocks
from train.trainer import build_trainer


def q_proj_lora(model, layer: int, factor: str) -> torch.nn.Parameter:
    attention = model.base_model.model.model.layers[layer].self_attn
    return getattr(attention.q_proj, f"lora_{factor}")["default"].weight


def test_nf4_smollm2_keeps_q_proj_gradients_after_generate_and_trains(smollm2_dir, tmp_path):
    settings = TrainConfig(
        quantization="nf4", seq_len=32, max_steps=3, save_steps=100, grad_accum=1, learning_rate=1e-3,
        warmup_ratio=0.0, lora=LoraSettings(r=8, dropout=0.0), wandb=WandbConfig(mode="disabled"), eval_steps=None,
    )
    cpu = torch.device("cpu")
    model = load_for_training(smollm2_dir, settings, cpu)
    layers = model.base_model.model.model.layers
    assert isinstance(layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert layers[0].self_attn.q_proj.base_layer.weight.quant_state.nested  # double quantization
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    # An eval-mode generate first: on AVX512-BF16 CPUs this is what used to repack the 4-bit weights in place.
    model.eval()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt.input_ids.shape[1]:])

    model.train()
    batch = tokenizer("Return the number of items in a container, counting each item once.", return_tensors="pt")
    model(**batch, labels=batch.input_ids).loss.backward()
    # lora_B of layer 0's q_proj only gets gradient if it flowed back through all 30 layers' 4-bit linears.
    for index in range(len(layers)):
        assert q_proj_lora(model, index, "B").grad.abs().sum() > 0, f"no gradient at layer {index}'s q_proj"
    model.zero_grad(set_to_none=True)

    with gzip.open(BUNDLED_SOURCES["python-stdlib-docs"], "rt", encoding="utf-8") as handle:
        texts = [json.loads(next(handle))["text"] for _ in range(2)]
    documents = make_tokenize(tokenizer)(texts)
    blocks = pack_documents(documents, settings.seq_len, budget=3 * settings.seq_len)
    a_before = q_proj_lora(model, 0, "A").detach().clone()
    trainer = build_trainer(model, PackedBlocks(blocks), settings, tmp_path / "out", seed=0, device=cpu)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert q_proj_lora(model, 0, "B").abs().sum() > 0  # B starts at zero: it moved
    assert not torch.equal(q_proj_lora(model, 0, "A"), a_before)


def test_bf16_compute_keeps_an_fp32_residual_stream_so_small_lora_deltas_survive(tiny_llama):
    """The CUDA layout (NF4, bf16 compute, bf16 tables) reproduced on CPU: early LoRA deltas must not round away."""
    from transformers import AutoModelForCausalLM

    from train.model import nf4_config, prepare_for_training

    base = AutoModelForCausalLM.from_pretrained(tiny_llama("tiny"), dtype=torch.bfloat16, device_map={"": "cpu"},
                                                quantization_config=nf4_config(torch.bfloat16))
    model = prepare_for_training(base, LoraSettings(r=4, alpha=4, dropout=0.0), gradient_checkpointing=True)
    dtypes = {name.split(".")[-2]: p.dtype for name, p in model.named_parameters() if "lora" not in name}
    assert dtypes["embed_tokens"] == dtypes["lm_head"] == torch.bfloat16  # frozen tables not upcast
    assert dtypes["input_layernorm"] == dtypes["norm"] == torch.float32
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 1e-5)  # an adapter a few steps in: its output ~1e-4 of the base's
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        with model.disable_adapter():
            plain = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert adapted.dtype == torch.float32 and (adapted - plain).abs().max() > 0  # a bf16 stream rounds it to 0
    with torch.no_grad():  # outside autocast, as the watchdog generates
        assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 8)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert q_proj_lora(model, 0, "A").grad.abs().sum() > 0


def test_all_zero_nf4_blocks_are_coded_as_exact_zeros():
    """On CUDA bitsandbytes codes a block of all-zero weights against an absmax of 0, and the double-quantized absmax
    comes back tiny but non-zero, so any code but NF4's 0 leaks into the surgery's zero blocks (seen on an H200).
    Reproduced on CPU by giving those blocks another code; coding them as 0 restores exact zeros, nothing else."""
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.02
    weight[:16] = 0  # 64 all-zero blocks of 64 weights
    weight[20, :3] = 0  # zeros inside a block that is not all zero stay NF4's business
    packed = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True,
                               quant_type="nf4").to("cpu")
    state = packed.quant_state
    as_quantized = bnbf.dequantize_4bit(packed.data, state)
    packed.data.view(-1).view(torch.uint8)[: 16 * 256 // 2] = 0x00  # the blocks coded like CUDA codes them
    assert bnbf.dequantize_4bit(packed.data, state)[:16].abs().max() > 0  # the leak
    assert code_zero_blocks_exactly(packed, zero_blocks(weight, state.blocksize), state.blocksize) == 64
    restored = bnbf.dequantize_4bit(packed.data, state)
    assert torch.equal(restored[:16], torch.zeros(16, 256))
    assert torch.equal(restored, as_quantized)


def test_the_nf4_loader_codes_every_all_zero_block_of_the_checkpoint(tiny_llama, caplog):
    folder = tiny_llama("zeros")
    weights_file = folder / "model.safetensors"
    tensors = load_file(weights_file)
    tensors["model.layers.1.self_attn.o_proj.weight"][:4] = 0  # 4 rows of 32 weights: blocks 0 and 1 of 64
    tensors["model.layers.0.mlp.down_proj.weight"][:, :] = 0  # 32 x 64 weights: 32 blocks
    save_file(tensors, weights_file, metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="train.model"):
        model = load_base_model(folder, "nf4", torch.device("cpu"))
    assert "34 all-zero blocks of the checkpoint coded as exact zeros" in caplog.text
    down = model.model.layers[0].mlp.down_proj
    assert torch.equal(bnbf.dequantize_4bit(down.weight.data, down.weight.quant_state).float(), torch.zeros(32, 64))
