"""The real thing at small scale: SmolLM2-135M-Instruct widened to SmolLM2-360M's widths in readers mode with a
random donor, and grown from 30 to 45 layers, answers a chat prompt exactly as the base does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery.cli import main as surgery_main

REPO = Path(__file__).resolve().parents[1]


def greedy_answer(folder: Path, prompt_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=12,
                                do_sample=False)
    return output[0, prompt_ids.shape[1]:]


@pytest.mark.slow
def test_widened_and_deepened_smollm2_gives_the_base_greedy_answer(smollm2_dir, tmp_path):
    out = tmp_path / "grown"
    # smoke.yaml's surgery section (readers mode, random donor, SmolLM2-360M's widths) and 15 new layers, which
    # with a random donor are copies of the widened base layers before them, their o_proj and down_proj zero
    assert surgery_main(["--config", str(REPO / "configs/smoke.yaml"), "--set", f"run_dir={tmp_path}",
                         "--base", str(smollm2_dir), "--dtype", "float32", "--out", str(out),
                         "--num-hidden-layers", "45"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["head_dim"], config["num_hidden_layers"]) == (960, 15, 5, 2560, 64, 45)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base_answer = greedy_answer(smollm2_dir, prompt["input_ids"])
    widened_answer = greedy_answer(out, prompt["input_ids"])
    assert "Paris" in tokenizer.decode(base_answer)
    assert torch.equal(widened_answer, base_answer), tokenizer.decode(widened_answer)
