"""Command lines of the eval stage.

`python -m eval --config FILE [--set k=v ...] [--force]` runs the stage for a run config.
`python -m eval probe --model PATH [--base PATH] [--max-new-tokens N] [--json FILE]` only probes one model
for degenerate output; its last line is `verdict: PASS|WARN|DEGENERATE`, and it exits 3 on DEGENERATE so a
script can stop before spending a GPU budget on a broken model.
`python -m eval compare RUN_OR_CONFIG... --out DIR` (`frankenllama compare`) compares finished runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from eval.models import ModelEntry, free_memory, load_model, load_tokenizer, pick_device
from eval.precision import Precision, choose_precision
from eval.probe import EXIT_DEGENERATE, ProbeResult, probe_model, summary_lines
from pipeline.config import BenchmarksConfig, EvalConfig, PerplexityConfig, PreservationConfig, ProbeConfig, load_config
from pipeline.errors import UserError, run_cli
from pipeline.models import resolve_model
from pipeline.runs import write_json_atomic

log = logging.getLogger("eval")


def stage_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval", description="Evaluate the run's models; `python -m eval probe -h` for the probe alone."
    )
    parser.add_argument("--config", required=True, help="run config YAML (e.g. configs/smoke.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. eval.probe.prompts=20 (repeatable)")
    parser.add_argument("--force", action="store_true", help="replace an existing <run_dir>/eval")
    return parser


def probe_parser() -> argparse.ArgumentParser:
    defaults = ProbeConfig()
    parser = argparse.ArgumentParser(prog="python -m eval probe",
                                     description="Greedy degeneration probe of one model, optionally against a base.")
    parser.add_argument("--model", required=True, help="model folder, hub id or packaged name")
    parser.add_argument("--base", help="the model it was made from; without it, absolute thresholds")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="how many shipped prompts")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="one dtype for both models; auto: float32 when the larger fits, else its half precision")
    parser.add_argument("--json", type=Path, help="also write verdicts, rates and every sample to this file")
    return parser


def _probe_one(entry: ModelEntry, settings: ProbeConfig, device: torch.device, precision: Precision,
               base: ProbeResult | None, tokenizer_fallback: Path | None) -> ProbeResult:
    tokenizer = load_tokenizer(entry.path, fallback=tokenizer_fallback)
    model = load_model(entry, device, precision.compute_dtype, precision.activations)
    result = probe_model(entry.label, model, tokenizer, settings, base)
    del model
    free_memory()
    return result


def run_probe_cli(args) -> int:
    try:
        settings = ProbeConfig(prompts=args.prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except ValueError as err:
        first = err.errors()[0] if hasattr(err, "errors") else {"loc": ("?",), "msg": str(err)}
        raise UserError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    model_entry = ModelEntry("model", args.model, resolve_model(args.model))
    base_entry = ModelEntry("base", args.base, resolve_model(args.base)) if args.base else None
    device = pick_device(args.device)
    # One dtype for both, as in the stage: the verdict compares the two models, not two precisions. The eval
    # settings this command means: the probe alone, so its generation is the only forward the budget keeps room for.
    probe_only = EvalConfig(device=args.device, dtype=args.dtype, probe=settings,
                            perplexity=PerplexityConfig(enabled=False), preservation=PreservationConfig(enabled=False),
                            benchmarks=BenchmarksConfig(enabled=False))
    entries = [e for e in (base_entry, model_entry) if e is not None]
    precision = choose_precision(probe_only, {e.label: e.path for e in entries}, device)
    log.info("%s", precision.reason)
    base_result = _probe_one(base_entry, settings, device, precision, None, None) if base_entry else None
    result = _probe_one(model_entry, settings, device, precision, base_result,
                        base_entry.path if base_entry else None)
    for probed in (base_result, result):
        if probed is not None:
            print("\n".join(summary_lines(probed)))
    if args.json:
        payload = {
            "model": args.model,
            "base": args.base,
            "settings": settings.model_dump(),
            "verdict": result.judgement.verdict,
            "judgement": result.judgement.to_dict(),
            "base_judgement": base_result.judgement.to_dict() if base_result else None,
            "samples": [s.to_dict() for s in result.samples],
            "base_samples": [s.to_dict() for s in base_result.samples] if base_result else None,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, payload)
    print(f"verdict: {result.judgement.verdict}", flush=True)
    return EXIT_DEGENERATE if result.judgement.verdict == "DEGENERATE" else 0


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frankenllama compare", description="Finished runs side by side, every difference paired against a "
        "reference run: benchmarks, held-out loss at equal tokens, training curves, degeneration (eval/compare.py).")
    parser.add_argument("inputs", nargs="+", metavar="RUN_OR_CONFIG", help="run folders, or the configs they ran with")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.md, report.json and the plots")
    parser.add_argument("--reference", metavar="NAME", help="the run (folder name) every other is compared with; "
                        "default: the first control run, else the first input")
    parser.add_argument("--seeds", metavar="S,S,...", help="expand each config into its runs with these seeds "
                        "(as `frankenllama run CONFIG --seeds` made them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every input config, as for `frankenllama run` (repeatable)")
    parser.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"],
                        help="wandb mode of the comparison's run (default: the first config's train.wandb.mode, "
                             "else auto)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["probe"]:
        args = probe_parser().parse_args(argv[1:])
        return run_cli(lambda: run_probe_cli(args))
    if argv[:1] == ["compare"]:
        compare_args = compare_parser().parse_args(argv[1:])

        def compare() -> int:
            from eval.compare import run_compare
            from pipeline.seeds import parse_seeds

            seeds = parse_seeds(compare_args.seeds) if compare_args.seeds is not None else None
            run_compare(compare_args.inputs, compare_args.out, compare_args.reference, seeds, compare_args.overrides,
                        compare_args.wandb, compare_args.force)
            print(f"compare: report in {compare_args.out / 'report.md'}")
            return 0

        return run_cli(compare)
    args = stage_parser().parse_args(argv)

    def body() -> int:
        from eval.stage import run_eval

        config = load_config(args.config, args.overrides)
        return run_eval(config, force=args.force)

    return run_cli(body)
