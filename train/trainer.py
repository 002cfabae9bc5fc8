"""The training loop: the HF Trainer with QLoRA's settings, exact resumption, and logs worth reading.

The Trainer already saves and restores adapter, optimizer, scheduler, RNG state and step; with a map-style
dataset of pre-packed blocks it also lands on the exact data position (its seeded sampler is replayed and the
consumed batches skipped by index, nothing re-read). What is added here: which checkpoint counts as
complete (a run killed mid-save leaves a torn one), tokens/s and peak GPU memory in every log line, and a
stop on a non-finite loss that keeps the last good checkpoint (the Trainer's default would average the NaN
away in the log and save the broken weights).

With several processes (train/world.py) each accumulates grad_accum / processes micro-batches, so a step sees
the config's global batch, and the data position is the same global one at any number of processes: a
checkpoint written by N processes resumes on M. Only the RNG streams cannot carry over (each process has its
own, saved as rng_state_<i>.pth): on a changed process count every process restarts its RNG from a seed of
(seed, step, process), so the same checkpoint resumed twice on M processes still trains identically.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.runs import write_json_atomic
from train.heldout import HeldoutMetrics, HeldoutWindows, window_sums
from train.world import grad_accum_per_process, world_size

log = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Written by Trainer._save_checkpoint in this order; trainer_state.json comes last.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
# Written by the main process once every process has saved its part (CheckpointProcesses): with several writers,
# trainer_state.json is not the last file (another process may still be writing its rng_state_<i>.pth, or its FSDP
# shard), so this marker is what makes such a checkpoint complete. It also says how many processes wrote it.
PROCESSES_FILE = "processes.json"


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def checkpoint_processes(path: Path) -> int | None:
    """How many processes wrote a checkpoint; None if its marker is missing or torn."""
    try:
        return int(json.loads((path / PROCESSES_FILE).read_text())["processes"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def is_complete_checkpoint(path: Path) -> bool:
    """Its state parses and names its own step, and every process finished writing its part.

    A checkpoint with the processes marker is complete (the marker comes after everything); one without it is
    complete only as a single process writes it (every file present, rng_state.pth included, the state last).
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (json.JSONDecodeError, OSError):
        return False
    if state.get("global_step") != checkpoint_step(path):
        return False
    if checkpoint_processes(path) is not None:
        return True
    return all((path / name).is_file() for name in (*CHECKPOINT_FILES, "rng_state.pth"))


def checkpoints(out_dir: Path) -> list[Path]:
    found = [p for p in out_dir.glob("checkpoint-*") if checkpoint_step(p) is not None] if out_dir.is_dir() else []
    return sorted(found, key=checkpoint_step)


