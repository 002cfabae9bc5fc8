"""Start the train stage as one process per GPU through accelerate launch, and report how they ended.

`python -m train` with `train.num_gpus` > 1 (or `train.distributed: fsdp`) does the checks and the main-process
preparation itself (train/stage.py: bad input fails here, once, with one line), writes the accelerate config it
launches with into the stage folder (provenance, and `accelerate launch --config_file` reproduces it by hand),
then runs `accelerate launch -m train` with the same arguments. The config file is written out in full, so a
user's own accelerate default config cannot change what runs.

- ddp: every GPU holds its own 4-bit copy (device_map {"": local_rank}); gradients are all-reduced.
- fsdp: peft's documented QLoRA + FSDP settings (docs/source/accelerate/fsdp.md, fsdp_config_qlora.yaml): FSDP1,
  decoder layers auto-wrapped (the HF Trainer swaps in peft's policy that wraps the LoRA layers apart), full
  sharding, use_orig_params false, CPU-RAM-efficient loading, module states synced from the first process,
  sharded checkpoints. Parameter offload to CPU stays off: the 22b shape fits two 24 GB cards without it.

Without a CUDA GPU the processes run on CPU with the gloo backend: a check of the launch path, not a speed-up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.runs import atomic_file
from train.world import LAUNCHER_PID

log = logging.getLogger(__name__)

ACCELERATE_CONFIG = "accelerate_config.yaml"
FSDP_QLORA = {
    "fsdp_version": 1,
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_backward_prefetch": "BACKWARD_PRE",
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_forward_prefetch": False,
    "fsdp_offload_params": False,
    "fsdp_sharding_strategy": "FULL_SHARD",
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_sync_module_states": True,
    "fsdp_use_orig_params": False,
}
# The launcher's own log lines (a SIGTERM sent to the surviving workers, "failed (exitcode: 2)") would follow the
# one-line error the main worker already printed; how the workers ended is reported here instead.
LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")


def needs_launch(train: TrainConfig) -> bool:
    """Whether `python -m train` must start worker processes (it is not one already)."""
    from train.world import under_launcher

    return not under_launcher() and (train.num_gpus > 1 or train.distributed == "fsdp")


def check_gpus(train: TrainConfig) -> bool:
    """True if the workers get CUDA GPUs; a one-line error if fewer are visible than asked for."""
    import torch

    if not torch.cuda.is_available():
        if train.distributed == "fsdp":
            raise UserError("train.distributed=fsdp needs CUDA GPUs (accelerate's FSDP has no CPU backend); use "
                            "train.distributed=ddp here")
        log.info("no CUDA GPU, so the %d processes run on CPU (gloo): a check of the multi-process path, "
                 "not a speed-up", train.num_gpus)
        return False
    visible = torch.cuda.device_count()
    if visible < train.num_gpus:
        raise UserError(
            f"train.num_gpus={train.num_gpus} but only {visible} CUDA GPU(s) are visible; lower train.num_gpus (or "
            "--num-gpus) or check CUDA_VISIBLE_DEVICES"
        )
    return True


def accelerate_config(train: TrainConfig) -> dict:
    """The accelerate launch config for this stage: one process per GPU, mixed precision left to the Trainer."""
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": "FSDP" if train.distributed == "fsdp" else "MULTI_GPU",
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_process_port": 0,  # a free port, so two runs on one machine do not collide
        "main_training_function": "main",
        "mixed_precision": "no",  # the Trainer's bf16 autocast decides, as in a single process
        "num_machines": 1,
        "num_processes": train.num_gpus,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if train.distributed == "fsdp":
        config["fsdp_config"] = dict(FSDP_QLORA)
    return config


def worker_exit_code(failures: dict) -> int:
    """One exit code for the run: the main worker's if it failed on its own, else the first real failure.

    Workers stopped by the launcher after another one failed end with a negative code (SIGTERM); they are not
    the cause.
    """
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    if codes.get(0, 0) > 0:
        return codes[0]
    own = [code for _, code in sorted(codes.items()) if code > 0]
    return own[0] if own else 1


def launch_workers(train: TrainConfig, out_dir: Path, stage_args: list[str], cuda: bool) -> int:
    """Run `python -m train <stage_args>` in `train.num_gpus` processes (on GPUs if `cuda`, as check_gpus found);
    returns the run's exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    config_file = out_dir / ACCELERATE_CONFIG
    with atomic_file(config_file) as tmp:
        tmp.write_text(yaml.safe_dump(accelerate_config(train), sort_keys=True))
    log.info("starting %d %s processes (%s) with accelerate launch --config_file %s", train.num_gpus,
             "GPU" if cuda else "CPU", train.distributed, config_file)
    args = launch_command_parser().parse_args(
        ["--config_file", str(config_file), "--module", "train", *stage_args]
    )
    for name in LAUNCHER_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        launch_command(args)
    except ChildFailedError as failed:
        code = worker_exit_code(failed.failures)
        if code != 2:  # 2: the main worker already printed its one-line error
            ranks = ", ".join(str(rank) for rank, f in sorted(failed.failures.items()) if f.exitcode > 0) or "?"
            log.error("worker process %s failed (exit %d); its output is above", ranks, code)
        return code
    except SignalException as stopped:  # the launcher turns SIGTERM/SIGINT into this, after stopping the workers
        log.error("interrupted by signal %d; the workers were stopped, and a rerun resumes from the newest "
                  "complete checkpoint", stopped.sigval)
        return 128 + int(stopped.sigval)
    finally:
        os.environ.pop(LAUNCHER_PID, None)
    return 0
