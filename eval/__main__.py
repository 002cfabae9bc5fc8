"""`python -m eval --config FILE`, `python -m eval probe --model PATH` and `python -m eval compare RUN...`: see
eval/cli.py."""

import logging
import sys

from eval.cli import main
from pipeline.logs import configure_stage_logging

if __name__ == "__main__":
    configure_stage_logging("compare" if sys.argv[1:2] == ["compare"] else "eval")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # per-task chatter; our own lines say what runs
    sys.exit(main())
