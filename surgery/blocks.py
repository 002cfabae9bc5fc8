"""The block-matrix rules of widening, as pure functions of tensors (no files, no configs).

An HF `nn.Linear` stores W as (out, in). The widened weight is

    W' = [[ M , 0 ],     rows 0..out   : the base's outputs, which must never read the new inputs
          [ A , B ]]     rows out..out': the new units, filled according to the fill mode

The top-right block is 0 in every mode: that is what keeps the base's own outputs unchanged. The linear and
vocabulary rules only copy values, so they build the result directly in the output dtype (one rounding, as a
final cast would give); the norm rule multiplies, so it works in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Role = Literal["reader", "writer"]


@dataclass(frozen=True)
class BlockFill:
    """Which of the new rows' blocks take the donor's values (True) rather than 0."""

    a: bool  # new rows x base inputs
    b: bool  # new rows x new inputs


# The fill-mode table of design/surgery.md. Readers take the residual stream as input (q, k, v, gate, up,
# lm_head); writers write into it (o_proj, down_proj). `readers` zeroes the writers' new rows so the new
# residual dims stay exactly 0 while the new heads and neurons still compute from the base's features.
FILL_MODES: dict[str, dict[Role, BlockFill]] = {
    "zero": {"reader": BlockFill(a=False, b=False), "writer": BlockFill(a=False, b=False)},
    "block_diagonal": {"reader": BlockFill(a=False, b=True), "writer": BlockFill(a=False, b=True)},
    "block_triangular": {"reader": BlockFill(a=True, b=True), "writer": BlockFill(a=True, b=True)},
    "readers": {"reader": BlockFill(a=True, b=True), "writer": BlockFill(a=False, b=False)},
}

# block_triangular lets new heads read base features and write into the new residual dims, which then
# change every RMS: it cannot reproduce the base.
EXACT_MODES = frozenset({"zero", "block_diagonal", "readers"})

# The 2023 script knew only these two fills.
LEGACY_MODES = frozenset({"block_diagonal", "block_triangular"})


def _buffer(into: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Where a result is built: `into` when given, else fresh memory.

    Not zeroed, because every block is written exactly once. Streaming callers pass one reused buffer: a fresh
    allocation of a large tensor is page-faulted (and zeroed by the kernel) page by page every time, which
    costs more than building the tensor.
    """
    if into is None:
        return torch.empty(shape, dtype=dtype)
    if tuple(into.shape) != tuple(shape) or into.dtype != dtype:
        raise ValueError(f"buffer is {tuple(into.shape)} {into.dtype}, the result needs {tuple(shape)} {dtype}")
    return into


def widen_linear(
    base: torch.Tensor,
    new_shape: tuple[int, int],
    fill: BlockFill,
    donor_rows: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """[[M, 0], [A, B]] for one linear weight.

    donor_rows are the donor's rows out..out' over its first in' columns, shape (out' - out, in'); they may be
    None when the fill takes nothing from the donor. `into` is an optional buffer of the result's shape and
    dtype to build in (see _buffer below).
    """
    out, inp = base.shape
    new_out, new_in = new_shape
    widened = _buffer(into, new_shape, dtype)
    widened[:out, :inp] = base
    widened[:out, inp:] = 0
    if new_out == out:
        return widened
    if (fill.a or fill.b) and (donor_rows is None or tuple(donor_rows.shape) != (new_out - out, new_in)):
        got = None if donor_rows is None else tuple(donor_rows.shape)
        raise ValueError(f"donor rows must have shape {(new_out - out, new_in)}, got {got}")
    widened[out:, :inp] = donor_rows[:, :inp] if fill.a else 0
    widened[out:, inp:] = donor_rows[:, inp:] if fill.b else 0
    return widened


def widen_columns(
    base: torch.Tensor,
    new_width: int,
    donor_columns: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """embed_tokens / lm_head: same rows (the vocabulary), new columns from the donor or 0.

    embed_tokens' new columns must be 0 (they are residual dims the exact modes keep at 0); lm_head's new
    columns may be the donor's, since they read dims that stay 0 and so leave the logits unchanged.
    """
    rows, width = base.shape
    widened = _buffer(into, (rows, new_width), dtype)
    widened[:, :width] = base
    widened[:, width:] = donor_columns if donor_columns is not None else 0
    return widened


def norm_compensation(width: int, new_width: int) -> float:
    """The factor sqrt(d/d') on the base's norm gains.

    RMSNorm divides by sqrt(mean(x^2)) over the full width. With the new dims at 0 the mean is taken over d'
    instead of d, so every normalised vector grows by sqrt(d'/d); scaling the base's gains by sqrt(d/d')
    (and eps by d/d') undoes it exactly.
    """
    return math.sqrt(width / new_width)


def widen_norm(
    base: torch.Tensor, new_width: int, donor_entries: torch.Tensor, compensate: bool = True
) -> torch.Tensor:
    """An RMSNorm weight: the base's gains (compensated) followed by the donor's entries for the new dims.

    The new entries must not be 0: a zero gain blocks every gradient into the new dims.
    """
    width = base.shape[0]
    widened = torch.empty(new_width, dtype=torch.float32)
    gains = base.to(torch.float32)
    widened[:width] = gains * norm_compensation(width, new_width) if compensate else gains
    widened[width:] = donor_entries
    return widened


def widened_rms_norm_eps(eps: float, width: int, new_width: int) -> float:
    """eps * d/d': inside the square root it sits next to mean(x^2), which shrinks by d/d'."""
    return eps * width / new_width


def legacy_final_norm(new_width: int) -> torch.Tensor:
    """The 2023 script never wrote model.norm, so it kept its initial value: all ones."""
    return torch.ones(new_width, dtype=torch.float32)
