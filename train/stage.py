"""The train stage from config to manifest: find the model, slice the data, train (resuming), export.

`<run_dir>/train/` is filled in place (checkpoints accumulate there while training) and counts as finished
only once `manifest.json` is written, last. A rerun resumes from the newest complete checkpoint unless told
`--no-resume`; checkpoints made with different settings are never silently continued.

With several processes (train.num_gpus, train/launch.py) the launching process does the checks and the
main-process preparation, then each worker runs `run_train`: the main one writes (data cache, held-out file,
wandb run, export, manifest), the others wait for it and train. The number of processes is not a checkpoint
setting: checkpoints resume on any number of them.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.models import resolve_model
from pipeline.runs import MANIFEST, atomic_file, read_manifest, stage_fingerprint, write_json_atomic, write_manifest
from pipeline.tracking import start_run

log = logging.getLogger(__name__)

RESUME_SETTINGS = "resume_settings.json"
HELDOUT = "heldout.jsonl"
LOG_HISTORY = "log_history.json"
# The train settings a checkpoint's weights, optimizer state and data position depend on; the others (max_steps,
# save_steps, wandb, ...) may change between a run and its resumption. The model and the data sources count too,
# by what they are rather than by their paths (resume_settings).
CHECKPOINT_SETTINGS = {
    "seq_len", "data", "quantization", "lora", "optimizer", "learning_rate", "warmup_ratio", "batch_size",
    "grad_accum", "max_grad_norm",
}


def locate_model(config: RunConfig) -> Path:
    """`train.model` if set, the base itself in a control run, else the surgery stage's output in this run folder."""
    if config.train.model:
        return resolve_model(config.train.model)
    if config.is_control:
        return resolve_model(config.surgery.base)
    surgery_dir = config.stage_dir("surgery")
    manifest = read_manifest(surgery_dir)
    if manifest is None:
        raise UserError(
            f"no finished surgery output in {surgery_dir} ({MANIFEST} missing or incomplete); run surgery first "
            "(python -m surgery --config FILE) or set train.model to a model folder or hub id"
        )
    if config.surgery is not None and manifest.get("fingerprint") != stage_fingerprint(config, "surgery"):
        raise UserError(f"{surgery_dir} was made with a different surgery config; rerun surgery first")
    return resolve_model(str(surgery_dir))


def check_context(model_dir: Path, seq_len: int) -> None:
    try:
        model_config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {model_dir / 'config.json'} ({err}); the model folder is incomplete") from None
    context = model_config.get("max_position_embeddings")
    if context is not None and seq_len > context:
        raise UserError(
            f"train.seq_len={seq_len} is beyond the model's context of {context} tokens "
            f"(max_position_embeddings in {model_dir / 'config.json'}); lower train.seq_len"
        )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_identity(config: RunConfig, model_dir: Path) -> str:
    """The base model as the checkpoints know it, in terms that survive moving or copying the run folder.

    A model inside the run folder (the surgery output) is its path relative to the folder; any other is the
    reference as configured in train.model, a hub snapshot also with its commit, so a changed upstream model is
    still a changed model. Never an absolute path.
    """
    inside, run_dir = model_dir.absolute(), config.run_dir.absolute()
    if inside.is_relative_to(run_dir):
        return f"<run_dir>/{inside.relative_to(run_dir).as_posix()}"
    reference = config.train.model or str(inside)
    return f"{reference}@{model_dir.name}" if model_dir.parent.name == "snapshots" else reference


def resume_settings(config: RunConfig, model_dir: Path) -> dict[str, Any]:
    """What checkpoints depend on: CHECKPOINT_SETTINGS of the train section, the seed, the base model (what it is,
    and its manifest's fingerprint), and the data slice's key (which also changes when the bytes of a local source
    file or the tokenizer change). Nothing in it is an absolute path or a file time."""
    from train.data import slice_key

    base = read_manifest(model_dir) or {}
    return {
        "seed": config.seed,
        "model": model_identity(config, model_dir),
        "model_fingerprint": base.get("fingerprint"),
        "data_slice": slice_key(config.train.data, config.train.seq_len, model_dir),
        "train": checkpoint_train_settings(config.train),
    }


