"""The watchdog's reference survives a resume, in real HF Trainer runs on SmolLM2-135M.

A healthy run probes its step-0 reference and checkpoints. Its resumption starts from a model whose last five
decoder layers lost their writers (o_proj, down_proj zeroed): four of the six probe outputs now loop, against none
at step 0. On its own (absolute) thresholds that model passes, so a watchdog that took the resumed model as its
reference, as it once did, would have trained on; judged against the step-0 reference it is DEGENERATE, and the run
must stop.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from pipeline.degeneration import OutputSignals, degeneration_verdict
from pipeline.probing import load_probe_prompts
from pipeline.watchdog import DegenerationWatchdog

BROKEN_LAYERS = 5

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_intra_op_thread")]


class BreakLastLayersOnStart(TrainerCallback):
    """Zero the writers of the last BROKEN_LAYERS layers after the checkpoint is loaded, before the watchdog probes."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for layer in model.model.layers[-BROKEN_LAYERS:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()


def smollm2_trainer(smollm2_dir, tokenizer, out_dir, max_steps: int, callbacks) -> Trainer:
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    for name, param in model.named_parameters():
        param.requires_grad = "norm" in name  # a tiny optimizer; the zeroed writers stay zero
    ids = tokenizer("The river runs past the mill and the old stone bridge, then on to the sea.").input_ids
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=1, learning_rate=1e-6,
        save_strategy="steps", save_steps=1, report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 8,
                   callbacks=callbacks)


def test_a_resumed_run_is_judged_against_its_step_0_reference_and_stops(tmp_path, smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def watchdog() -> DegenerationWatchdog:  # a fresh one per run, as a resumed process builds it
        return DegenerationWatchdog(tokenizer, every_steps=100, prompts=load_probe_prompts(6), max_new_tokens=24,
                                    output_dir=tmp_path)

    first = watchdog()
    smollm2_trainer(smollm2_dir, tokenizer, tmp_path, max_steps=1, callbacks=[first]).train()
    assert first.tripped is None

    resumed = watchdog()
    trainer = smollm2_trainer(smollm2_dir, tokenizer, tmp_path, max_steps=6,
                              callbacks=[BreakLastLayersOnStart(), resumed])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))

    assert resumed.tripped is not None and resumed.tripped.verdict == "DEGENERATE"
    assert trainer.state.global_step == 2  # stopped at the first step after the resume, with a checkpoint
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()

    records = [json.loads(line) for line in (tmp_path / "watchdog.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reference"]) for r in records] == [(0, True), (1, False)]
    start, on_resume = records
    assert start["verdict"] == "PASS"
    assert on_resume["reference_step"] == 0 and on_resume["base_rates"] == start["rates"]
    assert on_resume["verdict"] == "DEGENERATE"
    broken = [OutputSignals(**sample["signals"]) for sample in on_resume["samples"]]
    assert degeneration_verdict(broken).verdict != "DEGENERATE"  # as its own reference it would have passed
