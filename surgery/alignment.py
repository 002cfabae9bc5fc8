"""Exact re-parameterisations of a donor, as pure functions of tensors: a new residual basis, and a new unit order.

A Llama computes the same function in any basis of its residual stream, as long as everything that writes the
stream and everything that reads it change together. Write the change of basis as x -> x M (M is d' x d'):
embed_tokens E <- E M, every reader (q, k, v, gate, up, lm_head) W <- W M, every writer (o_proj, down_proj)
W <- M^T W. The RMSNorms between them decide which M are allowed:

- a signed permutation: a gain is per coordinate, and RMS ignores both the order and the sign of coordinates, so
  the gains are simply permuted with their coordinates. No folding, no matmul.
- an orthogonal matrix: RMS(x Q) = RMS(x), but a gain vector does not commute with Q, so every gain is first
  folded into the linears it feeds (W <- W diag(g), g <- 1). This is SliceGPT's invariance without its
  mean-centring, which is wrong for RMSNorm (it normalises by the RMS, not the standard deviation).

Within one layer, heads and MLP neurons can be reordered too: a kv group's q/k/v row blocks with its query heads'
o_proj column blocks, a gate/up row with its down_proj column. Coordinates inside a q/k head never move: RoPE
rotates fixed pairs of them (rotate_half pairs i and i + head_dim/2).

What recovers a planted basis (see ../shared/design/surgery.md): a Hungarian assignment on the column
correlations of the two embedding matrices for a permutation; for a rotation, least squares E_donor T = E_base
followed by the nearest matrix with orthonormal columns. Orthogonal Procrustes on the tall d' x d map maximises a
trace instead of fitting, and misses even a planted rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class ResidualTransform(Protocol):
    """A change of the donor's residual basis, x -> x M, applied matrix by matrix."""

    method: str
    folds_gains: bool  # True: read() takes the gain of the norm feeding the matrix, and gains become 1

    def read(self, weight: torch.Tensor, columns: slice, gain: torch.Tensor | None = None) -> torch.Tensor:
        """(W diag(gain) M)[:, columns] for a matrix that reads the stream, W of shape (rows, d')."""
        ...

    def write(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        """(M^T W)[rows] for a matrix that writes the stream, W of shape (d', columns)."""
        ...

    def gain(self, gain: torch.Tensor, rows: slice) -> torch.Tensor:
        """The aligned donor's RMSNorm gain over `rows` of its coordinates."""
        ...

    def stream(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d') of the donor in the aligned basis: x M."""
        ...


@dataclass(frozen=True)
class IdentityResidual:
    """No change of basis: used when only the heads and neurons are reordered."""

    method: str = "none"
    folds_gains: bool = False

    def read(self, weight: torch.Tensor, columns: slice, gain: torch.Tensor | None = None) -> torch.Tensor:
        return weight[:, columns]

    def write(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        return weight[rows]

    def gain(self, gain: torch.Tensor, rows: slice) -> torch.Tensor:
        return gain[rows]

    def stream(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@dataclass(frozen=True)
class SignedPermutation:
    """Aligned coordinate j is the donor's coordinate order[j], negated where signs[j] is -1.

    Only indexing and sign flips: values keep their dtype and come out bit-exact.
    """

    order: torch.Tensor  # (d',) int64
    signs: torch.Tensor  # (d',) float32, each +1 or -1
    method: str = "permutation"
    folds_gains: bool = False

    def read(self, weight: torch.Tensor, columns: slice, gain: torch.Tensor | None = None) -> torch.Tensor:
        return weight[:, self.order[columns]] * self.signs[columns].to(weight.dtype)

    def write(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        return weight[self.order[rows]] * self.signs[rows].to(weight.dtype)[:, None]

    def gain(self, gain: torch.Tensor, rows: slice) -> torch.Tensor:
        return gain[self.order[rows]]

    def stream(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[..., self.order] * self.signs.to(hidden.dtype)


@dataclass(frozen=True)
class Rotation:
    """x -> x Q with Q orthogonal (d' x d'), norm gains folded into the linears they feed.

    Computed in fp32 on Q's device (CUDA when there is one: a whole llama-30b layer is ~7 TFLOP); results come
    back to the CPU in fp32, so the caller rounds once, into the output dtype.
    """

    q: torch.Tensor  # (d', d') float32, on the device the products run on
    method: str = "rotation"
    folds_gains: bool = True

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.q.device, torch.float32)

    def read(self, weight: torch.Tensor, columns: slice, gain: torch.Tensor | None = None) -> torch.Tensor:
        weight = self._on_device(weight)
        if gain is not None:
            weight = weight * self._on_device(gain)
        return (weight @ self.q[:, columns]).cpu()

    def write(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        return (self.q[:, rows].T @ self._on_device(weight)).cpu()

    def gain(self, gain: torch.Tensor, rows: slice) -> torch.Tensor:
        return torch.ones_like(gain[rows], dtype=torch.float32)

    def stream(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self._on_device(hidden) @ self.q).to(hidden.device)


def _standardised_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Columns with mean 0 and norm 1 (a constant column stays 0), so their dot products are correlations."""
    centred = matrix.to(torch.float32) - matrix.to(torch.float32).mean(dim=0)
    return centred / centred.norm(dim=0).clamp_min(1e-12)


def column_correlations(donor_embed: torch.Tensor, base_embed: torch.Tensor) -> torch.Tensor:
    """(d, d') Pearson correlations between each base coordinate and each donor coordinate over the vocabulary."""
    return _standardised_columns(base_embed).T @ _standardised_columns(donor_embed)


def fit_permutation(donor_embed: torch.Tensor, base_embed: torch.Tensor,
                    device: torch.device | None = None) -> SignedPermutation:
    """The signed permutation whose first d coordinates best match the base's, by a Hungarian assignment.

    Each base coordinate gets its own donor coordinate, maximising the summed |correlation|; a negative
    correlation flips that coordinate's sign (also exact). The unmatched donor coordinates follow in index order.
    The correlations (a 2 TFLOP product at llama-30b's embedding) are computed on `device`, the assignment on the
    CPU.
    """
    from scipy.optimize import linear_sum_assignment

    device = device or donor_embed.device
    correlations = column_correlations(donor_embed.to(device), base_embed.to(device)).cpu()
    # with no more rows than columns, every base coordinate (row) is assigned, and the rows come back in order
    _, donor_columns = linear_sum_assignment(correlations.abs().double().numpy(), maximize=True)
    matched = torch.as_tensor(donor_columns, dtype=torch.int64)
    unmatched = torch.ones(donor_embed.shape[1], dtype=torch.bool)
    unmatched[matched] = False
    order = torch.cat([matched, unmatched.nonzero().flatten()])
    signs = torch.ones(order.shape[0], dtype=torch.float32)
    signs[: matched.shape[0]] = torch.where(correlations[torch.arange(matched.shape[0]), matched] < 0, -1.0, 1.0)
    return SignedPermutation(order, signs)


def fit_rotation(donor_embed: torch.Tensor, base_embed: torch.Tensor,
                 device: torch.device | None = None) -> torch.Tensor:
    """An orthogonal Q (d' x d', float64) whose first d columns best map the donor's embedding onto the base's.

    Least squares E_donor T = E_base (T is d' x d), then the nearest matrix with orthonormal columns (U V^T of T's
    SVD). The remaining d' - d columns span the orthogonal complement, ordered by how much of the donor's
    embedding lies along each (its principal directions there), so a target narrower than the donor keeps the
    donor's strongest directions of its own.

    The least squares goes through the eigendecomposition of the donor's Gram matrix in float64 (matrix products,
    fast on any device; llama-30b's embedding is ~5 TFLOP), so directions no stronger than the embedding's storage
    rounding can be left out (the minimum-norm solution): the noise in them, divided by their tiny singular values,
    would swamp the map, as it does for a donor whose extra dims are empty.
    """
    device = device or donor_embed.device
    floor = rounding_floor(donor_embed, torch.finfo(donor_embed.dtype).eps)
    donor, base = donor_embed.to(device, torch.float64), base_embed.to(device, torch.float64)
    gram = donor.T @ donor
    strength, directions = torch.linalg.eigh(gram)  # eigenvalues: the squared singular values of the embedding
    # a float64 Gram matrix resolves singular values down to about sqrt(eps64) ~ 1.5e-8 of the largest, not below
    floor = max(floor, 1e-7 * strength.max().clamp_min(0).sqrt().item())
    inverse = torch.where(strength > floor**2, 1 / strength.clamp_min(1e-300), torch.zeros_like(strength))
    fit = directions @ (inverse[:, None] * (directions.T @ (donor.T @ base)))
    del donor, base
    left, _, right = torch.linalg.svd(fit, full_matrices=False)
    basis = left @ right
    width, kept = basis.shape
    if kept == width:
        return basis
    complement = torch.linalg.qr(basis, mode="complete").Q[:, kept:]
    _, principal = torch.linalg.eigh(complement.T @ gram @ complement)
    complement = complement @ principal.flip(1)
    # eigenvectors have no sign of their own: make each column's largest entry positive, for reproducibility
    peak = complement.abs().argmax(dim=0)
    complement = complement * torch.sign(complement[peak, torch.arange(complement.shape[1], device=device)])
    return torch.cat([basis, complement], dim=1)


def rounding_floor(matrix: torch.Tensor, eps: float) -> float:
    """The singular value below which a direction of `matrix` is indistinguishable from rounding noise.

    An error of one ulp (eps x rms(entry)) in every entry is noise of spectral norm about eps x rms x (sqrt(rows) +
    sqrt(columns)) (an iid matrix's); weights that were computed, not just stored, carry several times that, so
    the floor is ten times it. On SmolLM2's embedding, even with bf16's eps, the floor is half the smallest
    singular value.
    """
    rows, columns = matrix.shape
    rms = matrix.to(torch.float64).pow(2).mean().sqrt().item()
    return 10 * eps * rms * (rows**0.5 + columns**0.5)


def relative_residual(fitted: torch.Tensor, target: torch.Tensor) -> float:
    """|fitted - target| / |target| (Frobenius): 0 is a perfect fit, about 1.41 for unrelated matrices of equal size."""
    fitted, target = fitted.double(), target.double()
    return ((fitted - target).norm() / target.norm().clamp_min(1e-300)).item()


def coordinate_correlation(base_hidden: torch.Tensor, donor_hidden: torch.Tensor) -> float:
    """Mean over the base's d coordinates of the Pearson correlation, across tokens, of base and donor values.

    1 means the donor's first d coordinates carry the base's features; about 0 means they are unrelated.
    """
    width = base_hidden.shape[-1]
    base = _standardised_columns(base_hidden.reshape(-1, width))
    donor = _standardised_columns(donor_hidden.reshape(-1, donor_hidden.shape[-1])[:, :width])
    return (base * donor).sum(dim=0).mean().item()


def place_chosen_units(scores: torch.Tensor, base_units: int, target_units: int) -> torch.Tensor:
    """A new order of a donor layer's units that puts the best-scoring ones in the grafted positions.

    The surgery grafts the units at positions base_units..target_units; they get the target_units - base_units
    highest scores, best first (so a graft narrower than this order still takes the best), and the other units
    fill the positions around them in index order. Ties go to the lower index.
    """
    count = target_units - base_units
    ranked = torch.argsort(scores, descending=True, stable=True)
    chosen = ranked[:count]
    rest = ranked[count:].sort().values
    return torch.cat([rest[:base_units], chosen, rest[base_units:]])


def head_rows(head_order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of q/k/v (or column indices of o_proj) that move whole heads: a head's head_dim rows stay
    together and in order, so RoPE's rotation pairs inside each head are untouched."""
    return (head_order[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def query_heads(group_order: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """The query-head order that follows a kv-group order: HF maps query head i to kv head i // heads_per_group."""
    return (group_order[:, None] * heads_per_group + torch.arange(heads_per_group)).reshape(-1)


def head_output_energy(head_outputs: torch.Tensor, o_proj: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per head, the summed squared norm of what it writes into the residual stream: |o_h W_o,h^T|^2 over tokens.

    head_outputs (tokens, heads * head_dim) is o_proj's input; o_proj is (d', heads * head_dim). Computed through
    each head's (head_dim x head_dim) Gram matrix, so no (tokens, heads, d') tensor is formed.
    """
    heads = o_proj.shape[1] // head_dim
    outputs = head_outputs.to(torch.float32).reshape(-1, heads, head_dim)
    blocks = o_proj.to(torch.float32).reshape(o_proj.shape[0], heads, head_dim)
    gram = torch.einsum("dhi,dhj->hij", blocks, blocks)
    return torch.einsum("thi,hij,thj->h", outputs, gram, outputs)


def neuron_output_energy(activations: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Per MLP neuron, the summed squared norm of its write into the stream: a_j^2 |W_down[:, j]|^2 over tokens."""
    return activations.to(torch.float32).pow(2).sum(dim=0) * down_proj.to(torch.float32).pow(2).sum(dim=0)
