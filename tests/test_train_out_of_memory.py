"""Running out of GPU memory mid-run ends in a one-line error that names the run's own memory levers and the
checkpoint a rerun resumes from, not in a CUDA traceback."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from pipeline.config import LoraSettings, TrainConfig, WandbConfig
from pipeline.errors import UserError
from train.data import PackedBlocks
from train.model import prepare_for_training
from train.trainer import build_trainer, newest_complete_checkpoint, run_training


class RunsOutOfMemoryAt(TrainerCallback):
    """What the CUDA caching allocator raises when a step does not fit (no GPU here to fill)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.17 GiB")


@pytest.mark.parametrize("batch_size", [1, 2])
def test_out_of_memory_names_the_levers_and_keeps_the_checkpoint(tiny_llama, tmp_path, batch_size):
    settings = TrainConfig(quantization="none", seq_len=16, max_steps=4, save_steps=2, grad_accum=1,
                           batch_size=batch_size, lora=LoraSettings(r=4), wandb=WandbConfig(mode="disabled"),
                           eval_steps=None)
    model = prepare_for_training(AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32),
                                 settings.lora, gradient_checkpointing=False)
    blocks = torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0)).numpy()
    out = tmp_path / "out"
    trainer = build_trainer(model, PackedBlocks(blocks), settings, out, seed=0, device=torch.device("cpu"),
                            callbacks=[RunsOutOfMemoryAt(3)])
    with pytest.raises(UserError) as error:
        run_training(trainer, None, out, settings)
    message = str(error.value)
    assert "\n" not in message and message.startswith("the GPU ran out of memory at step 3")
    assert f"train.fast.saved_layers (now {settings.fast.saved_layers}" in message
    assert "train.fast.checkpointing=offload" in message
    assert f"train.fast.host_saved_layers=0 (now {settings.fast.host_saved_layers}" in message
    assert ("train.batch_size (now 2)" in message) == (batch_size == 2)
    checkpoint = newest_complete_checkpoint(out)
    assert checkpoint.name.endswith("-2") and f"{checkpoint} is kept" in message
