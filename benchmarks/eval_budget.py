"""Eval's GPU weight budget on a small card, against the rule it replaced, same run: does the largest scoring forward
fit beside the weights each rule puts on the GPU?

Baseline: `free / 1.3` (eval's budget until the rehearsal's out-of-memory, benchmarks/RESULTS.md, Rehearsal).
Measured: eval/placement.py's `memory_budgets` with eval's own estimate of the largest forward (pipeline/sizing.py,
default eval settings at `--batch`, over both models, in bf16): free memory less those activations and the
allocator's slack.

Builds the rehearsal's two random models `--layers` deep (eval_memory.py's checkpoint writer): a base at
Llama-2-13b's widths and a widened model at the 22b's, both scored in bf16 as eval scores every model of that run.
Then for each model and rule, in a process of its own, it caps the CUDA allocator at `--card-gib`
(torch.cuda.set_per_process_memory_fraction), reports that card to eval's budgets (accelerate's get_max_memory:
free = cap - reserved), loads the model through eval.models.load_model (the baseline with its budget swapped in: the
same loader otherwise) and runs lm-eval's scoring forward (model(ids).logits, then log_softmax) at `--batch` x each
of `--seqs` tokens: 1306 is the rehearsal's 25-shot ARC context, 2150 the estimate's longest (5-shot MMLU). Each
cell is the peak allocated above the resident weights, or "out of memory". Ends with
`eval_budget: room beside the weights X GiB (eval) vs Y GiB (free / 1.3), ratio R; ...` (the widened model's).
Needs torch, transformers, accelerate, safetensors, pydantic and pyyaml.

    python benchmarks/eval_budget.py                # H200: writes ~12 GB under /tmp, a few minutes
    python benchmarks/eval_budget.py --quick        # tiny shapes on CPU (no cap, no peaks): checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, where it is not installed (the GPU box)

import torch
from eval_memory import build_checkpoint  # this folder is the script's first sys.path entry

from eval import models as eval_models
from eval.models import ModelEntry, load_model
from eval.placement import CPU_SHARE, device_key, input_device, memory_budgets, placement_summary
from pipeline.config import EvalConfig
from pipeline.sizing import GIB, LlamaShape, eval_memory

OLD_MARGIN = 1.3
# (hidden, heads, intermediate) of the rehearsal's base (Llama-2-13b) and widened model (the 22b).
WIDTHS = {"base": (5120, 40, 13824), "widened": (6656, 52, 17920)}
QUICK_WIDTHS = {"base": (64, 4, 128), "widened": (96, 6, 192)}


def report_card(card_bytes: int) -> None:
    """eval's budgets read accelerate's get_max_memory: report the card's free memory, cap less what is reserved."""
    import accelerate.utils

    real = accelerate.utils.get_max_memory

    def capped(max_memory=None):
        free = real(max_memory)
        for key in free:
            if key != "cpu":
                free[key] = min(free[key], card_bytes - torch.cuda.memory_reserved(key))
        return free

    accelerate.utils.get_max_memory = capped


def old_budgets(device: torch.device, activations: int) -> dict[int | str, int]:
    """The baseline: free / 1.3 on the GPU, whatever the forwards (the CPU budget as eval's)."""
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    budgets: dict[int | str, int] = {"cpu": int(free["cpu"] * CPU_SHARE)}
    if device.type == "cuda":
        budgets = {device_key(device): int(free[device_key(device)] / OLD_MARGIN), **budgets}
    return budgets


def scoring_peak(model, ids: torch.Tensor) -> float | None:
    """Peak GiB allocated above the resident weights during one lm-eval scoring forward; None on out-of-memory.

    The ids go where eval sends them (eval.placement.input_device): a model with every layer off the GPU computes
    on the CPU."""
    device = input_device(model)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    try:
        with torch.no_grad():
            torch.nn.functional.log_softmax(model(ids.to(device)).logits, dim=-1)
    except torch.OutOfMemoryError:
        return None
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return (torch.cuda.max_memory_allocated() - before) / GIB if cuda else float("nan")