def checkpoint_train_settings(train: TrainConfig) -> dict[str, Any]:
    """CHECKPOINT_SETTINGS of the train section, less the data sources: paths, which change when the data moves with
    the run folder; the data slice's key stands for their bytes."""
    settings = train.model_dump(mode="json", include=CHECKPOINT_SETTINGS)
    del settings["data"]["sources"]
    if train.distributed == "fsdp":
        # FSDP checkpoints hold sharded weights and optimizer state that a DDP or single process cannot read; the
        # key exists only then, so the settings recorded by runs that predate it still match.
        settings["distributed"] = "fsdp"
    return settings


def changed_resume_settings(out_dir: Path, settings: dict[str, Any]) -> list[str]:
    """The settings the checkpoints in `out_dir` were made with that differ from `settings` (none: no checkpoints)."""
    path = out_dir / RESUME_SETTINGS
    if not (path.is_file() and any(out_dir.glob("checkpoint-*"))):
        return []
    old, new = _flatten(json.loads(path.read_text())), _flatten(settings)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def check_resume_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to continue checkpoints made with other settings; record the settings for the next resume."""
    changed = changed_resume_settings(out_dir, settings)
    if changed:
        raise UserError(
            f"the checkpoints in {out_dir} were made with other settings (changed: {', '.join(changed)}); "
            "rerun with --no-resume to start over, or restore those settings to resume"
        )
    write_json_atomic(out_dir / RESUME_SETTINGS, settings)


def why_not_resumable(out_dir: Path, settings: dict[str, Any], max_steps: int) -> str | None:
    """Why the checkpoints in `out_dir` cannot continue this config's run, or None if they can (or there are none).

    Besides changed settings: a newest checkpoint past train.max_steps (the config asks for a shorter run).
    """
    from train.trainer import checkpoint_step, newest_complete_checkpoint

    changed = changed_resume_settings(out_dir, settings)
    if changed:
        return f"its checkpoints were made with other settings (changed: {', '.join(changed)})"
    newest = newest_complete_checkpoint(out_dir)
    if newest is not None and checkpoint_step(newest) > max_steps:
        return f"its newest checkpoint ({newest.name}) is past train.max_steps={max_steps}"
    return None


def publish_heldout(source: Path, out_dir: Path) -> Path:
    """Copy the held-out documents next to the stage outputs, where the eval stage looks for them."""
    target = out_dir / HELDOUT
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def start_watchdog(train: TrainConfig, tokenizer, out_dir: Path):
    """pipeline.watchdog's greedy-sample check as a Trainer callback, when `train.watchdog.enabled`."""
    if not train.watchdog.enabled:
        return None
    from pipeline.watchdog import DegenerationWatchdog

    return DegenerationWatchdog.from_config(train.watchdog, tokenizer, out_dir)


def heldout_set(train: TrainConfig, tokenizer, heldout_path: Path):
    """The fixed held-out windows the loss is evaluated on during training; None when train.eval_steps is off."""
    if train.eval_steps is None:
        return None
    from train.heldout import heldout_windows, read_texts

    heldout = heldout_windows(read_texts(heldout_path), tokenizer, train.seq_len, train.eval_blocks)
    if not heldout.windows:
        raise UserError(f"the held-out documents in {heldout_path} are all shorter than two tokens; raise "
                        "train.data.heldout_fraction, or set train.eval_steps to null to train without held-out loss")
    log.info("held-out loss every %d steps on %d window(s) of %d tokens: %d documents, %s predicted tokens",
             train.eval_steps, len(heldout.windows), train.seq_len, len(heldout.texts), f"{heldout.predicted_tokens:,}")
    return heldout


def last_loss(log_history: list[dict[str, Any]]) -> float | None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else None


@dataclass(frozen=True)
class Preflight:
    """What the cheap checks found: the model to train, this config's fingerprint, and whether it is done."""

    model_dir: Path
    fingerprint: str
    complete: bool


