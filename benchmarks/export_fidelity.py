"""Which merged export is closer to what was trained: the adapter added to the stored weights, or to the NF4 ones?

QLoRA trains the adapter against the NF4-dequantized base, but the usual export adds it to the stored (bf16)
weights. This trains a real adapter with the stage's own code (NF4, train.model + train.trainer) on SmolLM2-135M
stored in bf16 (as the 22b's surgery output is), then scores on the same held-out windows (train/heldout.py, the
first held-out documents of the slice):

- trained: the NF4 base + adapter, exactly as training computed it (peft, eval mode);
- merge into base: train.export.merge_adapter(into="base"), the stored bf16 weights + scale * B @ A;
- merge into dequantized_nf4: merge_adapter(into="dequantized_nf4"), each quantized weight quantized as loading
  does, dequantized, + scale * B @ A;
- for scale, the untrained bf16 base and NF4 base (how far training moved the loss).

The merged folders are loaded like the eval stage loads a model that fits (fp32). Reported per model: held-out loss
(nats/token), its difference from the trained model, mean KL(trained || model) per token and top-1 agreement with
the trained model, and each merge's wall time. The line `closer to what was trained:` names the winner by mean KL.

    python benchmarks/export_fidelity.py                # CPU: about 13 minutes on 2 busy cores
    python benchmarks/export_fidelity.py --quick        # CPU: a few minutes, proves the script runs
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def copy_in_bf16(source: Path, target: Path) -> Path:
    """SmolLM2 as a bf16 checkpoint with its tokenizer: the stored dtype of the 22b surgery output."""
    import shutil

    from transformers import AutoModelForCausalLM

    from pipeline.models import TOKENIZER_FILES

    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target


def nf4_merge_matches_loading(peft_model, base_dir: Path, device: torch.device) -> bool:
    """Whether train.model.nf4_round_trip of each stored weight equals, bit for bit, the dequantized weight of the
    model NF4 loading made (on this device: CUDA's kernels are the ones that matter for the real run)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from pipeline.checkpoint import CheckpointReader
    from train.model import nf4_round_trip

    reader = CheckpointReader(base_dir)
    for name, module in peft_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight_name = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
            loaded = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            if not torch.equal(nf4_round_trip(reader.get(weight_name), device), loaded):
                return False
    return True


@torch.no_grad()
def score(model, windows: list[dict[str, torch.Tensor]], reference: list[torch.Tensor] | None = None):
    """(held-out loss, mean KL(reference || model), top-1 agreement with the reference, per-window log-probs)."""
    device = next(model.parameters()).device
    nll = kl = agree = count = 0.0
    logprobs = []
    for index, window in enumerate(windows):
        ids, mask, labels = (window[k].unsqueeze(0).to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[0, :-1].float()
        targets = labels[0, 1:]
        kept = targets != -100
        lp = torch.log_softmax(logits[kept], dim=-1).cpu()
        logprobs.append(lp)
        nll -= lp.gather(1, targets[kept].cpu().unsqueeze(1)).sum().item()
        count += int(kept.sum())
        if reference is not None:
            ref = reference[index]
            kl += torch.sum(ref.exp() * (ref - lp)).item()
            agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
    if reference is None:
        return nll / count, 0.0, 1.0, logprobs
    return nll / count, kl / count, agree / count, logprobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of seq-len tokens scored")
    parser.add_argument("--quick", action="store_true", help="3 steps at seq 32 on 2 windows: a check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq_len, args.windows = 3, 32, 2

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import LoraSettings, TrainConfig, TrainDataConfig, WandbConfig, WatchdogConfig
    from pipeline.models import resolve_model
    from train.data import prepare_corpus
    from train.export import merge_adapter, save_adapter
    from train.heldout import heldout_windows, read_texts
    from train.model import load_for_training, training_device
    from train.trainer import build_trainer

    device = training_device()
    heldout_tokens = 2 * args.windows * args.seq_len  # whole documents: enough to fill the windows
    tokens = args.steps * args.seq_len + heldout_tokens  # one block per step, each seen once
    settings = TrainConfig(
        quantization="nf4", seq_len=args.seq_len, max_steps=args.steps, save_steps=10**6, grad_accum=1,
        learning_rate=args.learning_rate, warmup_ratio=0.0, gradient_checkpointing=False, eval_steps=None,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_r, dropout=0.0),
        data=TrainDataConfig(sources=["python-stdlib-docs"], tokens=tokens, heldout_fraction=heldout_tokens / tokens),
        wandb=WandbConfig(mode="disabled"), watchdog=WatchdogConfig(enabled=False),
    )
    with tempfile.TemporaryDirectory(prefix="export-fidelity-") as scratch:
        root = Path(scratch)
        base_dir = copy_in_bf16(resolve_model("smollm2-135m-instruct"), root / "base")
        corpus = prepare_corpus(settings.data, settings.seq_len, base_dir, root / "data")
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        windows = heldout_windows(read_texts(corpus.heldout_path), tokenizer, args.seq_len, args.windows)
        print(f"device {device}; SmolLM2-135M stored in bf16; {args.steps} steps x {args.seq_len} tokens, LoRA "
              f"r={args.lora_r}, lr {args.learning_rate}; held-out: {len(windows.windows)} windows, "
              f"{windows.predicted_tokens} predicted tokens", flush=True)

        torch.manual_seed(0)
        model = load_for_training(base_dir, settings, device)
        trainer = build_trainer(model, corpus.dataset(), settings, root / "train", seed=0, device=device)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        model.eval()
        loss_trained, _, _, reference = score(model, windows.windows)
        with model.disable_adapter():
            loss_nf4_base = score(model, windows.windows, reference)
        exact = nf4_merge_matches_loading(model, base_dir, device)
        adapter_dir = save_adapter(model, root / "adapter")
        del trainer, model

        rows = [("trained: NF4 base + adapter", loss_trained, 0.0, 1.0, None)]
        rows.append(("NF4 base, no adapter", *loss_nf4_base[:3], None))
        bf16 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
        rows.append(("stored bf16 base, no adapter", *score(bf16, windows.windows, reference)[:3], None))
        del bf16
        for into in ("base", "dequantized_nf4"):
            start = time.perf_counter()
            merge_adapter(base_dir, adapter_dir, root / f"merged-{into}", into=into, device=device)
            seconds = time.perf_counter() - start
            merged = AutoModelForCausalLM.from_pretrained(root / f"merged-{into}", dtype=torch.float32).to(device)
            rows.append((f"merge into {into}", *score(merged, windows.windows, reference)[:3], seconds))
            del merged
    print(f"training loss {losses[0]:.4f} at step 1 -> {sum(losses[-5:]) / len(losses[-5:]):.4f} over the last 5 steps")
    print(f"the dequantized_nf4 merge re-quantizes every 4-bit weight exactly as loading did: {exact}")
    print()
    print("| model | held-out loss (nats/token) | Δ vs trained | mean KL(trained ‖ model) | top-1 agreement "
          "| merge s |")
    print("|---|---|---|---|---|---|")
    for name, loss, kl, agree, seconds in rows:
        print(f"| {name} | {loss:.5f} | {loss - loss_trained:+.5f} | {kl:.2e} | {agree:.2%} | "
              f"{'' if seconds is None else f'{seconds:.1f}'} |")
    merges = {name.removeprefix("merge into "): kl for name, _, kl, _, _ in rows if name.startswith("merge into")}
    closer = min(merges, key=merges.get)
    other = max(merges, key=merges.get)
    ratio = merges[other] / merges[closer] if merges[closer] > 0 else math.inf
    print()
    print(f"closer to what was trained: {closer} (mean KL {merges[closer]:.2e} vs {merges[other]:.2e} for {other}, "
          f"{ratio:.1f}x smaller)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
