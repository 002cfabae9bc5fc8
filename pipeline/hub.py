"""The Hugging Face hub as the doctor and the stages ask it: reachable at all, and what a repo holds.

huggingface_hub retries and waits on a box without network; a socket probe with a short timeout (and the
offline flags) answers first, so a stage or the doctor says "unreachable" in one line instead of hanging. A
model repo is judged from its config.json and its safetensors headers, never its weights.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import error_reason

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


@dataclass(frozen=True)
class HubModel:
    """What the hub (or the local HF cache) says about a model repo, read without downloading its weights.

    `problem` and `fix` are set when the run could not fetch it; `config` is its config.json when readable;
    `download_bytes` counts the safetensors files not yet in the local cache.
    """

    repo: str
    where: str  # "hub" or "cache"
    config: dict | None = None
    download_bytes: int = 0
    problem: str | None = None
    fix: str | None = None


def _cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of a repo when its config.json and safetensors weights are in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return folder if shards and all((folder / shard).is_file() for shard in shards) else None
    return folder if (folder / "model.safetensors").is_file() else None


def _safetensors_bytes(metadata) -> dict[str, int]:
    """Bytes of each safetensors file of a repo, from its headers (data offsets), never its data."""
    return {name: sum(t.data_offsets[1] - t.data_offsets[0] for t in file.tensors.values())
            for name, file in metadata.files_metadata.items()}


def fetch_model_headers(repo: str, timeout_s: float = 10.0):
    """(config.json's local path, the safetensors metadata) of a hub model: config.json is downloaded (a few KB),
    the headers are read with HTTP range requests, the weights never. Raises huggingface_hub's own errors (gated,
    not found, no safetensors), which each caller turns into its own message."""
    from huggingface_hub import get_safetensors_metadata, get_token, hf_hub_download

    token = get_token()
    metadata = get_safetensors_metadata(repo, token=token, timeout=timeout_s)
    return Path(hf_hub_download(repo, "config.json", token=token, etag_timeout=timeout_s)), metadata


def inspect_hub_model(repo: str, timeout_s: float = 10.0) -> HubModel:
    """Can this machine, with its current token, fetch `repo` as safetensors? Reads config.json (a few KB) and the
    safetensors headers only. Offline or unreachable, answers from the local cache at once."""
    from huggingface_hub import get_token, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, NotASafetensorsRepoError, RepositoryNotFoundError

    cached = _cached_snapshot(repo)
    if cached is not None:
        return HubModel(repo, "cache", config=json.loads((cached / "config.json").read_text()))
    flag = hub_offline_flag()
    if flag or not hub_reachable():
        why = f"{flag}=1 is set" if flag else f"{hub_endpoint()} does not answer"
        return HubModel(repo, "hub", problem=f"not in the local HF cache and {why}",
                        fix="run where the hub is reachable (or unset the flag), or point the config at a local folder")
    try:
        config_path, metadata = fetch_model_headers(repo, timeout_s)
    except GatedRepoError:
        login = "the account of your HF_TOKEN" if get_token() else "your account, then export HF_TOKEN=hf_..."
        return HubModel(repo, "hub", problem="gated: this token may not download it",
                        fix=f"accept the licence at {hub_endpoint()}/{repo} with {login}")
    except RepositoryNotFoundError:
        return HubModel(repo, "hub", problem="no such repo on the hub (or it is private)",
                        fix="check the id; for a private repo set HF_TOKEN")
    except NotASafetensorsRepoError:
        return HubModel(repo, "hub", problem="ships no safetensors weights (only pickle .bin files)",
                        fix="convert it once to safetensors (save_pretrained(..., safe_serialization=True)) and point "
                            "the config at that folder")
    except Exception as err:
        return HubModel(repo, "hub", problem=f"the hub did not answer ({error_reason(err)})",
                        fix="check the network and HF_ENDPOINT, then rerun")
    missing = {name: size for name, size in _safetensors_bytes(metadata).items()
               if not isinstance(try_to_load_from_cache(repo, name), str)}
    return HubModel(repo, "hub", config=json.loads(config_path.read_text()),
                    download_bytes=sum(missing.values()))


def hub_dataset_bytes(repo: str, pattern: str | None, timeout_s: float = 10.0) -> int | None:
    """Total size of a hub dataset's jsonl files (those matching `pattern`), None when the hub cannot say."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, get_token

    if hub_offline_flag() or not hub_reachable():
        return None
    try:
        info = HfApi().dataset_info(repo, files_metadata=True, timeout=timeout_s, token=get_token())
    except Exception:
        return None
    wanted = [s for s in info.siblings or []
              if (fnmatch(s.rfilename, pattern) if pattern else s.rfilename.endswith((".jsonl", ".jsonl.gz")))]
    return sum(s.size or 0 for s in wanted)
