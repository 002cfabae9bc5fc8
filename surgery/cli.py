"""The surgery command line: build a widened model (or print its plan), or verify one against its base.

    python -m surgery --base REF --donor REF|random --out DIR [--mode ...] [--dry-run] [--force]
    python -m surgery --config FILE [--set surgery.key=value ...] [flags that override the config]
    python -m surgery verify --base REF --out DIR [--device auto|cpu|cuda]
    python -m surgery verify --config FILE [--set key=value ...]   (the base and output of that run)
    python -m surgery align --base REF --donor REF --out DIR --method permutation|rotation [--select output]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, get_args

from pipeline.checkpoint import CheckpointReader, TensorIndex
from pipeline.config import (
    AlignMethod,
    DType,
    FillMode,
    LayerMap,
    NewLayers,
    RunConfig,
    SurgeryConfig,
    UnitSelection,
    apply_override,
    load_config,
    shard_size_bytes,
    validate_config,
)
from pipeline.errors import UserError, run_cli
from pipeline.models import model_headers, resolve_model
from pipeline.runs import refuse_overlap, stage_fingerprint
from surgery.aligned_donor import aligned_donor_shape, alignment_estimate, check_alignment_settings, open_aligned_donor
from surgery.execute import execute, free_disk_bytes
from surgery.plan import SurgeryPlan, build_plan, check_checkpoint
from surgery.shapes import check_donor_matches, read_model_shape, target_widths

log = logging.getLogger("surgery")

# CLI flag (argparse dest) -> key inside the config's surgery section.
FLAG_KEYS = {
    "base": "base",
    "donor": "donor",
    "mode": "mode",
    "layer_map": "layer_map",
    "legacy": "legacy",
    "dtype": "dtype",
    "seed": "seed",
    "hidden_size": "target.hidden_size",
    "num_attention_heads": "target.num_attention_heads",
    "num_key_value_heads": "target.num_key_value_heads",
    "intermediate_size": "target.intermediate_size",
    "num_hidden_layers": "target.num_hidden_layers",
    "new_layers": "new_layers",
    "align": "align",
    "select": "select",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m surgery",
        description="Widen (and deepen) a trained Llama with the blocks of a wider donor. "
        "`python -m surgery verify --base PATH --out DIR` checks a result.",
    )
    parser.add_argument("--base", help="base model: local HF folder, hub id, or smollm2-135m-instruct")
    parser.add_argument("--donor", help="donor model (folder or hub id), or 'random' for seeded noise")
    parser.add_argument("--out", help="output folder (default with --config: <run_dir>/surgery)")
    parser.add_argument("--mode", choices=get_args(FillMode), help="fill mode of the new blocks (default readers)")
    parser.add_argument("--layer-map", choices=get_args(LayerMap), help="donor layer per target layer "
                        "(default proportional; index with --legacy)")
    parser.add_argument("--legacy", action="store_const", const=True, default=None,
                        help="reproduce the 2023 script's output exactly (inexact; for comparing with its releases)")
    parser.add_argument("--dtype", choices=get_args(DType), help="output dtype (default bfloat16)")
    parser.add_argument("--seed", type=int, help="seed of the random donor")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-attention-heads", type=int)
    parser.add_argument("--num-key-value-heads", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--num-hidden-layers", type=int, help="target depth (default: the base's); the new layers "
                        "start with o_proj and down_proj zero, so the model stays exact")
    parser.add_argument("--new-layers", choices=get_args(NewLayers), help="what fills the new layers' other "
                        "tensors: the donor layer of their position, or a copy of the layer before (default donor; "
                        "copy with --donor random)")
    parser.add_argument("--align", choices=get_args(AlignMethod), help="re-parameterise the donor's residual basis "
                        "towards the base's before grafting (exact for the donor; default none)")
    parser.add_argument("--select", choices=get_args(UnitSelection), help="which donor heads and neurons are grafted: "
                        "by index (default) or those with the largest output on calibration text")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit without writing (reads "
                        "only config.json and the safetensors headers, also of hub models)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--config", help="run config YAML; inputs from its surgery section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. surgery.mode=zero (repeatable)")
    return parser


def build_verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m surgery verify", description="fp32 logits check and "
                                     "gradient probe of a surgery output against its base")
    parser.add_argument("--base", help="the base model the surgery used (default with --config: surgery.base)")
    parser.add_argument("--out", help="the surgery output folder (default with --config: <run_dir>/surgery)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the fp32 layers are computed (default: CUDA when present)")
    parser.add_argument("--config", help="run config YAML whose surgery output to check")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    return parser


def resolve_settings(args: argparse.Namespace) -> tuple[RunConfig | None, SurgeryConfig, Path]:
    """The effective surgery section: config file, then --set, then flags (each overriding the previous)."""
    overrides = list(args.overrides)
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is not None:
            # JSON text is valid YAML, so a path like 'on' or '1e3' stays a string.
            overrides.append(f"surgery.{key}={json.dumps(value)}")
    if args.config:
        run = load_config(args.config, overrides)
        if run.surgery is None:
            raise UserError(f"{args.config} has no surgery section; add one (see configs/smoke.yaml) or pass --base")
        return run, run.surgery, Path(args.out) if args.out else run.stage_dir("surgery")
    raw: dict[str, Any] = {"run_dir": "."}
    for assignment in overrides:
        apply_override(raw, assignment)
    if not (raw.get("surgery") or {}).get("base"):
        raise UserError("no base model given; pass --base PATH_OR_HUB_ID (or --config FILE with surgery.base)")
    if not args.out:
        raise UserError("no output folder given; pass --out DIR (or --config FILE to write <run_dir>/surgery)")
    return None, validate_config(raw, "command line").surgery, Path(args.out)


def make_plan(settings: SurgeryConfig, weights: bool = True) -> SurgeryPlan:
    """Resolve the models, check they can be grafted, and lay out every output tensor.

    weights False (a dry run): only config.json and the safetensors headers are read, also of hub models.
    """
    def locate(ref: str) -> tuple[Path, TensorIndex]:
        if not weights:
            return model_headers(ref)
        folder = resolve_model(ref)
        return folder, CheckpointReader(folder)

    base_folder, base_tensors = locate(settings.base)
    donor_folder, donor_tensors = locate(settings.donor) if settings.donor != "random" else (None, None)
    base = read_model_shape(base_folder, "base")
    donor = read_model_shape(donor_folder, "donor") if donor_folder is not None else None
    if donor is not None:
        check_donor_matches(base, donor)
    target = target_widths(base, donor, settings.target)
    plan = build_plan(
        base,
        aligned_donor_shape(donor, settings.align) if donor is not None else None,
        target,
        mode=settings.mode,
        legacy=settings.legacy,
        layer_map=settings.layer_map if "layer_map" in settings.model_fields_set else None,
        dtype=settings.dtype,
        seed=settings.seed,
        max_shard_bytes=shard_size_bytes(settings.max_shard_size),
        num_hidden_layers=settings.target.num_hidden_layers,
        new_layers=settings.new_layers,
    )
    check_checkpoint(base_tensors, base)
    if donor is not None:
        check_checkpoint(donor_tensors, donor)
    return plan


def build_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run, settings, out = resolve_settings(args)
    if settings.mode == "none":
        raise UserError("surgery.mode is none (a control run): there is nothing to widen, the train stage trains "
                        "surgery.base itself; pick a fill mode to build a widened model")
    if out.exists() and not args.force and not args.dry_run:
        raise UserError(f"output {out} already exists; pass --force to replace it or choose another --out")
    check_alignment_settings(settings.donor == "random", settings.legacy, settings.align, settings.select)
    aligning = settings.align != "none" or settings.select != "index"
    plan = make_plan(settings, weights=not args.dry_run)
    refuse_overlap(out, [plan.base.folder] + ([plan.donor.folder] if plan.donor is not None else []))
    if args.dry_run:
        print(plan.render(free_disk_bytes(out)))
        if aligning:
            print(alignment_estimate(plan, settings.align, settings.select))
        print(f"\noutput: {out}{' (exists; --force would replace it)' if out.exists() else ''}")
        return 0
    log.info("%s -> %s (%s, %s, %d -> %d layers)", settings.base, out, plan.mode, plan.exactness.split(":")[0],
             plan.base.num_hidden_layers, plan.num_hidden_layers)
    fields: dict[str, Any] = {
        "inputs": {
            "base": settings.base,
            "base_folder": str(plan.base.folder),
            "donor": settings.donor,
            "donor_folder": str(plan.donor.folder) if plan.donor is not None else None,
        },
        "settings": settings.model_dump(mode="json"),
    }
    if run is not None:
        fields["fingerprint"] = stage_fingerprint(run, "surgery")
        fields["config"] = str(args.config)
    donor = open_aligned_donor(plan, settings.align, settings.select) if aligning else None
    if donor is not None:
        fields["alignment"] = donor.alignment.report
    execute(plan, out, args.force, fields, donor)
    return 0


def verify_main(argv: list[str]) -> int:
    from surgery.verify import verify

    args = build_verify_parser().parse_args(argv)
    base, out = args.base, Path(args.out) if args.out else None
    if args.config:
        run = load_config(args.config, args.overrides)
        if run.surgery is None:
            raise UserError(f"{args.config} has no surgery section; pass --base and --out")
        base, out = base or run.surgery.base, out or run.stage_dir("surgery")
    if base is None or out is None:
        raise UserError("pass --base REF and --out DIR (the surgery's), or --config FILE")
    if not out.is_dir():
        raise UserError(f"{out} does not exist; pass the folder surgery wrote (--out of the build)")
    report = verify(resolve_model(base), out, device=args.device)
    print(report.render())
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "verify":
            return run_cli(lambda: verify_main(argv[1:]))
        if argv and argv[0] == "align":
            from surgery.align import align_main

            return run_cli(lambda: align_main(argv[1:]))
        return run_cli(lambda: build_main(argv))
    except BrokenPipeError:
        # `--dry-run | head` closed the pipe: nothing went wrong, and the plan's reader has what it wanted.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (must outlive the interpreter's final flush)
        return 0
