"""Streaming safetensors I/O: read one tensor at a time, write shards tensor by tensor.

The reader is an index of which tensor lives in which shard plus `safe_open` on demand. The writer is given
the whole output plan (names, dtypes, shapes) up front, so it can lay out every shard header before any
tensor is computed and then append each tensor's bytes as it arrives: peak memory is one tensor, whatever
the shard size or the layer count. Which tensors share a shard is huggingface_hub's split (save_pretrained's);
the header-first streaming is what the library does not offer (its writers take tensors that already exist).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open

from pipeline.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
WRITE_CHUNK = 64 * 2**20
SINGLE_NAME = "model.safetensors"

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


def _torch_dtype(code: str, where: str) -> torch.dtype:
    if code not in _TORCH_DTYPES:
        raise UserError(f"{where} has dtype {code}, which frankenllama does not handle")
    return _TORCH_DTYPES[code]


class TensorIndex(Protocol):
    """What planning needs of a checkpoint: its tensors' names, shapes and dtypes, never their values."""

    @property
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...


class HeaderIndex:
    """A TensorIndex from safetensors headers alone (say, read remotely from the hub), without the weights."""

    def __init__(self, source: str, entries: Mapping[str, tuple[str, Sequence[int]]]):
        """entries: tensor name -> (safetensors dtype code such as "BF16", shape)."""
        self.source = source
        self._entries = {name: (code, tuple(shape)) for name, (code, shape) in entries.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name not in self._entries:
            raise UserError(f"{self.source}: tensor {name} is missing; the checkpoint is incomplete")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self._entry(name)[0], f"{self.source}: tensor {name}")