BASELINE, MEASURED = "free / 1.3 (baseline)", "eval: free - activations - slack"
RULES = {BASELINE: old_budgets, MEASURED: memory_budgets}


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--card-gib", type=float, default=6.0, help="the card: allocator cap and reported free memory")
    parser.add_argument("--batch", type=int, default=8, help="lm-eval batch (eval.benchmarks.batch_size)")
    parser.add_argument("--seqs", default="1306,2150", help="context lengths to score, comma-separated")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU: checks the script")
    parser.add_argument("--cell", nargs=3, metavar=("MODEL", "FOLDER", "RULE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.vocab, args.seqs, args.card_gib = 4, 1000, "64,128", 1.2
    return args


def specs_of(args: argparse.Namespace) -> dict[str, SimpleNamespace]:
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    return {name: SimpleNamespace(hidden=hidden, heads=heads, intermediate=intermediate, layers=args.layers,
                                  vocab=args.vocab) for name, (hidden, heads, intermediate) in widths.items()}


def bench_device(args: argparse.Namespace) -> torch.device:
    """Where the models load and the forwards run: the GPU, unless --quick or there is none."""
    return torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")


def largest_forward(args: argparse.Namespace):
    """eval's own estimate of its largest forward over both models (default settings at --batch, bf16)."""
    shapes = [LlamaShape(s.hidden, s.intermediate, s.layers, s.heads, s.heads, s.hidden // s.heads, s.vocab)
              for s in specs_of(args).values()]
    settings = EvalConfig(dtype="bfloat16", benchmarks={"batch_size": args.batch})
    return eval_memory(settings, [(shape, "bfloat16") for shape in shapes], int(args.card_gib * GIB))


def measure_cell(args: argparse.Namespace) -> None:
    """One model under one rule, in a process of its own (a forward that ran out of memory can leave the model
    referenced, so a next load in the same process would see a fuller card): prints one JSON line."""
    model_name, folder, rule_name = args.cell
    device = bench_device(args)
    card_bytes = int(args.card_gib * GIB)
    activations = largest_forward(args).activations
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(card_bytes / torch.cuda.get_device_properties(0).total_memory)
        report_card(card_bytes)
    else:  # no card: the budgets printed are what eval would hand one this size; the forwards run on the CPU
        import accelerate.utils

        real = accelerate.utils.get_max_memory
        host = real()["cpu"]
        # Only eval's own question (no budgets given) sees the card; transformers' placement keeps the real answer.
        accelerate.utils.get_max_memory = lambda max_memory=None: (
            {0: card_bytes, "cpu": host} if max_memory is None else real(max_memory))
    rule = RULES[rule_name]
    budget = rule(torch.device("cuda", 0), activations)[0]
    if device.type == "cuda":
        eval_models.memory_budgets = rule
    model = load_model(ModelEntry(model_name, folder, Path(folder)), device, torch.bfloat16, activations)
    on_gpu = sum(place.bytes for where, place in placement_summary(model).items() if where.startswith("cuda"))
    generator = torch.Generator().manual_seed(0)
    peaks = [scoring_peak(model, torch.randint(args.vocab, (args.batch, int(seq)), generator=generator))
             for seq in args.seqs.split(",")]
    print(json.dumps({"budget": budget, "on_gpu": on_gpu, "peaks": peaks}))


def run_cell(model_name: str, folder: Path, rule_name: str) -> tuple[int, int, list[float | None]]:
    """measure_cell in a child process with this run's arguments; its (budget, bytes on the GPU, peaks)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--cell", model_name, str(folder), rule_name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"eval_budget: the {model_name} / {rule_name} cell failed:\n{done.stderr[-3000:]}")
    cell = json.loads(done.stdout.strip().splitlines()[-1])
    return cell["budget"], cell["on_gpu"], cell["peaks"]


def main() -> None:
    args = parse_args()
    if args.cell:
        measure_cell(args)
        return
    device = bench_device(args)
    card_bytes = int(args.card_gib * GIB)
    seqs = [int(seq) for seq in args.seqs.split(",")]
    estimate = largest_forward(args)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, spec in specs_of(args).items():  # the random init runs on the GPU, in fp32 first
            folders[name] = Path(tmp) / name
            build_checkpoint(folders[name], spec, device)
            release()
        print(f"{args.layers} layers, vocab {args.vocab}, card {args.card_gib} GiB; eval's largest forward (default "
              f"settings, batch {args.batch}, bf16): {estimate.activations / GIB:.2f} GiB ({estimate.forward})")
        for model_name, folder in folders.items():
            for rule_name in RULES:
                rows[model_name, rule_name] = run_cell(model_name, folder, rule_name)

    print("| model | rule | GPU budget | weights on the GPU | room beside them | "
          + " | ".join(f"forward {args.batch} x {seq}" for seq in seqs) + " |")
    print("|---|---|---|---|---|" + "---|" * len(seqs))
    for (model_name, rule_name), (budget, on_gpu, peaks) in rows.items():
        cells = ["out of memory" if peak is None else f"peak {peak:.2f} GiB" for peak in peaks]
        print(f"| {model_name} | {rule_name} | {budget / GIB:.2f} GiB | {on_gpu / GIB:.2f} GiB | "
              f"{(card_bytes - on_gpu) / GIB:.2f} GiB | " + " | ".join(cells) + " |")
    old, new = (rows["widened", rule] for rule in RULES)
    room_old, room_new = (card_bytes - old[1]) / GIB, (card_bytes - new[1]) / GIB
    measured = [peak for peak in new[2] if peak is not None and peak == peak]
    largest = f"{max(measured):.2f} GiB" if measured else "n/a"
    failures = {rule: sum(peak is None for (_, name), row in rows.items() if name == rule for peak in row[2])
                for rule in RULES}
    print(f"eval_budget: room beside the weights {room_new:.2f} GiB (eval) vs {room_old:.2f} GiB (free / 1.3), ratio "
          f"{room_new / room_old:.2f}; largest forward estimated {estimate.activations / GIB:.2f} GiB, measured "
          f"{largest} ({args.batch} x {max(seqs)}, widened); out of memory: eval {failures[MEASURED]}, "
          f"baseline {failures[BASELINE]} of {len(rows) // 2 * len(seqs)} forwards")


if __name__ == "__main__":
    main()
