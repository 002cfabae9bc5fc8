"""`python -m pipeline run|status|doctor CONFIG [--seeds S,S,...]`: the orchestrator behind scripts/run_all.sh,
and its preflight."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import load_config
from pipeline.errors import run_cli
from pipeline.orchestrate import print_status, run_pipeline
from pipeline.runs import STAGE_ORDER
from pipeline.seeds import parse_seeds, print_seed_status, run_seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frankenllama", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run surgery, train and eval in order, skipping complete stages")
    run.add_argument("config")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--from", dest="start", choices=STAGE_ORDER, help="start at this stage")
    group.add_argument("--only", choices=STAGE_ORDER, help="run only this stage")
    run.add_argument("--force", action="store_true", help="rerun selected stages even if complete")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--num-gpus", type=int, metavar="N",
                     help="train on N GPUs of this machine, one process each (same as --set train.num_gpus=N)")
    doctor = sub.add_parser("doctor", help="check this machine against the config before anything is downloaded "
                            "(takes run's arguments; exit 1 if a check fails)")
    doctor.add_argument("config")
    doctor_group = doctor.add_mutually_exclusive_group()
    doctor_group.add_argument("--from", dest="start", choices=STAGE_ORDER, help="check from this stage on")
    doctor_group.add_argument("--only", choices=STAGE_ORDER, help="check only this stage")
    doctor.add_argument("--force", action="store_true", help="count complete stages as rerun")
    doctor.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    doctor.add_argument("--num-gpus", type=int, metavar="N", help="as for run")
    status = sub.add_parser("status", help="print each stage's state and where its outputs are")
    status.add_argument("config")
    status.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    for command in (run, status):
        command.add_argument("--seeds", metavar="S,S,...", help="the run once per seed, in <run_dir>-seed<S> for "
                             "seeds other than the config's (pipeline/seeds.py says what a seed changes)")
    doctor.add_argument("--seeds", metavar="S,S,...", help="as for run (so run_all.sh can pass run's arguments); the "
                        "checks are those of one seed's run")
    return parser


def run_doctor(config_path: str, overrides: list[str], start: str | None, only: str | None, force: bool) -> int:
    from pipeline.doctor import diagnose, render
    from pipeline.logs import configure_stage_logging
    from pipeline.orchestrate import select_stages

    configure_stage_logging("doctor")
    checks = diagnose(load_config(config_path, overrides), select_stages(start, only), force)
    print(render(checks, f"frankenllama doctor: {config_path}"), flush=True)
    return 1 if any(check.status == "fail" for check in checks) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        if args.command == "status":
            if seeds is not None:
                print_seed_status(args.config, args.overrides, seeds)
            else:
                print_status(load_config(args.config, args.overrides))
            return 0
        gpus = [f"train.num_gpus={args.num_gpus}"] if args.num_gpus is not None else []
        if args.command == "doctor":
            return run_doctor(args.config, [*args.overrides, *gpus], args.start, args.only, args.force)
        if seeds is not None:
            return run_seeds(args.config, [*args.overrides, *gpus], seeds, args.start, args.only, args.force)
        return run_pipeline(args.config, [*args.overrides, *gpus], args.start, args.only, args.force)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
