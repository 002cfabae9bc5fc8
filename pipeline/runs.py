"""Run folders and stage manifests: how stages hand work to each other on disk.

A stage writes its outputs, then `manifest.json` last; a folder without a complete manifest is never taken
for a finished stage. Outputs that must appear all at once are built in a temporary sibling and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, section_fingerprint
from pipeline.errors import UserError

MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"
STAGE_ORDER = ("surgery", "train", "eval")


def stage_fingerprint(config: RunConfig, stage: str) -> str:
    """Hash of what a stage's output depends on: its own section and every upstream section.

    A changed train section thus changes the train and eval fingerprints but not the surgery one.
    """
    upstream = STAGE_ORDER[: STAGE_ORDER.index(stage) + 1]
    parts = [config.seed, *(section_fingerprint(getattr(config, name)) for name in upstream)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the body succeeds.

    Readers see the old file or the whole new one, never a torn one; a failed or killed write leaves at most a
    `<name>.tmp-<pid>` sibling (removed here on failure, by `remove_stale_temporaries` after a kill).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("frankenllama", "torch", "transformers", "safetensors", "peft", "bitsandbytes", "lm_eval"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def write_manifest(folder: Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Mark a stage folder complete; call this after every other output is in place."""
    manifest = {
        "stage": stage,
        "status": "complete",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _package_versions(),
        **fields,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The stage's manifest if the stage completed, else None."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return manifest if manifest.get("status") == "complete" else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed stage whose parent (the orchestrator) was killed with it is re-parented to init; an init that does
    # not reap (a container's) leaves it a zombie forever, which still answers kill(0) but writes nothing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(final: Path) -> None:
    """Delete temporary siblings left by killed runs (their writer process is gone)."""
    if not final.parent.is_dir():
        return
    for sibling in final.parent.glob(f"{final.name}{TMP_MARK}*"):
        pid_text = sibling.name.rsplit(TMP_MARK, 1)[-1]
        if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue
        shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


def refuse_overlap(out: Path, inputs: list[Path]) -> None:
    """Never write into (or over) an input folder: inputs are never modified."""
    target = out.resolve()
    for folder in inputs:
        source = folder.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise UserError(f"--out {out} overlaps the input {folder}; choose an output folder outside the inputs")


@contextlib.contextmanager
def atomic_output_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; rename it into place only if the body succeeds.

    A run killed mid-write leaves only `<final>.tmp-<pid>`, which the next run removes. With `force`, an
    existing `final` is replaced only once the new one is complete.
    """
    final = Path(final)
    if final.exists() and not force:
        raise UserError(f"output {final} already exists; pass --force to replace it or choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f"{final.name}{TMP_MARK}old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
