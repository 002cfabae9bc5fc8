"""`python -m train --config FILE [--set dotted.key=value ...] [--resume | --no-resume]`."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import load_config
from pipeline.errors import run_cli


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def body() -> int:
        from train.stage import run_train

        run_train(load_config(args.config, args.overrides), resume=args.resume)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
