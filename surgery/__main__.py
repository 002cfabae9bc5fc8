"""`python -m surgery ...` and `python -m surgery verify ...`: see surgery/cli.py."""

import sys

from surgery.cli import main

if __name__ == "__main__":
    sys.exit(main())
