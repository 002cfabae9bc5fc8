"""`python -m surgery ...` and `python -m surgery verify ...`: see surgery/cli.py."""

import sys

from pipeline.logs import configure_stage_logging
from surgery.cli import main

if __name__ == "__main__":
    configure_stage_logging("surgery")
    sys.exit(main())
