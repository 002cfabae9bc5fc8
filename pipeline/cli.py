"""The `frankenllama` console entry: one front door to the stage CLIs.

Stages stay independent programs (`python -m surgery` and friends); this entry only dispatches to them, so
it never reaches into a stage's internals.
"""

from __future__ import annotations

import subprocess
import sys

STAGES = ("surgery", "train", "eval")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("run", "status", "doctor"):
        from pipeline.__main__ import main as pipeline_main

        return pipeline_main(argv)
    if argv and argv[0] == "compare":  # reads eval reports, so it lives with eval: `python -m eval compare`
        return subprocess.call([sys.executable, "-m", "eval", *argv])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(f"usage: frankenllama {{run,status,doctor,compare,{','.join(STAGES)}}} [arguments]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return subprocess.call([sys.executable, "-m", argv[0], *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
