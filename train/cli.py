"""The train stage's command line:

    python -m train --config FILE [--set dotted.key=value ...] [--resume | --no-resume | --resume-or-restart]

With `train.num_gpus` > 1 (or `train.distributed: fsdp`) this process checks the input, prepares the stage folder
and starts the workers through accelerate launch, each of which runs this same command (train/launch.py).
"""

from __future__ import annotations

import argparse
import logging

from pipeline.config import load_config
from pipeline.errors import EXIT_USER_ERROR, UserError, run_cli
from pipeline.logs import configure_stage_logging
from train.world import (
    die_with_parent,
    grow_cuda_memory_in_place,
    is_secondary_process,
    keep_one_process_on_one_gpu,
    run_worker,
    under_launcher,
)

RESUME_OR_RESTART = "or-restart"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="QLoRA-train the surgery output (or train.model) and export the adapter and a merged model.",
    )
    parser.add_argument("--config", required=True, help="run config (YAML), e.g. configs/smoke.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=10 (repeatable)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="resume", action="store_true", default=True,
                       help="continue from the newest complete checkpoint (the default)")
    group.add_argument("--no-resume", dest="resume", action="store_false",
                       help="delete this stage's checkpoints and outputs and start over")
    group.add_argument("--resume-or-restart", dest="resume", action="store_const", const=RESUME_OR_RESTART,
                       help="continue when the checkpoints fit this config (only max_steps, save_steps, wandb or "
                            "the like changed), else start over instead of refusing; what run_all does when the "
                            "train section changed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grow_cuda_memory_in_place()
    secondary = is_secondary_process()
    # The main worker tells the story; the others only speak up for warnings.
    configure_stage_logging("train", logging.WARNING if secondary else logging.INFO)

    def body() -> int:
        from train.launch import needs_launch
        from train.stage import launch_train, run_train

        config = load_config(args.config, args.overrides)
        resume, restart_if_unfit = args.resume is not False, args.resume == RESUME_OR_RESTART
        if needs_launch(config.train):
            stage_args = ["--config", args.config, *(f"--set={assignment}" for assignment in args.overrides)]
            return launch_train(config, resume, stage_args, restart_if_unfit)
        if not under_launcher():
            keep_one_process_on_one_gpu()
        run_train(config, resume=resume, restart_if_unfit=restart_if_unfit)
        return 0

    def quiet() -> int:  # every worker meets the same user error; the main one prints it, once
        try:
            return body()
        except UserError:
            return EXIT_USER_ERROR

    if not under_launcher():
        return run_cli(body)
    die_with_parent()
    run_worker(quiet if secondary else lambda: run_cli(body))
