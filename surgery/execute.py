"""Carry out a plan: stream each output tensor from its sources into the shards, then the config files.

One output tensor exists at a time (plus the base tensor and donor region it is built from), so peak memory
is set by the largest tensor, never by the shard size or the depth. Everything is written into a temporary
sibling of the output folder, manifest.json last, and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from pipeline.checkpoint import CheckpointReader, ShardedWriter
from pipeline.errors import UserError
from pipeline.models import TOKENIZER_FILES
from pipeline.runs import atomic_output_dir, write_manifest
from surgery import blocks
from surgery.plan import SurgeryPlan, TensorPlan
from surgery.random_donor import random_block, random_norm_entries

if TYPE_CHECKING:
    from surgery.aligned_donor import AlignedDonorReader

log = logging.getLogger(__name__)

# Room for config, tokenizer and index files on top of the tensor bytes.
DISK_MARGIN_BYTES = 64 * 2**20
# write() failures that mean "no room": a full disk, a file-size limit (ulimit -f), a quota.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def free_disk_bytes(out: Path) -> int:
    """Free space on the file system that will hold `out` (its nearest existing ancestor)."""
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_disk(plan: SurgeryPlan, out: Path) -> None:
    need, free = plan.bytes_to_write + DISK_MARGIN_BYTES, free_disk_bytes(out)
    if free < need:
        raise UserError(
            f"not enough free disk for {out}: the plan writes {need / 1e9:.2f} GB and only {free / 1e9:.2f} GB "
            "is free there; free some space, choose another --out, or a smaller --dtype"
        )


class TensorBuilder:
    """Builds each planned tensor from the base and donor readers; counts the bytes it reads."""

    def __init__(self, plan: SurgeryPlan, base: CheckpointReader, donor: CheckpointReader | None):
        self.plan, self.base, self.donor = plan, base, donor
        self.bytes_read = 0
        # One buffer the size of the largest output tensor, reused for every linear and vocabulary matrix: the
        # writer has copied a tensor's bytes out before the next one is built.
        largest = max(math.prod(t.shape) for t in plan.tensors)
        self._scratch = torch.empty(largest, dtype=plan.torch_dtype)

    def _into(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._scratch[: math.prod(shape)].view(shape)

    def _read_base(self, name: str) -> torch.Tensor:
        tensor = self.base.get(name)
        self.bytes_read += tensor.nbytes
        return tensor

    def _read_donor(self, entry: TensorPlan, base: torch.Tensor | None) -> torch.Tensor | None:
        if entry.donor_region is None:
            return None
        if self.donor is None:
            shape = tuple(stop - start for start, stop in entry.donor_region)
            if entry.rule == "norm":
                return random_norm_entries(shape[0])
            std = base.to(torch.float32).std().item()
            return random_block(entry.seed_name, shape, std, self.plan.seed)
        block = self.donor.get_region(entry.donor_source, entry.donor_region)
        self.bytes_read += block.nbytes
        # The donor is the foreign part of the graft; one reduction spots a NaN or inf anywhere in the block.
        if block.numel() and not torch.isfinite(block.sum()) and not torch.isfinite(block).all():
            raise UserError(f"donor tensor {entry.donor_source} has NaN or inf values; the donor is damaged")
        return block

    def build(self, entry: TensorPlan) -> torch.Tensor:
        base = self._read_base(entry.base_source) if entry.base_source else None
        donor = self._read_donor(entry, base)
        dtype = self.plan.torch_dtype
        if entry.rule == "linear":
            fill = blocks.FILL_MODES[self.plan.mode][entry.role]
            return blocks.widen_linear(base, entry.shape, fill, donor, dtype, into=self._into(entry.shape))
        if entry.rule == "columns":
            return blocks.widen_columns(base, entry.shape[1], donor, dtype, into=self._into(entry.shape))
        if entry.rule == "norm":
            return blocks.widen_norm(base, entry.shape[0], donor, compensate=not self.plan.legacy)
        if entry.rule == "ones":
            return blocks.legacy_final_norm(entry.shape[0])
        if entry.rule == "cut":
            return donor
        if entry.rule == "zeros":
            return self._into(entry.shape).zero_()
        raise ValueError(f"unknown rule {entry.rule!r} in the plan")


def write_config_files(plan: SurgeryPlan, folder: Path) -> None:
    """config.json: the base's, with the new widths, explicit head_dim, eps, tying and dtype; generation config
    and tokenizer files copied from the base."""
    config = dict(plan.base.config)
    config.update(plan.target.as_dict(), num_hidden_layers=plan.num_hidden_layers)
    config.pop("torch_dtype", None)  # transformers 5 reads `dtype`
    config.update(
        rms_norm_eps=plan.rms_norm_eps,
        tie_word_embeddings=plan.tie_word_embeddings,
        dtype=plan.dtype,
        architectures=["LlamaForCausalLM"],
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("generation_config.json", *TOKENIZER_FILES):
        source = plan.base.folder / name
        if source.is_file():
            shutil.copy2(source, folder / name)
    if not (folder / "generation_config.json").is_file():
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        tokens = {key: config[key] for key in keys if config.get(key) is not None}
        (folder / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **tokens}, indent=2))


def execute(plan: SurgeryPlan, out: Path, force: bool, manifest_fields: dict[str, Any],
            donor_reader: AlignedDonorReader | None = None) -> dict[str, Any]:
    """Write the widened model to `out` atomically; returns what was read and written, and how long it took.

    `donor_reader` replaces the plain reader of the donor's folder (the aligned view of surgery.align/select).
    """
    check_free_disk(plan, out)
    started = time.monotonic()
    try:
        with single_threaded_torch():
            stats = _stream(plan, out, force, manifest_fields, started, donor_reader)
    except OSError as err:
        # The free-space check passed, but the disk filled up while writing (another writer, a quota, a file-size
        # limit): the temporary folder is already gone, so this is the user's problem to fix, not a crash.
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        raise UserError(
            f"ran out of disk space writing {out} ({os.strerror(err.errno)}; the plan writes "
            f"{(plan.bytes_to_write + DISK_MARGIN_BYTES) / 1e9:.2f} GB); free some space on that disk (or lift the "
            "quota or file-size limit) or write elsewhere (--out, or run_dir in a config), then rerun; nothing was kept"
        ) from None
    log.info("wrote %s in %.1f s (read %.2f GB, wrote %.2f GB)", out, stats["seconds"],
             stats["bytes_read"] / 1e9, stats["bytes_written"] / 1e9)
    return stats


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Block copies are memory-bound: a second intra-op thread adds nothing, and on a busy machine waiting for
    it made each copy about 4x slower (measured on 2 shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stream(plan: SurgeryPlan, out: Path, force: bool, manifest_fields: dict[str, Any], started: float,
            donor_reader: AlignedDonorReader | None) -> dict:
    base_reader = CheckpointReader(plan.base.folder)
    if donor_reader is None and plan.donor is not None:
        donor_reader = CheckpointReader(plan.donor.folder)
    builder = TensorBuilder(plan, base_reader, donor_reader)
    with atomic_output_dir(out, force=force) as tmp:
        log.info("writing %d tensors (%.2f GB, %s) into %s", len(plan.tensors), plan.bytes_to_write / 1e9,
                 plan.dtype, tmp)
        writer = ShardedWriter(tmp, plan.specs(), plan.max_shard_bytes)
        for entry in tqdm(plan.tensors, desc="surgery", unit="tensor"):
            writer.write(entry.name, builder.build(entry).to(plan.torch_dtype))
        writer.close()
        write_config_files(plan, tmp)
        stats = {
            "bytes_read": builder.bytes_read,
            "bytes_written": writer.bytes_written,
            "seconds": round(time.monotonic() - started, 3),
        }
        write_manifest(tmp, "surgery", plan=plan.summary(), io=stats, **manifest_fields)
    return stats
