"""The degeneration watchdog inside a real HF Trainer run on SmolLM2-135M.

The run is healthy for three steps, then a callback zeroes every o_proj and down_proj (the A=0 failure:
one token forever). The watchdog, probing every 2 steps, must catch it at step 4, have the Trainer save
checkpoint-4, stop long before max_steps, and leave its samples in watchdog.jsonl and a wandb table.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from pipeline.probing import load_probe_prompts
from pipeline.watchdog import DegenerationWatchdog

BREAK_AT_STEP = 3


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class ZeroWritersAt(TrainerCallback):
    """Break the model mid-training the way the 2023 A=0 model was broken from the start."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == BREAK_AT_STEP:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        param.zero_()


class ModeRecorder(TrainerCallback):
    """Records the training flag right after the watchdog ran, and during its generation (via a hook)."""

    def __init__(self, model):
        self.after_probe: list[bool] = []
        self.during_generation: list[bool] = []
        model.lm_head.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        if not torch.is_grad_enabled():
            self.during_generation.append(module.training)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_probe.append(model.training)


def test_watchdog_saves_and_stops_a_run_whose_samples_degenerate(tmp_path, smollm2_dir):
    import wandb

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    for name, param in model.named_parameters():
        param.requires_grad = "norm" in name  # keep the optimizer tiny; the writers stay frozen once zeroed
    text = "The river runs past the mill and the old stone bridge, then on through the fields to the sea."
    ids = tokenizer(text).input_ids[:24]
    dataset = [{"input_ids": ids, "labels": ids}] * 16

    watchdog = DegenerationWatchdog(
        tokenizer, every_steps=2, prompts=load_probe_prompts(4), max_new_tokens=16, stop_on_degenerate=True,
        output_dir=tmp_path / "watchdog",
    )
    modes = ModeRecorder(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=1, learning_rate=1e-5,
        save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    run = wandb.init(mode="offline", dir=str(tmp_path), project="frankenllama-test")
    try:
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          callbacks=[ZeroWritersAt(), watchdog, modes])
        trainer.train()
    finally:
        run.finish()

    assert trainer.state.global_step == 4
    assert watchdog.tripped is not None and watchdog.tripped.verdict == "DEGENERATE"
    assert (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "watchdog" / "watchdog.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert [r["verdict"] != "DEGENERATE" for r in records] == [True, True, False]
    assert records[2]["rates"]["single_token_loop"] == 1.0
    assert len(records[2]["samples"]) == 4 and records[2]["samples"][0]["signals"]["longest_run"] == 16
    assert modes.during_generation and not any(modes.during_generation)  # generated in eval mode
    assert all(modes.after_probe)  # and handed back in train mode
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/watchdog/samples_*.table.json"))
    assert len(tables) == 3
    table = json.loads(tables[-1].read_text())
    assert table["columns"][:3] == ["step", "prompt", "output"] and len(table["data"]) == 4
