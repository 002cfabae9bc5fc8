"""The donor as the surgery reads it, re-parameterised towards the base on the fly (surgery.align, surgery.select).

`fit_alignment` decides the change of the donor's residual basis (from the two embedding matrices) and, for
`select: output`, which heads and neurons go to the grafted positions (from one calibration pass through the
donor). `AlignedDonorReader` then serves every donor tensor through that transform with CheckpointReader's
interface, so the surgery opens it where it opened the donor and streams as before: a 22b graft needs no 65 GB
aligned copy of llama-30b on disk. A rotation mixes every residual coordinate, so each tensor is read whole and
multiplied (on CUDA when there is one); a permutation only re-indexes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.checkpoint import CheckpointReader
from pipeline.errors import UserError
from surgery.alignment import (
    IdentityResidual,
    ResidualTransform,
    Rotation,
    fit_permutation,
    fit_rotation,
    head_output_energy,
    head_rows,
    neuron_output_energy,
    place_chosen_units,
    query_heads,
    relative_residual,
)
from surgery.blocks import norm_compensation
from surgery.calibration import calibration_ids, layer_passes
from surgery.plan import EMBED, FINAL_NORM, LAYER_NORMS, LINEARS, LM_HEAD, SurgeryPlan, layer_prefix
from surgery.shapes import ModelShape, Widths, read_model_shape
from surgery.streamed_llama import StreamedLlama, compute_device

log = logging.getLogger(__name__)

# Which norm's gain multiplies each reader's input: what a rotation folds into the reader.
READER_GAINS = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
}


def check_alignment_settings(random_donor: bool, legacy: bool, align: str, select: str) -> None:
    """Refuse alignment where there is nothing to align or where it would change what is being reproduced."""
    if align == "none" and select == "index":
        return
    flags = " and ".join(flag for flag, on in (("--align", align != "none"), ("--select", select != "index")) if on)
    if random_donor:
        raise UserError(f"{flags}: a random donor has no trained basis or units to align; pass a trained --donor "
                        f"or drop {flags}")
    if legacy:
        raise UserError(f"--legacy reproduces the 2023 script, which grafted the donor as it was; drop {flags} or "
                        "--legacy")


def aligned_donor_shape(donor: ModelShape, align: str) -> ModelShape:
    """The donor as the aligned view presents it: a rotation folds the final norm into lm_head only, so tied
    embeddings come apart."""
    if align == "rotation" and donor.tie_word_embeddings:
        return dataclasses.replace(donor, tie_word_embeddings=False)
    return donor


@dataclass(frozen=True)
class UnitOrder:
    """A new order of one donor layer's units: kv groups (each with its query heads) and MLP neurons."""

    groups: torch.Tensor  # (num_key_value_heads,)
    neurons: torch.Tensor  # (intermediate_size,)

    def indices(self, suffix: str, widths: Widths) -> torch.Tensor:
        """The row order of a reader (q, k, v, gate, up) or the column order of a writer (o_proj, down_proj)."""
        if suffix in ("self_attn.k_proj", "self_attn.v_proj"):
            return head_rows(self.groups, widths.head_dim)
        if suffix in ("self_attn.q_proj", "self_attn.o_proj"):
            return head_rows(query_heads(self.groups, int(widths.heads_per_kv_group)), widths.head_dim)
        return self.neurons