def preflight(config: RunConfig, resume: bool) -> Preflight:
    """The checks that need no torch: bad input fails here in a second, with one line, before any work."""
    from train.world import grad_accum_per_process, launched_with_fsdp, processes_to_run, under_launcher

    out_dir, train = config.stage_dir("train"), config.train
    model_dir = locate_model(config)
    check_context(model_dir, train.seq_len)
    grad_accum_per_process(train.grad_accum, processes_to_run(train.num_gpus))
    if under_launcher() and launched_with_fsdp() != (train.distributed == "fsdp"):
        raise UserError(f"the launcher {'runs' if launched_with_fsdp() else 'does not run'} FSDP but "
                        f"train.distributed is {train.distributed}; make them agree")
    if train.distributed == "fsdp" and train.watchdog.enabled:
        # Its greedy probes call generate() on the model, whose weights FSDP keeps sharded outside forward passes.
        raise UserError("the degeneration watchdog does not run under train.distributed=fsdp yet; set "
                        "train.watchdog.enabled=false, or use train.distributed=ddp if the model fits one GPU")
    fingerprint = stage_fingerprint(config, "train")
    manifest = read_manifest(out_dir)
    complete = resume and manifest is not None and manifest.get("fingerprint") == fingerprint
    if complete:
        log.info("already complete for this config (%s); pass --no-resume to train again", out_dir)
    return Preflight(model_dir, fingerprint, complete)


def prepare_stage_folder(config: RunConfig, model_dir: Path, resume: bool, restart_if_unfit: bool = False):
    """The main process's work before training: the data slice, the stage folder, its settings and held-out file.

    `restart_if_unfit`: start over, instead of refusing, when the checkpoints cannot continue this config's run
    (the orchestrator's choice for a train stage whose config changed). Returns the prepared corpus. Idempotent,
    so a launching process and then the main worker may both run it.
    """
    from train.data import prepare_corpus
    from train.trainer import remove_incomplete_checkpoints

    out_dir, train = config.stage_dir("train"), config.train
    # The data first: unreadable sources or a slice larger than them fail before this stage's folder is touched.
    corpus = prepare_corpus(train.data, train.seq_len, model_dir, config.run_dir / "data")
    settings = resume_settings(config, model_dir)
    if not resume and out_dir.exists():
        log.info("--no-resume, deleting the previous checkpoints and outputs in %s", out_dir)
        shutil.rmtree(out_dir)
    elif restart_if_unfit and (reason := why_not_resumable(out_dir, settings, train.max_steps)):
        log.info("starting over in %s: %s", out_dir, reason)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_resume_settings(out_dir, settings)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here on the folder is a run in progress
    publish_heldout(corpus.heldout_path, out_dir)
    remove_incomplete_checkpoints(out_dir)
    return corpus


def launch_train(config: RunConfig, resume: bool, stage_args: list[str], restart_if_unfit: bool = False) -> int:
    """The stage as `train.num_gpus` worker processes; `stage_args` are what each worker's `python -m train` gets.

    The checks and the main-process preparation run here first, so bad input fails once, with one line, before
    any worker starts; the workers are then told to resume (a restart has already cleared the folder).
    """
    from train.launch import check_gpus, launch_workers

    checked = preflight(config, resume)
    if checked.complete:
        return 0
    cuda = check_gpus(config.train)
    prepare_stage_folder(config, checked.model_dir, resume, restart_if_unfit)
    return launch_workers(config.train, config.stage_dir("train"), [*stage_args, "--resume"], cuda)


def gather_adapter_state(trainer) -> dict | None:
    """Under FSDP the adapter is sharded across the processes: gather it (every process must call this), in the
    full-state-dict form peft's FSDP guide saves with. None when this process holds the whole model."""
    if not trainer.is_fsdp_enabled:
        return None
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    return trainer.accelerator.get_state_dict(trainer.model)


