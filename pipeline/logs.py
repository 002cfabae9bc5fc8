"""One log line style for every stage: `HH:MM:SS [stage] what is happening`, on stderr.

The orchestrator's own lines read `[frankenllama] ...`; a stage's lines carry its name, so the interleaved output
of a whole run says at a glance which program is talking.
"""

from __future__ import annotations

import logging
import sys


def configure_stage_logging(stage: str, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s [{stage}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
