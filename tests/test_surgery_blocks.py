"""The block-matrix rules on small matrices: each fill mode, the norm compensation, the layer maps."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import UserError
from surgery.blocks import (
    FILL_MODES,
    legacy_final_norm,
    widen_columns,
    widen_linear,
    widen_norm,
    widened_rms_norm_eps,
)
from surgery.depth import donor_layer_sources
from surgery.random_donor import random_block

M = torch.arange(1.0, 5.0).reshape(2, 2)  # base (out=2, in=2)
DONOR_ROWS = torch.arange(10.0, 18.0).reshape(2, 4)  # donor rows 2..4 over its first 4 columns
A, B = DONOR_ROWS[:, :2], DONOR_ROWS[:, 2:]
Z = torch.zeros(2, 2)


def blocks_of(widened: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return widened[:2, :2], widened[:2, 2:], widened[2:, :2], widened[2:, 2:]


@pytest.mark.parametrize(
    ("mode", "role", "expected_a", "expected_b"),
    [
        ("zero", "reader", Z, Z),
        ("zero", "writer", Z, Z),
        ("block_diagonal", "reader", Z, B),
        ("block_diagonal", "writer", Z, B),
        ("block_triangular", "reader", A, B),
        ("block_triangular", "writer", A, B),
        ("readers", "reader", A, B),
        ("readers", "writer", Z, Z),
    ],
)
def test_fill_modes_follow_the_design_table(mode, role, expected_a, expected_b):
    widened = widen_linear(M, (4, 4), FILL_MODES[mode][role], DONOR_ROWS)
    base, top_right, a, b = blocks_of(widened)
    assert widened.dtype == torch.float32
    assert torch.equal(base, M)
    assert torch.equal(top_right, Z), "the base's outputs must never read the new inputs"
    assert torch.equal(a, expected_a)
    assert torch.equal(b, expected_b)


def test_linear_that_only_gains_columns_keeps_its_rows():
    # o_proj when heads grow but the hidden size does not: no new rows, only a zero top-right block.
    widened = widen_linear(M, (2, 4), FILL_MODES["block_triangular"]["writer"], None)
    assert torch.equal(widened, torch.cat([M, Z], dim=1))


def test_linear_refuses_donor_rows_of_the_wrong_shape():
    with pytest.raises(ValueError, match="donor rows must have shape"):
        widen_linear(M, (4, 4), FILL_MODES["readers"]["reader"], DONOR_ROWS[:, :3])


def test_vocab_matrices_gain_columns_only():
    embed = widen_columns(M, 4, None)
    assert torch.equal(embed, torch.cat([M, Z], dim=1))
    head = widen_columns(M, 4, B)
    assert torch.equal(head, torch.cat([M, B], dim=1))


def test_norm_compensation_in_fp32_and_new_entries_from_the_donor():
    gains = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    widened = widen_norm(gains, 6, torch.tensor([7.0, 8.0]))
    factor = math.sqrt(4 / 6)
    assert widened.dtype == torch.float32
    assert torch.allclose(widened[:4], gains.float() * factor, rtol=0, atol=1e-7)
    assert torch.equal(widened[4:], torch.tensor([7.0, 8.0]))
    legacy = widen_norm(gains, 6, torch.tensor([7.0, 8.0]), compensate=False)
    assert torch.equal(legacy[:4], gains.float())
    assert torch.equal(legacy_final_norm(6), torch.ones(6))


def test_compensated_rms_norm_reproduces_the_base_exactly():
    """The factor sqrt(d/d') on the gains and d/d' on eps undo the wider mean when the new dims are 0."""
    torch.manual_seed(0)
    d, d_new, eps = 8, 12, 1e-3
    x = torch.randn(5, d, dtype=torch.float64)
    gains = torch.rand(d, dtype=torch.float64) + 0.5

    def rms_norm(values, weight, epsilon):
        return weight * values / torch.sqrt(values.pow(2).mean(-1, keepdim=True) + epsilon)

    padded = torch.cat([x, torch.zeros(5, d_new - d, dtype=torch.float64)], dim=1)
    widened = widen_norm(gains, d_new, torch.ones(d_new - d)).double()
    out = rms_norm(padded, widened, widened_rms_norm_eps(eps, d, d_new))
    assert torch.allclose(out[:, :d], rms_norm(x, gains, eps), rtol=1e-6, atol=0)  # fp32 gains
    assert torch.equal(out[:, d:], torch.zeros(5, d_new - d, dtype=torch.float64))
    uncompensated = rms_norm(padded, torch.cat([gains, torch.ones(d_new - d, dtype=torch.float64)]), eps)
    assert not torch.allclose(uncompensated[:, :d], rms_norm(x, gains, eps), rtol=1e-3)


def test_layer_maps():
    assert donor_layer_sources(4, 6, "index") == [0, 1, 2, 3]
    assert donor_layer_sources(40, 60, "proportional")[0] == 0
    assert donor_layer_sources(40, 60, "proportional")[-1] == 59
    assert donor_layer_sources(3, 6, "proportional") == [0, 3, 5]  # 2.5 rounds up
    assert donor_layer_sources(4, 2, "proportional") == [0, 0, 1, 1]
    assert donor_layer_sources(1, 5, "proportional") == [0]
    with pytest.raises(UserError, match="--layer-map proportional"):
        donor_layer_sources(4, 2, "index")


def test_random_donor_depends_on_name_and_seed_not_on_order():
    first = random_block("model.layers.3.mlp.up_proj.weight", (3, 5), 0.5, seed=7)
    random_block("model.layers.0.mlp.up_proj.weight", (3, 5), 0.5, seed=7)
    again = random_block("model.layers.3.mlp.up_proj.weight", (3, 5), 0.5, seed=7)
    assert torch.equal(first, again)
    assert not torch.equal(first, random_block("model.layers.3.mlp.up_proj.weight", (3, 5), 0.5, seed=8))
    assert not torch.equal(first, random_block("model.layers.4.mlp.up_proj.weight", (3, 5), 0.5, seed=7))
    big = random_block("x", (200, 200), 0.25, seed=0)
    assert abs(big.std().item() - 0.25) < 0.01