def run_train(config: RunConfig, resume: bool = True, restart_if_unfit: bool = False) -> Path:
    """Run the whole stage (as a single process, or as one worker of several); returns `<run_dir>/train/`.

    `restart_if_unfit`: see prepare_stage_folder.
    """
    out_dir = config.stage_dir("train")
    train = config.train
    checked = preflight(config, resume)
    if checked.complete:
        return out_dir
    model_dir = checked.model_dir

    # Heavy imports only now: bad input above fails in a second, and the data/model modules need torch & co.
    import torch
    from transformers import AutoTokenizer, set_seed

    from train.data import prepare_corpus
    from train.export import merge_adapter, save_adapter
    from train.fsdp_adapter import FsdpAdapterCheckpoints
    from train.model import load_for_training, training_device
    from train.trainer import WandbLogging, build_trainer, newest_complete_checkpoint, run_training
    from train.world import join_world

    world = join_world()
    main = world.is_main_process
    run = corpus = None
    if main:
        corpus = prepare_stage_folder(config, model_dir, resume, restart_if_unfit)
        wandb_config = {**config.model_dump(mode="json"), "processes": world.num_processes,
                        "distributed": train.distributed}
        run = start_run(train.wandb, config.run_dir, out_dir, "train", wandb_config)
    wandb_run_id = run.id if run is not None else None
    world.wait_for_everyone()
    if corpus is None:  # the others read the slice the main process prepared (a cache hit: nothing is written)
        corpus = prepare_corpus(train.data, train.seq_len, model_dir, config.run_dir / "data")
    device = training_device()
    exit_code = 1
    try:
        set_seed(config.seed)
        model = load_for_training(model_dir, train, device)
        resume_from = newest_complete_checkpoint(out_dir) if resume else None
        callbacks = [FsdpAdapterCheckpoints(resume_from)] if train.distributed == "fsdp" else []
        callbacks += [WandbLogging(run)] if run else []
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        watchdog = start_watchdog(train, tokenizer, out_dir)
        callbacks += [watchdog] if watchdog else []
        trainer = build_trainer(model, corpus.dataset(), train, out_dir, config.seed, device, callbacks,
                                heldout_set(train, tokenizer, corpus.heldout_path))
        run_training(trainer, resume_from, out_dir, train)
        if watchdog is not None and watchdog.tripped is not None:
            raise UserError(
                f"training stopped at step {trainer.state.global_step}: the degeneration watchdog judged the greedy "
                f"samples DEGENERATE ({'; '.join(watchdog.tripped.reasons)}); samples in {out_dir / 'watchdog.jsonl'},"
                " the checkpoint it saved is kept for inspection; fix the cause and rerun with --no-resume"
            )
        adapter_state = gather_adapter_state(trainer)  # the last collective: the main process exports alone
        if not main:
            return out_dir
        history = trainer.state.log_history
        write_json_atomic(out_dir / LOG_HISTORY, history)
        save_adapter(model, out_dir / "adapter", adapter_state)
        del trainer, model, adapter_state
        gc.collect()  # the Trainer and its Accelerator hold the model in reference cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()
        into = train.merge if train.quantization == "nf4" else "base"  # unquantized training saw the stored weights
        merge = merge_adapter(model_dir, out_dir / "adapter", out_dir / "merged", train.max_shard_size, into, device)
        exit_code = 0
    finally:
        if run is not None:
            run.finish(exit_code=exit_code)
    steps = max((entry.get("step", 0) for entry in history), default=0)
    write_manifest(
        out_dir,
        "train",
        fingerprint=checked.fingerprint,
        model=str(model_dir),
        device=str(device),
        processes=world.num_processes,
        distributed=train.distributed,
        quantization=train.quantization,
        steps=steps,
        final_loss=last_loss(history),
        data=corpus.summary,
        heldout=HELDOUT,
        adapter="adapter",
        merged="merged",
        merge=merge,
        log_history=LOG_HISTORY,
        wandb_run_id=wandb_run_id,
    )
    log.info("done after %d steps; merged model in %s", steps, out_dir / "merged")
    return out_dir
