"""`python -m surgery ...` and `python -m surgery verify ...`: see surgery/cli.py."""

import logging
import sys

from surgery.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[surgery] %(message)s", stream=sys.stderr)
    sys.exit(main())
