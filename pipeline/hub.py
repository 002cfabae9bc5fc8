"""Whether the Hugging Face hub can be asked at all, decided in seconds.

huggingface_hub retries and waits on a box without network; a socket probe with a short timeout (and the
offline flags) answers first, so a stage or the doctor says "unreachable" in one line instead of hanging.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_offline_flag() -> str | None:
    """The environment variable that puts huggingface_hub offline, if one is set."""
    for var in OFFLINE_FLAGS:
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return var
    return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or the hub does not answer in time."""
    if hub_offline_flag():
        return False
    parts = urlsplit(hub_endpoint())
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False