@dataclass
class DonorAlignment:
    """Everything the aligned view needs, and what the manifest records about it.

    `matched_gains` (donor norm name -> d gains) re-gains the aligned donor on the base's d coordinates, exactly:
    a graft's norm holds the base's (compensated) gains there, and the donor's new units read the base's
    coordinates through them, so the aligned donor is expressed with those same gains in front of its readers
    (the readers' columns divided by them, its function unchanged). Without it, a rotated donor's readers (gains
    folded to 1) would read every base coordinate scaled by the base's gain once more.
    """

    transform: ResidualTransform
    unit_orders: dict[int, UnitOrder]  # donor layer -> its new unit order (select: output)
    report: dict[str, Any]
    matched_gains: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """The surgery streams single-threaded (its copies are memory-bound); a rotation's matmuls are not."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _parse(name: str) -> tuple[int | None, str]:
    """model.layers.7.mlp.up_proj.weight -> (7, 'mlp.up_proj'); other names -> (None, name)."""
    if name.startswith("model.layers."):
        _, _, index, rest = name.split(".", 3)
        return int(index), rest.removesuffix(".weight")
    return None, name


class AlignedDonorReader:
    """CheckpointReader's interface over the donor, serving each tensor re-parameterised by a DonorAlignment."""

    def __init__(self, donor: CheckpointReader, model: ModelShape, alignment: DonorAlignment):
        self.inner, self.model, self.alignment = donor, model, alignment
        self.folder = donor.folder
        self.tie_word_embeddings = aligned_donor_shape(model, alignment.transform.method).tie_word_embeddings
        self._threads = torch.get_num_threads()  # taken before the surgery drops to one thread

    @property
    def names(self) -> list[str]:
        names = set(self.inner.names)
        if self.model.tie_word_embeddings and not self.tie_word_embeddings:
            names.add(LM_HEAD)
        return sorted(names)

    def __contains__(self, name: str) -> bool:
        return name in self.inner or (name == LM_HEAD and self.model.tie_word_embeddings
                                      and not self.tie_word_embeddings)

    def _source(self, name: str) -> str:
        return EMBED if name == LM_HEAD and self.model.tie_word_embeddings else name

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._source(name))

    @property
    def _computes(self) -> bool:
        """Whether values change (a rotation, re-gaining): then every tensor comes back in fp32, rounded once into
        the output dtype by the caller; re-indexing alone keeps the stored dtype and the values bit for bit."""
        return self.alignment.transform.folds_gains or bool(self.alignment.matched_gains)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if self._computes else self.inner.dtype(self._source(name))

    def get(self, name: str) -> torch.Tensor:
        return self.get_region(name, [(0, size) for size in self.shape(name)])

    def _gain(self, norm: str) -> torch.Tensor | None:
        return self.inner.get(norm) if self.alignment.transform.folds_gains else None

    def _gains(self, norm: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the gain this view presents for `norm` over all d' coordinates, the factor its readers' columns take
        for it, or None when the transform's own gain is presented)."""
        own = self.alignment.transform.gain(self.inner.get(norm), slice(None))
        matched = self.alignment.matched_gains.get(norm)
        if matched is None:
            return own, None
        own = own.to(torch.float32)
        presented = own.clone()
        # a (near-)zero base gain reads nothing there anyway; dividing by it would only blow the column up
        head = presented[: matched.shape[0]]
        head.copy_(torch.where(matched.abs() > 1e-6, matched.to(torch.float32), head))
        return presented, torch.where(presented == 0, torch.ones_like(own), own / presented)

    def _read(self, weight: torch.Tensor, columns: slice, norm: str) -> torch.Tensor:
        """A reader's aligned columns: the transform's, re-gained for the gain this view presents for `norm`."""
        out = self.alignment.transform.read(weight, columns, self._gain(norm))
        _, factor = self._gains(norm)
        return out if factor is None else out * factor[columns]

    def get_region(self, name: str, region: Sequence[tuple[int, int]]) -> torch.Tensor:
        """[start, stop) along each axis of the aligned tensor; the donor tensor behind it is read whole."""
        tensor = self._aligned(name, region)
        return tensor.to(torch.float32) if self._computes else tensor

    def _aligned(self, name: str, region: Sequence[tuple[int, int]]) -> torch.Tensor:
        transform = self.alignment.transform
        rows = slice(*region[0])
        columns = slice(*region[1]) if len(region) > 1 else None
        layer, suffix = _parse(name)
        with intra_op_threads(self._threads):
            if name == EMBED:
                return transform.read(self.inner.get(EMBED)[rows], columns)
            if name == LM_HEAD:
                return self._read(self.inner.get(self._source(name))[rows], columns, FINAL_NORM)
            if name == FINAL_NORM or suffix in LAYER_NORMS:
                return self._gains(name)[0][rows]
            if suffix in LINEARS:
                weight = self.inner.get(name)
                order = self.alignment.unit_orders.get(layer)
                units = order.indices(suffix, self.model.widths) if order is not None else None
                if LINEARS[suffix][0] == "reader":
                    weight = weight[units[rows]] if units is not None else weight[rows]
                    return self._read(weight, columns, f"{layer_prefix(layer)}{READER_GAINS[suffix]}.weight")
                weight = weight[:, units[columns]] if units is not None else weight[:, columns]
                return transform.write(weight, rows)
        return self.inner.get_region(name, region)


def fit_transform(method: str, donor_embed: torch.Tensor, base_embed: torch.Tensor,
                  device: torch.device) -> ResidualTransform:
    if method == "permutation":
        return fit_permutation(donor_embed, base_embed, device)
    if method == "rotation":
        return Rotation(fit_rotation(donor_embed, base_embed, device).to(torch.float32))
    return IdentityResidual()


def fit_alignment(
    base: ModelShape, donor: ModelShape, target: Widths, align: str, select: str, donor_layers: Sequence[int],
    device: torch.device | None = None,
) -> DonorAlignment:
    """Fit the donor's residual basis to the base's embedding, and choose the units grafted from `donor_layers`.

    The grafted positions are base..target in each width: those get the donor units with the largest output on
    the calibration text under `select: output`, else the donor's units at those indices.
    """
    device = device or compute_device()
    hidden = base.widths.hidden_size
    donor_reader = CheckpointReader(donor.folder)
    base_embed, donor_embed = CheckpointReader(base.folder).get(EMBED), donor_reader.get(EMBED)
    started = time.monotonic()
    transform = fit_transform(align, donor_embed, base_embed, device)
    before = relative_residual(donor_embed[:, :hidden], base_embed)
    after = relative_residual(transform.read(donor_embed, slice(0, hidden)), base_embed)
    report: dict[str, Any] = {
        "align": align,
        "select": select,
        "device": str(device),
        "embedding_residual": {"before": before, "after": after},
    }
    if align != "none":
        log.info("embedding fit |E_donor M[:, :%d] - E_base| / |E_base|: %.4f before, %.4f after %s (%.1f s)",
                 hidden, before, after, align, time.monotonic() - started)
    del base_embed, donor_embed
    unit_orders: dict[int, UnitOrder] = {}
    if select == "output":
        unit_orders, report["units"] = select_units_by_output(donor_reader, donor, base, target, donor_layers, device)
    return DonorAlignment(transform, unit_orders, report)


def select_units_by_output(
    reader: CheckpointReader, donor: ModelShape, base: ModelShape, target: Widths, donor_layers: Sequence[int],
    device: torch.device,
) -> tuple[dict[int, UnitOrder], dict[str, dict]]:
    """Per donor layer, put the kv groups and neurons that write the most into the residual stream on the
    calibration text into the grafted positions.

    A unit's score is the summed squared norm of its write (o_proj block of a head, down_proj column of a
    neuron) over the calibration tokens, leaving out each text's first position: the attention sink's outlier
    activations there would decide every score. A kv group scores the sum of its query heads.
    """
    widths = donor.widths
    wanted = frozenset(donor_layers)
    stream = StreamedLlama(reader, donor.config, device)
    hidden = stream.embed(calibration_ids(base.folder, base.vocab_size))
    orders: dict[int, UnitOrder] = {}
    picks: dict[str, dict] = {}
    for done in layer_passes(stream, hidden, max(wanted) + 1, wanted, desc="scoring donor units"):
        if done.index not in wanted:
            continue
        index, o_proj, down_proj = done.index, done.layer.self_attn.o_proj.weight, done.layer.mlp.down_proj.weight
        heads = sum(head_output_energy(x[1:], o_proj, widths.head_dim) for x in done.heads)
        groups = heads.reshape(widths.num_key_value_heads, -1).sum(dim=1).cpu()
        neurons = sum(neuron_output_energy(a[1:], down_proj) for a in done.neurons).cpu()
        order = UnitOrder(
            place_chosen_units(groups, base.widths.num_key_value_heads, target.num_key_value_heads),
            place_chosen_units(neurons, base.widths.intermediate_size, target.intermediate_size),
        )
        orders[index] = order
        picks[str(index)] = {
            "kv_groups": _picked(order.groups, groups, base.widths.num_key_value_heads, target.num_key_value_heads),
            "neurons": _picked(order.neurons, neurons, base.widths.intermediate_size, target.intermediate_size),
        }
    for unit in ("kv_groups", "neurons"):
        shares = [pick[unit] for pick in picks.values()]
        log.info("%s grafted: %.0f%% of the donor layers' output energy on average (by index: %.0f%%)",
                 unit.replace("_", " "), 100 * sum(s["energy_share"] for s in shares) / len(shares),
                 100 * sum(s["index_energy_share"] for s in shares) / len(shares))
    return orders, picks


def _picked(order: torch.Tensor, energy: torch.Tensor, base_units: int, target_units: int) -> dict:
    """The donor units now at the grafted positions, and the share of the layer's output energy they carry,
    next to what the index choice (the donor's units base..target) would have carried."""
    total = energy.sum().clamp_min(1e-30)
    chosen = order[base_units:target_units]
    return {
        "chosen": chosen.tolist(),
        "energy_share": round((energy[chosen].sum() / total).item(), 4),
        "index_energy_share": round((energy[base_units:target_units].sum() / total).item(), 4),
    }


def graft_gains(plan: SurgeryPlan) -> dict[str, torch.Tensor]:
    """Per donor norm, the gains the graft's norm holds on the base's coordinates: the base's gains of the target
    layer that donor layer is grafted into (the first such layer, if a donor layer feeds several), compensated."""
    base = CheckpointReader(plan.base.folder)
    factor = norm_compensation(plan.base.widths.hidden_size, plan.target.hidden_size)
    gains = {FINAL_NORM: base.get(FINAL_NORM).to(torch.float32) * factor}
    for layer, donor_layer in enumerate(plan.donor_layers):
        for norm in LAYER_NORMS:
            key = f"{layer_prefix(donor_layer)}{norm}.weight"
            if key not in gains:
                gains[key] = base.get(f"{layer_prefix(layer)}{norm}.weight").to(torch.float32) * factor
    return gains


def open_aligned_donor(plan: SurgeryPlan, align: str, select: str) -> AlignedDonorReader:
    """The surgery's donor reader for `plan`, with its alignment fitted (and logged) now and, once the basis is
    aligned, its gains matched to the graft's."""
    donor = read_model_shape(plan.donor.folder, "donor")  # the stored layout (the plan's may be untied)
    alignment = fit_alignment(plan.base, donor, plan.target, align, select, sorted(set(plan.donor_layers)))
    if align != "none":
        alignment.matched_gains = graft_gains(plan)
        alignment.report["gains"] = "matched to the graft's norms on the base's coordinates"
    return AlignedDonorReader(CheckpointReader(donor.folder), donor, alignment)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul on `device` (best of three), for the plan's time estimates."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, dtype=dtype, device=device)
    best = math.inf
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def rotated_blocks(plan: SurgeryPlan) -> Counter[tuple[bool, int, int]]:
    """How many donor blocks of each (is a writer, rows, columns) the surgery will rotate."""
    blocks: Counter[tuple[bool, int, int]] = Counter()
    for t in plan.tensors:
        if t.donor_region is not None and len(t.donor_region) == 2:
            (row_start, row_stop), (column_start, column_stop) = t.donor_region
            writer = t.kind in LINEARS and LINEARS[t.kind][0] == "writer"
            blocks[writer, row_stop - row_start, column_stop - column_start] += 1
    return blocks


def rotation_seconds(blocks: Counter[tuple[bool, int, int]], width: int, device: torch.device,
                     probe: int = 512) -> float:
    """Seconds the rotations of `blocks` take: the surgery's own Rotation timed on a random slice (`probe` rows of a
    reader, columns of a writer) of each block shape, scaled to the block.

    A matmul rate would miss most of it on a GPU: there the time is each block's trip from CPU memory and back in
    fp32 (an H200 rotated a llama-30b layer at 3 TFLOP/s, benchmarks/RESULTS.md), and the work scales with the
    rows of a reader and the columns of a writer, as the slice's does.
    """
    rotation = Rotation(q=torch.randn(width, width, device=device))
    total = 0.0
    for (writer, rows, columns), count in blocks.items():
        if writer:
            part = min(columns, probe)
            weight = torch.randn(width, part, dtype=torch.bfloat16)
            run, scale = functools.partial(rotation.write, weight, slice(0, rows)), columns / part
        else:
            part = min(rows, probe)
            weight = torch.randn(part, width, dtype=torch.bfloat16)
            run, scale = functools.partial(rotation.read, weight, slice(0, columns)), rows / part
        run()  # warm-up: the first call on a device pays for its kernels' setup
        started = time.perf_counter()
        run()  # ends in .cpu(), which waits for the device
        total += (time.perf_counter() - started) * scale * count
    return total


def alignment_estimate(plan: SurgeryPlan, align: str, select: str) -> str:
    """The --dry-run lines for surgery.align / surgery.select: what will be computed, and about how long it takes."""
    device = compute_device()
    width, vocab = plan.donor.widths.hidden_size, plan.base.vocab_size
    lines = [f"align:  {align}; select: {select}"]
    if align == "permutation":
        lines.append(f"  Hungarian assignment on the {plan.base.widths.hidden_size} x {width} embedding column "
                     "correlations; the donor's tensors are only re-indexed (no matmul)")
    if align == "rotation":
        blocks = rotated_blocks(plan)
        flops = sum(2 * rows * width * cols * count for (_, rows, cols), count in blocks.items())
        seconds = rotation_seconds(blocks, width, device)
        base_width = plan.base.widths.hidden_size
        products = 2 * vocab * width * (width + base_width)  # the Gram matrix and E_donor^T E_base
        decompositions = 10 * width**3  # eigh of the Gram, SVD of the d' x d map, QR: rough, and slower per FLOP
        rate64 = matmul_rate(device, torch.float64)
        lines += [
            f"  fit: least squares on the {vocab} x {width} donor embedding, float64 on {device.type}: "
            f"{products / 1e12:.2f} TFLOP of products (~{products / rate64:.0f} s at {rate64 / 1e9:.0f} GFLOP/s, "
            f"probe matmul) + ~{decompositions / 1e12:.1f} TFLOP of decompositions (eigh, SVD, QR; these run below "
            "the matmul rate)",
            f"  rotating the {sum(blocks.values())} donor blocks the plan reads: {flops / 1e12:.2f} TFLOP in fp32 on "
            f"{device.type}, ~{seconds:.0f} s (a slice of each block shape rotated on random data, transfers "
            "included)",
        ]
    if select == "output":
        depth = max(plan.donor_layers) + 1
        per_layer = sum(math.prod(shape) for shape in _layer_shapes(plan.donor).values())
        tokens = 400  # about: the calibration texts, up to 96 tokens each
        flops = 2 * per_layer * depth * tokens
        lines.append(f"  scoring units: one calibration pass through donor layers 0..{depth - 1} "
                     f"({per_layer * depth / 1e9:.1f}B parameters read, ~{flops / 1e12:.1f} TFLOP on {device.type})")
    return "\n".join(lines)


def _layer_shapes(model: ModelShape) -> dict[str, tuple[int, int]]:
    widths = model.widths
    return {suffix: (widths.dim(out_axis), widths.dim(in_axis)) for suffix, (_, out_axis, in_axis) in LINEARS.items()}
