"""Which models a run evaluates, under which labels, and loading one of them onto a device.

Only one model is in memory at a time: the base's numbers that later models are compared with (probe
signals, preservation logits, benchmark item scores) are kept instead of the base model itself.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.placement import describe_placement, human_bytes, memory_budgets, placement_summary
from pipeline.config import RunConfig
from pipeline.errors import UserError, error_reason
from pipeline.models import resolve_model
from pipeline.runs import read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """A model to evaluate: a short label for tables, the reference as configured, and its local folder.

    `merge` is the train stage's record of how a merged export was made (its manifest's "merge": {"into":
    "base" | "dequantized_nf4", ...}), so the report can say which weights the trained model's scores belong to.
    """

    label: str
    ref: str
    path: Path
    merge: dict | None = None


def merge_record(folder: Path) -> dict | None:
    """The train stage's "merge" record when `folder` is a train stage's `merged/` export, else None."""
    if folder.name != "merged":
        return None
    manifest = read_manifest(folder.parent)
    if manifest is None or manifest.get("stage") != "train":
        return None
    merge = manifest.get("merge")
    return merge if isinstance(merge, dict) else None


def default_model_refs(config: RunConfig) -> list[str]:
    """surgery.base, the surgery output and the merged trained model, each only if its stage completed."""
    refs = [config.surgery.base] if config.surgery else []
    surgery_dir = config.stage_dir("surgery")
    train_dir = config.stage_dir("train")
    for folder, stage_folder in ((surgery_dir, surgery_dir), (train_dir / "merged", train_dir)):
        if not stage_folder.exists():
            continue
        if read_manifest(stage_folder) is None:
            log.warning("not evaluating %s: its stage has no complete manifest (it did not finish)", folder)
        elif not (folder / "config.json").is_file():
            log.warning("not evaluating %s: the stage finished but wrote no model folder there", folder)
        else:
            refs.append(str(folder))
    return refs


def _label(ref: str, config: RunConfig, base_ref: str) -> str:
    if ref == base_ref:
        return "base"
    path = Path(ref).expanduser().resolve()
    if path == config.stage_dir("surgery").resolve():
        return "surgery"
    if path == (config.stage_dir("train") / "merged").resolve():
        return "trained"
    return Path(ref).name or ref


def models_to_evaluate(config: RunConfig) -> list[ModelEntry]:
    """The base first (every comparison needs its numbers), then the others in configured order."""
    refs = list(config.eval.models) if config.eval.models else default_model_refs(config)
    base_ref = config.eval.base or (config.surgery.base if config.surgery else (refs[0] if refs else None))
    if base_ref is None:
        raise UserError("nothing to evaluate: set eval.models (model folders or hub ids) or a surgery section")
    refs = [base_ref] + [ref for ref in refs if ref != base_ref]
    entries: list[ModelEntry] = []
    for ref in refs:
        label = _label(ref, config, base_ref)
        while label in {e.label for e in entries}:
            label += "'"
        path = resolve_model(ref)
        entries.append(ModelEntry(label, ref, path, merge_record(path)))
    return entries


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("eval.device is cuda but no CUDA device is visible; set eval.device=auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_tokenizer(folder: Path, fallback: Path | None = None):
    """The model's own tokenizer; a widened model without tokenizer files shares its base's vocabulary."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        if fallback is None:
            raise UserError(f"{folder} has no tokenizer files; copy the base model's tokenizer into it") from None
        log.warning("%s has no tokenizer files; using the base's tokenizer from %s", folder, fallback)
        return AutoTokenizer.from_pretrained(fallback)


def load_model(entry: ModelEntry, device: torch.device, dtype: torch.dtype, activations: int, streamed: bool = False):
    """The causal LM in eval mode, in `dtype`, placed by accelerate within eval's memory budgets, which keep
    `activations` bytes (the largest forward's, Precision.activations) free on the GPU.

    Its config's KV cache is switched off: every scoring forward (lm-eval's `_model_call` among them) would
    otherwise build one and keep every layer's keys and values alive to the end of the forward (~10 GiB more at
    40 layers x 8 contexts of 1300 tokens); the probe's `generate` asks for a cache itself. `streamed` says the
    caller expects layers on disk (one forward over them), so that is not worth a warning.
    """
    from transformers import AutoModelForCausalLM

    budgets = memory_budgets(device, activations)
    log.info("loading %s (%s) in %s on %s", entry.label, entry.path, str(dtype).removeprefix("torch."), device)
    try:
        model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=dtype, device_map="auto", max_memory=budgets)
    except OSError as err:
        raise UserError(f"cannot load {entry.path} as a causal LM ({error_reason(err)})") from None
    model.config.use_cache = False
    summary = placement_summary(model)
    where = describe_placement(summary, model.config.num_hidden_layers)
    if "disk" in summary and not streamed:
        off_gpu = sum(place.bytes for key, place in summary.items() if key in ("cpu", "disk"))
        log.warning("%s: %s. Layers on disk are read back from the checkpoint files at every forward, which is very "
                    "slow; to avoid it, free CPU RAM (the layers off the GPU need about %s: close other programs) "
                    "or use a box with more RAM%s", entry.label, where, human_bytes(off_gpu),
                    ", or set eval.dtype=auto to halve the weights" if dtype == torch.float32 else "")
    else:
        log.info("%s: %s", entry.label, where)
    return model.eval()


def free_memory() -> None:
    """Return a dropped model's memory before the next one loads (the caller drops its reference first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
