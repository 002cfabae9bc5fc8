"""`python -m surgery align`: write the donor re-parameterised towards the base, and show how well it now fits.

    python -m surgery align --base B --donor D --out DIR --method permutation|rotation [--select output]
                            [--dtype bfloat16|float16|float32] [--force]

The folder is a plain HF model that computes the donor's function (checked here: fp32 logits on the calibration
texts within 1e-4 of the largest, else nothing is kept) while its first d residual coordinates match the base's
as well as the method allows. It is streamed through the same aligned view the surgery reads with
`surgery.align`, one tensor at a time, into a temporary folder renamed when complete, manifest.json last.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch
from tqdm import tqdm

from pipeline.checkpoint import CheckpointReader, ShardedWriter, TensorSpec
from pipeline.config import AlignMethod, DType, UnitSelection, shard_size_bytes
from pipeline.errors import UserError
from pipeline.logits import LogitAgreement, logit_agreement
from pipeline.models import TOKENIZER_FILES, resolve_model
from pipeline.runs import atomic_output_dir, refuse_overlap, write_manifest
from surgery.aligned_donor import AlignedDonorReader, aligned_donor_shape, fit_alignment
from surgery.alignment import coordinate_correlation
from surgery.calibration import calibration_ids, layer_passes
from surgery.depth import donor_layer_sources
from surgery.execute import DISK_MARGIN_BYTES, free_disk_bytes
from surgery.plan import DTYPES, EMBED, check_checkpoint, expected_tensors
from surgery.shapes import ModelShape, check_donor_matches, read_model_shape
from surgery.streamed_llama import StreamedLlama, compute_device

log = logging.getLogger("surgery")

FP32_RELATIVE_TOLERANCE = 1e-4  # the same bar `surgery verify` sets an exact widening


def build_align_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m surgery align",
        description="Write the donor with its residual basis aligned to the base's (an exact re-parameterisation) "
        "and print the fit before and after.",
    )
    parser.add_argument("--base", required=True, help="the base model (folder, hub id or smollm2-135m-instruct)")
    parser.add_argument("--donor", required=True, help="the donor model (folder or hub id)")
    parser.add_argument("--out", required=True, help="output folder for the aligned donor")
    parser.add_argument("--method", required=True, choices=get_args(AlignMethod),
                        help="residual re-parameterisation: a signed permutation (no matmul) or a rotation")
    parser.add_argument("--select", choices=get_args(UnitSelection), default="index",
                        help="output: move the donor's heads and neurons with the largest output on calibration text "
                        "into the positions a graft takes (default index: leave them)")
    parser.add_argument("--dtype", choices=get_args(DType), help="output dtype (default: the donor's)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    return parser


@dataclass
class HiddenStateFit:
    """Per layer pair, the mean correlation of the base's coordinates with the donor's first d, before and after."""

    tokens: int
    width: int
    rows: list[tuple[str, str, float, float]] = field(default_factory=list)  # base layer, donor layer, before, after
    logits: LogitAgreement | None = None  # the aligned donor against the donor

    def render(self) -> str:
        lines = [
            f"hidden states: mean correlation of the base's {self.width} coordinates with the donor's first "
            f"{self.width}, over {self.tokens} calibration tokens (1 = same features, 0 = unrelated)",
            f"  {'base layer':<12}{'donor layer':<13}{'before':>8}{'after':>8}",
        ]
        lines += [f"  {b:<12}{d:<13}{before:>8.3f}{after:>8.3f}" for b, d, before, after in self.rows]
        if self.logits is not None:
            lines.append(
                f"aligned donor vs donor, fp32 logits: max |delta| {self.logits.max_abs_delta:.3e} (relative "
                f"{self.logits.relative_delta:.3e}), mean KL {self.logits.mean_kl:.3e}, top-1 "
                f"{self.logits.top1_agreement:.2%}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "layers": [{"base_layer": b, "donor_layer": d, "before": before, "after": after}
                       for b, d, before, after in self.rows],
            "logits_vs_donor": self.logits.to_dict() if self.logits is not None else None,
        }


def _tokens(hidden: list[torch.Tensor]) -> torch.Tensor:
    """(tokens, width) over every text, without each text's first position (the attention sink's outliers)."""
    return torch.cat([text[0, 1:] for text in hidden]).cpu()


def _pass(stream: StreamedLlama, ids: list[torch.Tensor], count: int, desc: str) -> tuple[list, list]:
    """Hidden states after the embedding and after every layer (first positions left out), and the logits."""
    hidden = stream.embed(ids)
    states = [_tokens(hidden)]
    for done in layer_passes(stream, hidden, count, desc=desc):
        states.append(_tokens(done.hidden))
        hidden = done.hidden
    return states, stream.logits(hidden)


def hidden_state_fit(base: ModelShape, donor: ModelShape, aligned: ModelShape, device: torch.device) -> HiddenStateFit:
    """Run base, donor and aligned donor layer by layer on the calibration texts and compare their hidden states,
    each base layer with the donor layer the default (proportional) layer map grafts into it."""
    ids = calibration_ids(base.folder, base.vocab_size)
    width = base.widths.hidden_size
    pairs = donor_layer_sources(base.num_hidden_layers, donor.num_hidden_layers, "proportional")
    base_states, _ = _pass(StreamedLlama(CheckpointReader(base.folder), base.config, device), ids,
                           base.num_hidden_layers, "base pass")
    donor_states, donor_logits = _pass(StreamedLlama(CheckpointReader(donor.folder), donor.config, device), ids,
                                       donor.num_hidden_layers, "donor pass")
    aligned_states, aligned_logits = _pass(StreamedLlama(CheckpointReader(aligned.folder), aligned.config, device),
                                           ids, donor.num_hidden_layers, "aligned donor pass")
    fit = HiddenStateFit(tokens=base_states[0].shape[0], width=width)
    # states[0] is the embedding output, states[i + 1] the output of layer i
    for base_row, donor_row, label in [(0, 0, ("embed", "embed"))] + [
        (i + 1, j + 1, (str(i), str(j))) for i, j in enumerate(pairs)
    ]:
        fit.rows.append((*label, coordinate_correlation(base_states[base_row], donor_states[donor_row]),
                         coordinate_correlation(base_states[base_row], aligned_states[donor_row])))
    fit.logits = logit_agreement(donor_logits, aligned_logits)
    return fit


def write_aligned_config(donor: ModelShape, aligned: ModelShape, dtype: str, folder: Path) -> None:
    """The donor's config.json (tying as the aligned view has it, the output dtype), tokenizer and generation
    config."""
    config = dict(donor.config)
    config.pop("torch_dtype", None)  # transformers 5 reads `dtype`
    config.update(tie_word_embeddings=aligned.tie_word_embeddings, dtype=dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if (donor.folder / name).is_file():
            shutil.copy2(donor.folder / name, folder / name)


def align_main(argv: list[str]) -> int:
    args = build_align_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"output {out} already exists; pass --force to replace it or choose another --out")
    try:
        shard_size_bytes(args.max_shard_size)
    except ValueError as err:
        raise UserError(f"--max-shard-size: {err}") from None
    if args.method == "none" and args.select == "index":
        raise UserError("--method none with --select index leaves the donor as it is; choose --method permutation "
                        "or rotation, or --select output")
    base_folder, donor_folder = resolve_model(args.base), resolve_model(args.donor)
    refuse_overlap(out, [base_folder, donor_folder])
    base, donor = read_model_shape(base_folder, "base"), read_model_shape(donor_folder, "donor")
    check_donor_matches(base, donor)
    check_checkpoint(CheckpointReader(base_folder), base)
    check_checkpoint(CheckpointReader(donor_folder), donor)
    device = compute_device()
    alignment = fit_alignment(base, donor, donor.widths, args.method, args.select,
                              list(range(donor.num_hidden_layers)), device)
    reader = AlignedDonorReader(CheckpointReader(donor_folder), donor, alignment)
    layout = aligned_donor_shape(donor, args.method)
    dtype = args.dtype or {v: k for k, v in DTYPES.items()}[reader.inner.dtype(EMBED)]
    shapes = expected_tensors(layout)
    specs = [TensorSpec(name, shape, DTYPES[dtype]) for name, shape in shapes.items()]
    need, free = sum(spec.nbytes for spec in specs) + DISK_MARGIN_BYTES, free_disk_bytes(out)
    if free < need:
        raise UserError(f"not enough free disk for {out}: the aligned donor takes {need / 1e9:.2f} GB and only "
                        f"{free / 1e9:.2f} GB is free there; free some space, choose another --out, or a smaller "
                        "--dtype")
    with atomic_output_dir(out, force=args.force) as tmp:
        writer = ShardedWriter(tmp, specs, args.max_shard_size)
        for name in tqdm(shapes, desc="aligned donor", unit="tensor"):
            writer.write(name, reader.get(name).to(DTYPES[dtype]))
        writer.close()
        write_aligned_config(donor, layout, dtype, tmp)
        aligned = read_model_shape(tmp, "aligned donor")
        fit = hidden_state_fit(base, donor, aligned, device)
        residual = alignment.report["embedding_residual"]
        print(f"embedding: |E_donor M[:, :{base.widths.hidden_size}] - E_base| / |E_base| "
              f"before {residual['before']:.4f}, after {residual['after']:.4f} ({args.method})")
        print(fit.render())
        if dtype == "float32" and fit.logits.relative_delta > FP32_RELATIVE_TOLERANCE:
            raise RuntimeError(
                f"the aligned donor does not compute the donor's function (relative logit delta "
                f"{fit.logits.relative_delta:.2e} > {FP32_RELATIVE_TOLERANCE:g}); nothing was kept"
            )
        write_manifest(
            tmp, "align",
            inputs={"base": args.base, "base_folder": str(base_folder), "donor": args.donor,
                    "donor_folder": str(donor_folder)},
            alignment=alignment.report, fit=fit.to_dict(), dtype=dtype,
        )
    print(f"wrote {out}")
    return 0
