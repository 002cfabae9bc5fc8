"""Weights & Biases for every stage: choose online or offline before `wandb.init`, keep one run id per stage.

Without a key, `wandb.init` in online mode fails at once, and a box with no network hangs on retries, so the
mode is decided here first: `auto` is online only with an API key and a server that answers, else offline
(a run folder to `wandb sync` later). The run id lives in `<stage folder>/wandb_run_id`, so a resumed stage
continues the same wandb run. All stages of one run share a group (the run folder's name by default), so the
eval stage's results sit next to the train run. `wandb` is imported lazily: code paths that never track
(the benchmarks) do not need it installed.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import WandbConfig
from pipeline.errors import UserError, error_reason
from pipeline.runs import atomic_file

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
DEFAULT_SERVER = "https://api.wandb.ai"
SECRET_KEY = re.compile(r"token|secret|password|api_?key|credential", re.IGNORECASE)


def server_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_SERVER)


def api_key_available() -> bool:
    """True if wandb would find a key: WANDB_API_KEY, or a netrc entry for the server (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(server_url()).hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def server_reachable(timeout_s: float = 3.0) -> bool:
    parts = urlsplit(server_url())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def choose_mode(settings: WandbConfig) -> tuple[str, str]:
    """The wandb mode to init with, and why (for the log line)."""
    if settings.mode == "disabled":
        return "disabled", "wandb.mode is disabled"
    if settings.mode == "offline":
        return "offline", "wandb.mode is offline"
    if settings.mode == "online":
        if not api_key_available():
            raise UserError(
                "wandb.mode is online but no W&B API key was found; set WANDB_API_KEY or run `wandb login`, "
                "or set wandb.mode to auto or offline"
            )
        return "online", "wandb.mode is online"
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode in ("offline", "dryrun", "disabled"):
        return ("disabled" if env_mode == "disabled" else "offline"), f"WANDB_MODE={env_mode} in the environment"
    if not api_key_available():
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login` to go online)"
    if not server_reachable():
        return "offline", f"{server_url()} is not reachable"
    return "online", "API key found and server reachable"


def redact_secrets(value: Any) -> Any:
    """A copy of a config tree with every secret-looking key's value replaced, so no token reaches wandb."""
    if isinstance(value, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) else redact_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def persistent_run_id(stage_folder: Path) -> str:
    """The wandb run id of this stage folder, created once and reused by every resumed run."""
    path = stage_folder / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)  # wandb ids are short [a-z0-9] strings
    stage_folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(run_id + "\n")
    return run_id


def start_run(
    settings: WandbConfig, run_dir: Path, stage_folder: Path, stage: str, config: dict[str, Any],
    folder_when_done: Path | None = None,
) -> Any | None:
    """Start (or resume) this stage's wandb run; None when tracking is disabled.

    `folder_when_done`: where `stage_folder` will be once the stage completes, for a stage that builds its folder
    under a temporary name (eval); the log line names that path, and wandb's own console lines, which would name
    the temporary one, are silenced.
    """
    mode, reason = choose_mode(settings)
    if mode == "disabled":
        log.info("wandb: disabled (%s)", reason)
        return None
    import wandb

    run_id = persistent_run_id(stage_folder)
    group = settings.group or Path(run_dir).resolve().name
    if mode == "offline":
        log.info("wandb: offline (%s); upload later with: wandb sync %s", reason,
                 (folder_when_done or stage_folder) / "wandb" / "offline-run-*")
    else:
        log.info("wandb: online, project %s, group %s, run id %s", settings.project, group, run_id)
    try:
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=group,
            name=settings.name or f"{group}-{stage}",
            job_type=stage,
            id=run_id,
            resume="allow",
            dir=str(stage_folder),
            mode=mode,
            config=redact_secrets(config),
            settings=wandb.Settings(silent=True) if folder_when_done is not None else None,
        )
    except Exception as err:
        reason = error_reason(err)
        raise UserError(
            f"wandb could not start ({reason}); set wandb.mode to offline or disabled in the {stage} section"
        ) from None
