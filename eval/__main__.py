"""`python -m eval --config FILE` and `python -m eval probe --model PATH`: see eval/cli.py."""

import logging
import sys

from eval.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [eval] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # per-task chatter; our own lines say what runs
    sys.exit(main())