def newest_complete_checkpoint(out_dir: Path) -> Path | None:
    complete = [p for p in checkpoints(out_dir) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(out_dir: Path) -> None:
    """Delete checkpoints torn by a killed run, so neither resumption nor rotation ever picks one up."""
    for path in checkpoints(out_dir):
        if not is_complete_checkpoint(path):
            log.info("removing incomplete %s left by an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)


def optimizer_name(setting: str, device: torch.device) -> str:
    if setting == "auto":
        return "paged_adamw_32bit" if device.type == "cuda" else "adamw_torch"
    if setting.startswith("paged_") and device.type != "cuda":
        raise UserError(f"train.optimizer {setting} needs a CUDA GPU; use auto or adamw_torch on CPU")
    return setting


def training_arguments(train: TrainConfig, out_dir: Path, seed: int, device: torch.device) -> TrainingArguments:
    cuda = device.type == "cuda"
    evaluates = train.eval_steps is not None
    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        learning_rate=train.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of max_steps
        max_grad_norm=train.max_grad_norm,
        weight_decay=0.0,
        optim=optimizer_name(train.optimizer, device),
        gradient_accumulation_steps=grad_accum_per_process(train.grad_accum, world_size()),
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient every step
        bf16=cuda,
        use_cpu=not cuda,
        seed=seed,
        # The run seed orders the blocks; train.data.seed only chose them (train/data.py), so runs repeated with other
        # seeds draw the very same tokens in another order.
        data_seed=seed,
        logging_steps=1,
        logging_nan_inf_filter=False,  # the default hides a NaN loss behind the running average
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        # The held-out loss (train/heldout.py) every eval_steps and at the last step; at step 0 too, unless resuming
        # (run_training), so a resumed run never logs a step twice.
        eval_strategy="steps" if evaluates else "no",
        eval_steps=train.eval_steps,
        per_device_eval_batch_size=train.batch_size,
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        report_to="none",  # wandb is driven by WandbLogging, so the run id and config stay ours
    )


class ThroughputMeter(TrainerCallback):
    """Training tokens per second between two logs (every block is full: no padding to discount)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._mark: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = (time.perf_counter(), state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self._mark = (time.perf_counter(), state.global_step)  # the held-out evaluation is not training time

    def tokens_per_second(self, global_step: int) -> float | None:
        if self._mark is None:
            return None
        now = time.perf_counter()
        then, step = self._mark
        self._mark = (now, global_step)
        if global_step <= step or now <= then:
            return None
        return (global_step - step) * self.tokens_per_step / (now - then)


class WandbLogging(TrainerCallback):
    """Every Trainer log line into the wandb run, keyed by the optimizer step (repeats after a resume are fine)."""

    def __init__(self, run: Any):
        self.run = run

    def on_train_begin(self, args, state, control, **kwargs):
        self.run.define_metric("train/global_step")
        self.run.define_metric("train/*", step_metric="train/global_step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        payload = {f"train/{k}": v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        payload["train/global_step"] = state.global_step
        self.run.log(payload)


class CheckpointProcesses(TrainerCallback):
    """After every process has saved its part of a checkpoint, the main one marks it complete (PROCESSES_FILE)."""

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            write_json_atomic(Path(args.output_dir) / f"checkpoint-{state.global_step}" / PROCESSES_FILE,
                              {"processes": args.world_size})


def restart_rng(seed: int, step: int, process_index: int) -> int:
    """A seed for process `process_index` resuming at `step` on a changed process count; sets and returns it."""
    derived = (seed * 1_000_003 + step * 1_009 + process_index) % 2**32
    set_seed(derived)
    return derived


class QLoRATrainer(Trainer):
    """The HF Trainer plus throughput, tokens seen and memory in each log, the held-out loss under the names
    `frankenllama compare` reads, and a clean stop on a non-finite loss.

    Tokens seen are steps x the global batch's tokens (every block is full). The Trainer's own counter
    (include_num_input_tokens_seen) gathers a count from every process and reads it on the host before each
    micro-batch: a GPU sync per micro-batch, which transformers documents as slower in distributed training.
    """

    def __init__(self, *args, tokens_per_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_per_step = tokens_per_step
        self.throughput = ThroughputMeter(tokens_per_step)
        self.add_callback(self.throughput)
        self.add_callback(CheckpointProcesses())
        self.non_finite_step: int | None = None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The saved RNG streams when this checkpoint was written by as many processes as run now; else a restart.

        The Trainer itself would look for rng_state_<i>.pth (or rng_state.pth for one process), not find it, and
        go on with whatever state the process has, differently for every resumption.
        """
        if checkpoint is None:
            return
        written_by = checkpoint_processes(Path(checkpoint)) or 1
        if written_by == self.args.world_size:
            super()._load_rng_state(checkpoint)
            return
        seed = restart_rng(self.args.seed, self.state.global_step, self.args.process_index)
        if self.args.should_save:
            log.info("%s was written by %d process(es) and resumes on %d; each process restarts its random "
                     "streams (dropout) from a seed of (seed, step, process) (%d for this one)", checkpoint,
                     written_by, self.args.world_size, seed)

    def heldout_entry(self, metrics: dict[str, float]) -> dict[str, float]:
        """The evaluation loop's metrics as one log entry: heldout_loss, heldout_bits_per_byte and tokens_seen (the
        keys `frankenllama compare` reads). The loop's own eval_loss, a mean of per-batch means, is left out: with
        padded windows it is not the per-token loss."""
        entry = {
            "heldout_loss": metrics["eval_heldout_loss"],
            "heldout_bits_per_byte": metrics["eval_heldout_bits_per_byte"],
            "heldout_tokens": metrics["eval_heldout_tokens"],
            "heldout_seconds": metrics.get("eval_runtime"),
            "tokens_seen": self.state.global_step * self.tokens_per_step,
        }
        log.info("held-out loss %.4f nats/token, %.4f bits/byte at step %d (%s tokens seen)", entry["heldout_loss"],
                 entry["heldout_bits_per_byte"], self.state.global_step, f"{entry['tokens_seen']:,}")
        return entry

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_heldout_loss" in logs:
            logs = self.heldout_entry(logs)
        elif "loss" in logs:
            speed = self.throughput.tokens_per_second(self.state.global_step)
            if speed is not None:
                logs["tokens_per_second"] = round(speed, 2)
            logs["tokens_seen"] = self.state.global_step * self.tokens_per_step
            if torch.cuda.is_available():
                logs["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if not math.isfinite(logs["loss"]) and self.non_finite_step is None:
                self.non_finite_step = self.state.global_step
        super().log(logs, start_time)
        if self.non_finite_step is not None:
            # Called before the Trainer decides to save this step: the broken weights never become a checkpoint.
            self.control.should_save = False
            self.control.should_training_stop = True


def build_trainer(model, dataset, train: TrainConfig, out_dir: Path, seed: int, device: torch.device,
                  callbacks: list[TrainerCallback] | None = None,
                  heldout: HeldoutWindows | None = None) -> QLoRATrainer:
    """The stage's Trainer; `heldout` is required when train.eval_steps is set (the held-out loss is evaluated)."""
    if train.eval_steps is not None and heldout is None:
        raise ValueError("train.eval_steps is set but no held-out windows were given")
    evaluates = train.eval_steps is not None
    return QLoRATrainer(
        model=model,
        args=training_arguments(train, out_dir, seed, device),
        train_dataset=dataset,
        eval_dataset=heldout.windows if evaluates else None,
        compute_metrics=HeldoutMetrics(heldout) if evaluates else None,
        preprocess_logits_for_metrics=window_sums if evaluates else None,
        data_collator=default_data_collator,
        tokens_per_step=train.batch_size * train.grad_accum * train.seq_len,
        callbacks=callbacks or [],
    )


def out_of_memory_advice(train: TrainConfig) -> str:
    """What frees GPU memory in this run's settings, most speed kept first (for the out-of-memory error)."""
    fast = train.fast
    steps = []
    if train.recipe == "fast" and fast.saved_layers_in_effect:
        steps.append(f"lower train.fast.saved_layers (now {fast.saved_layers}; each is ~0.5 GiB on the 22b)")
    if train.recipe == "fast" and fast.host_saved_layers_in_effect:
        steps.append(f"set train.fast.host_saved_layers=0 (now {fast.host_saved_layers}; their copies out held "
                     "~1.5 GiB more reserved memory on the 22b)")
    if train.batch_size > 1:
        steps.append(f"halve train.batch_size (now {train.batch_size}) and double train.grad_accum")
    if train.recipe == "fast" and fast.checkpointing != "offload":
        steps.append("set train.fast.checkpointing=offload")
    steps.append("lower train.lora.r or train.seq_len")
    return "; or ".join(steps)


def run_training(trainer: QLoRATrainer, resume_from: Path | None, out_dir: Path, train: TrainConfig) -> None:
    """Train to max_steps (from `resume_from` if given); a non-finite loss or running out of GPU memory ends in a
    one-line error that says what to change (the checkpoints saved so far are kept for a resume)."""
    trainer.args.eval_on_start = resume_from is None and trainer.args.eval_strategy != "no"
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        last = newest_complete_checkpoint(out_dir)
        kept = f"{last} is kept and the rerun resumes from it" if last else "no checkpoint was saved yet"
        raise UserError(f"the GPU ran out of memory at step {trainer.state.global_step}; "
                        f"{out_of_memory_advice(train)}; {kept}") from None
    if trainer.non_finite_step is not None:
        last = newest_complete_checkpoint(out_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
        raise UserError(
            f"training stopped: the loss became non-finite at step {trainer.non_finite_step}; {kept}. Lower "
            "train.learning_rate or check the data, then rerun with --no-resume (or resume from that checkpoint)"
        )