class CheckpointReader:
    """Read tensors of a HF safetensors checkpoint folder one at a time (a TensorIndex that also reads values)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files = self._locate_shards()
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._tensor_file: dict[str, Path] = {}
        for file in sorted(set(self._files.values()) if self._files else []):
            handle = self._open(file)
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                self._tensor_file[name] = file
        self._check_index_matches()

    def _locate_shards(self) -> dict[str, Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{index} is not a valid safetensors index ({err}); re-download the model") from None
            return {name: self.folder / file for name, file in weight_map.items()}
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return {"*": single}
        if list(self.folder.glob("*.bin")) or list(self.folder.glob("*.pt")):
            raise UserError(
                f"{self.folder} holds only pickle weights (.bin); frankenllama never unpickles untrusted files. "
                "Convert once with: python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{self.folder}').save_pretrained('OUT', safe_serialization=True)\""
            )
        raise UserError(f"{self.folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})")

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise UserError(f"shard {file} named in {INDEX_NAME} is missing; re-download the model")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors raises its own error types for torn headers
                raise UserError(f"{file} is truncated or corrupt ({err}); re-download or re-create it") from None
        return self._handles[file]

    def _check_index_matches(self) -> None:
        if "*" in self._files:
            return
        missing = sorted(set(self._files) - set(self._tensor_file))
        if missing:
            raise UserError(f"{self.folder}: index lists {missing[0]} but no shard holds it; re-download the model")

    @property
    def names(self) -> list[str]:
        return sorted(self._tensor_file)

    def __contains__(self, name: str) -> bool:
        return name in self._tensor_file

    def _slice(self, name: str):
        if name not in self._tensor_file:
            raise UserError(f"{self.folder}: tensor {name} is missing; the checkpoint is incomplete")
        return self._open(self._tensor_file[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, read from the header (no data loaded), so a writer can be planned up front."""
        return _torch_dtype(self._slice(name).get_dtype(), f"{self.folder}: tensor {name}")

    def _header(self, file: Path) -> tuple[int, dict]:
        """(offset of the data section, the header's tensor entries) of one shard, parsed once."""
        if file not in self._headers:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                self._headers[file] = (8 + length, json.loads(handle.read(length)))
        return self._headers[file]

    def _byte_range(self, name: str, region: Sequence[tuple[int, int]] | None) -> tuple[int, int, tuple] | None:
        """(start, stop, shape) in the file when the wanted part is one contiguous run of bytes, else None.

        A whole tensor is, and so is any block of leading-axis rows that spans every other axis in full
        (a donor's new rows, when the target takes all its columns).
        """
        data_start, entries = self._header(self._tensor_file[name])
        entry = entries[name]
        shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
        if region is None:
            return data_start + begin, data_start + end, shape
        if any(tuple(axis) != (0, size) for axis, size in zip(region[1:], shape[1:], strict=True)):
            return None
        first, last = region[0]
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        return (data_start + begin + first * row_bytes, data_start + begin + last * row_bytes,
                (last - first, *shape[1:]))

    def _read(self, name: str, region: Sequence[tuple[int, int]] | None) -> torch.Tensor:
        """Read with plain sequential file reads where the bytes are contiguous, else through safe_open.

        Not through a long-lived safe_open mapping: pages copied out of a mapping that stays open remain
        resident and count towards the process's RSS, so memory would grow with every byte read; and on a cold
        page cache, large sequential reads get the kernel's readahead where page faults do not.
        """
        if name not in self._tensor_file:
            raise UserError(f"{self.folder}: tensor {name} is missing; the checkpoint is incomplete")
        file = self._tensor_file[name]
        try:
            span = self._byte_range(name, region)
            if span is None:
                with safe_open(str(file), framework="pt") as handle:
                    return handle.get_slice(name)[tuple(slice(start, stop) for start, stop in region)]
            start, stop, shape = span
            dtype = _TORCH_DTYPES[self._header(file)[1][name]["dtype"]]
            tensor = torch.empty(shape, dtype=dtype)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
            with open(file, "rb", buffering=0) as handle:
                handle.seek(start)
                filled = 0
                while filled < stop - start:
                    count = handle.readinto(view[filled:])
                    if not count:
                        raise OSError(f"file ends {stop - start - filled} bytes early")
                    filled += count
            return tensor
        except Exception as err:
            raise UserError(f"{file}: cannot read {name} ({err}); the file is truncated or corrupt") from None

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor; a torn data section surfaces here as a one-line error."""
        return self._read(name, None)

    def get_region(self, name: str, region: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Load only [start, stop) along each axis (say, a donor's new rows), never the rest of the tensor."""
        return self._read(name, region)

    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in set(self._tensor_file.values()))


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor as the writer needs to know it before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def assign_shards(specs: Sequence[TensorSpec], max_shard_size: int | str) -> list[list[TensorSpec]]:
    """Group planned tensors into shards by huggingface_hub's split, the one transformers' save_pretrained uses: in
    order, a new shard when the next tensor would take the current one past `max_shard_size` (bytes, or "5GB"); a
    tensor larger than that gets a shard of its own, numbered before the shard still being filled."""
    planned = {spec.name: spec for spec in specs}
    split = split_state_dict_into_shards_factory(planned, get_storage_size=lambda spec: spec.nbytes,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    return [[planned[name] for name in names] for names in split.filename_to_tensors.values()]


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file holding `specs` in order: all a file needs before
    its data section, which a writer then appends tensor by tensor."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format asks for an 8-byte-aligned data section
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedWriter:
    """Write a planned set of tensors into HF-style shards, one tensor at a time, in plan order.

    Each shard's file is opened (its header written) when its first tensor arrives and closed after its last, so a
    tensor with a shard of its own (larger than the limit) may come while another shard is still being filled.
    """

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], max_shard_size: int | str):
        self.folder = Path(folder)
        self.shards = assign_shards(specs, max_shard_size)
        count = len(self.shards)
        # always numbered, even one shard (which save_pretrained would call model.safetensors), with an index
        self.shard_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._order = list(specs)
        self._shard_of = {spec.name: i for i, shard in enumerate(self.shards) for spec in shard}
        self._unwritten = [len(shard) for shard in self.shards]
        self._files: dict[int, Any] = {}
        self._next = 0
        self.bytes_written = 0

    def _open_shard(self, index: int) -> None:
        file = open(self.folder / self.shard_names[index], "wb", buffering=0)  # noqa: SIM115 (closed in write/close)
        self._files[index] = file
        self._write_all(file, memoryview(safetensors_header(self.shards[index], {"format": "pt"})))

    @staticmethod
    def _write_all(file, data: memoryview) -> None:
        """Unbuffered writes of at most 64 MiB: no extra copy through a Python buffer (the buffered path was
        about 2x slower for multi-GB shards); a raw write may take fewer bytes than offered, hence the loop."""
        done = 0
        while done < len(data):
            done += file.write(data[done : done + WRITE_CHUNK])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan; its name, dtype and shape must match the plan exactly."""
        spec = self._order[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"writer expected {spec.name} {spec.shape} {spec.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        shard = self._shard_of[name]
        if shard not in self._files:
            self._open_shard(shard)
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._write_all(self._files[shard], data)
        self.bytes_written += len(data)
        self._next += 1
        self._unwritten[shard] -= 1
        if not self._unwritten[shard]:
            file = self._files.pop(shard)
            if self._next == len(self._order):  # the last shard finished: on disk before the index and manifest
                file.flush()
                os.fsync(file.fileno())
            file.close()

    def close(self) -> None:
        """Write the index once every shard is complete; refuses if the plan was not fully written."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        total = sum(spec.nbytes for spec in self._order)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {spec.name: self.shard_names[self._shard_of[spec.name]] for spec in self._order},
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
