"""The one config schema for a whole run, and how a YAML file plus `--set` overrides become one.

Every key is declared here with its default; unknown keys and wrong types fail before any work, with the
dotted key in the message (mergekit's strict-pydantic habit).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import UserError

FillMode = Literal["readers", "block_diagonal", "block_triangular", "zero"]
LayerMap = Literal["index", "proportional"]
DType = Literal["bfloat16", "float16", "float32"]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetWidths(StrictModel):
    """Widths of the grown model; unset ones come from the donor (required with a random donor)."""

    hidden_size: int | None = Field(default=None, gt=0)
    num_attention_heads: int | None = Field(default=None, gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    intermediate_size: int | None = Field(default=None, gt=0)


class SurgeryConfig(StrictModel):
    """How to widen `base` with the blocks of `donor` (a model reference, or `random`)."""

    base: str
    donor: str = "random"
    mode: FillMode = "readers"
    layer_map: LayerMap = "proportional"
    legacy: bool = False
    dtype: DType = "bfloat16"
    seed: int = 0
    target: TargetWidths = Field(default_factory=TargetWidths)
    max_shard_size: str = "5GB"


class TrainConfig(StrictModel):
    """QLoRA fine-tuning of the surgery output (or of `model`, a folder or hub id)."""

    model: str | None = None
    max_steps: int = Field(default=100, gt=0)
    save_steps: int = Field(default=50, gt=0)
    seq_len: int = Field(default=2048, gt=0)


class EvalConfig(StrictModel):
    """Which models to check, and how."""

    models: list[str] | None = None


class RunConfig(StrictModel):
    """One run: where it writes, and one section per stage."""

    run_dir: Path
    seed: int = 0
    surgery: SurgeryConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage


def section_fingerprint(section: BaseModel | None) -> str:
    """A stable hash of a config section, so a manifest can tell whether its stage is stale."""
    payload = json.dumps(section.model_dump(mode="json") if section else None, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (so 3 is an int)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: expected dotted.key=value, for example train.max_steps=10")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}{extra}; check its spelling against configs/smoke.yaml"
    return f"{source}: {key}: {first['msg']} (got {first.get('input')!r}){extra}; fix the value"


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config (YAML) and apply `--set` overrides; every problem is a one-line UserError."""
    raw: dict[str, Any] = {}
    source = "--set"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found; pass an existing YAML file, e.g. configs/smoke.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return validate_config(raw, source)
