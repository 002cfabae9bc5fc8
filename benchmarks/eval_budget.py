"""Eval's GPU weight budget on a small card, against the rule it replaced, same run: does the largest scoring forward
fit beside the weights each rule puts on the GPU?

Baseline: `free / 1.3` (eval's budget until the rehearsal's out-of-memory, benchmarks/RESULTS.md, Rehearsal).
Measured: eval/placement.py's `memory_budgets` with eval's own estimate of the largest forward (pipeline/sizing.py,
default eval settings at `--batch`, over both models, in bf16): free memory less those activations and the
allocator's slack.

Builds the rehearsal's two random models `--layers` deep (eval_memory.py's checkpoint writer): a base at
Llama-2-13b's widths and a widened model at the 22b's, both scored in bf16 as eval scores every model of that run.
Then it caps this process's CUDA allocator at `--card-gib` (torch.cuda.set_per_process_memory_fraction), reports
that card to eval's budgets (accelerate's get_max_memory: free = cap - reserved), and for each model and rule loads
it through eval.models.load_model (the baseline with its budget swapped in: the same loader otherwise) and runs
lm-eval's scoring forward (model(ids).logits, then log_softmax) at `--batch` x each of `--seqs` tokens: 1306 is the
rehearsal's 25-shot ARC context, 2150 the estimate's longest (5-shot MMLU). Each cell is the peak allocated above
the resident weights, or "out of memory". Ends with
`eval_budget: room beside the weights X GiB (eval) vs Y GiB (free / 1.3), ratio R; ...` (the widened model's).
Needs torch, transformers, accelerate, safetensors, pydantic and pyyaml.

    python benchmarks/eval_budget.py                # H200: writes ~12 GB under /tmp, a few minutes
    python benchmarks/eval_budget.py --quick        # tiny shapes on CPU (no cap, no peaks): checks the script
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from eval_memory import build_checkpoint  # this folder is the script's first sys.path entry

from eval import models as eval_models
from eval.models import ModelEntry, load_model
from eval.placement import CPU_SHARE, device_key, memory_budgets, placement_summary
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


def scoring_peak(model, ids: torch.Tensor, device: torch.device) -> float | None:
    """Peak GiB allocated above the resident weights during one lm-eval scoring forward; None on out-of-memory."""
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


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--card-gib", type=float, default=6.0, help="the card: allocator cap and reported free memory")
    parser.add_argument("--batch", type=int, default=8, help="lm-eval batch (eval.benchmarks.batch_size)")
    parser.add_argument("--seqs", default="1306,2150", help="context lengths to score, comma-separated")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU: checks the script")
    args = parser.parse_args()
    widths = WIDTHS
    if args.quick:
        widths, args.layers, args.vocab, args.seqs, args.card_gib = QUICK_WIDTHS, 4, 1000, "64,128", 1.2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    card = torch.device("cuda", 0)
    card_bytes = int(args.card_gib * GIB)
    seqs = [int(seq) for seq in args.seqs.split(",")]
    specs = {name: SimpleNamespace(hidden=hidden, heads=heads, intermediate=intermediate, layers=args.layers,
                                   vocab=args.vocab) for name, (hidden, heads, intermediate) in widths.items()}
    shapes = {name: LlamaShape(s.hidden, s.intermediate, s.layers, s.heads, s.heads, s.hidden // s.heads, s.vocab)
              for name, s in specs.items()}
    settings = EvalConfig(dtype="bfloat16", benchmarks={"batch_size": args.batch})
    estimate = eval_memory(settings, [(shape, "bfloat16") for shape in shapes.values()], card_bytes)
    baseline, measured_rule = "free / 1.3 (baseline)", "eval: free - activations - slack"
    rules = {baseline: old_budgets, measured_rule: memory_budgets}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: Path(tmp) / name for name in specs}
        for name, spec in specs.items():  # before the cap: the random init runs on the GPU, in fp32 first
            build_checkpoint(folders[name], spec, device)
            release()
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(card_bytes / torch.cuda.get_device_properties(0).total_memory)
            report_card(card_bytes)
        else:  # no card: the budgets printed are what eval would hand one this size; the forwards run on the CPU
            import accelerate.utils

            host = accelerate.utils.get_max_memory()["cpu"]
            accelerate.utils.get_max_memory = lambda max_memory=None: {0: card_bytes, "cpu": host}
        print(f"{args.layers} layers, vocab {args.vocab}, card {args.card_gib} GiB; eval's largest forward (default "
              f"settings, batch {args.batch}, bf16): {estimate.activations / GIB:.2f} GiB ({estimate.forward})")
        for model_name, folder in folders.items():
            entry = ModelEntry(model_name, str(folder), folder)
            for rule_name, rule in rules.items():
                budget = rule(card, estimate.activations)[0]
                eval_models.memory_budgets = rule if device.type == "cuda" else memory_budgets
                model = load_model(entry, device, torch.bfloat16, estimate.activations)
                eval_models.memory_budgets = memory_budgets
                on_gpu = sum(place.bytes for where, place in placement_summary(model).items()
                             if where.startswith("cuda"))
                generator = torch.Generator().manual_seed(0)
                peaks = {seq: scoring_peak(model, torch.randint(args.vocab, (args.batch, seq), generator=generator),
                                           device) for seq in seqs}
                del model
                release()
                rows[model_name, rule_name] = (budget, on_gpu, peaks)

    print("| model | rule | GPU budget | weights on the GPU | room beside them | "
          + " | ".join(f"forward {args.batch} x {seq}" for seq in seqs) + " |")
    print("|---|---|---|---|---|" + "---|" * len(seqs))
    for (model_name, rule_name), (budget, on_gpu, peaks) in rows.items():
        cells = ["out of memory" if peak is None else f"peak {peak:.2f} GiB" for peak in peaks.values()]
        print(f"| {model_name} | {rule_name} | {budget / GIB:.2f} GiB | {on_gpu / GIB:.2f} GiB | "
              f"{(card_bytes - on_gpu) / GIB:.2f} GiB | " + " | ".join(cells) + " |")
    old, new = (rows["widened", rule] for rule in rules)
    room_old, room_new = (card_bytes - old[1]) / GIB, (card_bytes - new[1]) / GIB
    measured = [peak for peak in new[2].values() if peak is not None and peak == peak]
    largest = f"{max(measured):.2f} GiB" if measured else "n/a"
    failures = {rule: sum(peak is None for (_, name), row in rows.items() if name == rule for peak in row[2].values())
                for rule in rules}
    print(f"eval_budget: room beside the weights {room_new:.2f} GiB (eval) vs {room_old:.2f} GiB (free / 1.3), ratio "
          f"{room_new / room_old:.2f}; largest forward estimated {estimate.activations / GIB:.2f} GiB, measured "
          f"{largest} ({args.batch} x {max(seqs)}, widened); out of memory: eval {failures[measured_rule]}, "
          f"baseline {failures[baseline]} of {len(rows) // 2 * len(seqs)} forwards")


if __name__ == "__main__":
    main()
