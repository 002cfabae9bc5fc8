"""A stand-in donor for when no wider trained model exists: seeded noise at the base's scale.

Each block is drawn from its own generator, seeded by the run seed and the tensor's name, so the values do
not depend on the order tensors are streamed in (or on which other tensors a plan happens to contain).
"""

from __future__ import annotations

import hashlib

import torch


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_block(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """N(0, std^2) values for the donor region of `name`; std is the matching base tensor's."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std)


def random_norm_entries(width: int) -> torch.Tensor:
    """New norm gains of 1: neutral, and unlike 0 they let gradient through."""
    return torch.ones(width, dtype=torch.float32)
