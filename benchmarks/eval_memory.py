"""GPU memory of eval's scoring forward with eval's loader against a model as transformers loads it, same run; then
eval's placement on an emulated 24 GB card, and preservation's float32 load streamed over GPU, CPU RAM and disk.

Builds a random bf16 Llama of the 22b widths (hidden 6656, 52 heads, intermediate 17920, vocab 32000), `--layers`
deep, saves it once (5 GB safetensors shards) under a temp dir, then in one process:

- `baseline`: AutoModelForCausalLM.from_pretrained(dtype=bf16) on the GPU; its config keeps use_cache=True;
- `eval`: eval.models.load_model (no KV cache in scoring forwards);
  each scores one batch of `--batch` x `--seq` tokens as lm-eval's _model_call does (model(ids).logits, then
  log_softmax over the vocabulary); the peak allocated memory above the weights is torch.cuda.max_memory_allocated
  less the memory allocated after loading;
- `offload`: eval.models.load_model with the GPU's free memory reported as `--card-gib` (accelerate's
  get_max_memory stood in for; real allocations are not capped), so layers go to CPU RAM as a 22b's do on a 24 GB
  card: placement, the time and peak of the same scoring forward (and from the time, the rate at which the CPU-held
  weights cross to the GPU, which sets eval's time at real size), and a greedy generate with a KV cache;
- `preservation`: eval.models.load_model in float32 (streamed) with the host's MemAvailable also reported as
  `--host-gib`, so layers go to disk too; one batched logits_on forward over 16 x 256 tokens.

Ends with `eval_memory: scoring peak above the weights X GiB (eval) vs Y GiB (baseline), ratio R`.
Needs torch, transformers, accelerate, safetensors, pydantic (eval's config schema) and pyyaml.

    python benchmarks/eval_memory.py --layers 8          # H200: writes ~9.4 GB under /tmp, a few minutes
    python benchmarks/eval_memory.py --quick             # tiny shape on CPU (no GPU peaks): checks the script
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, where it is not installed (the GPU box)

import torch

from eval.models import ModelEntry, load_model
from eval.placement import describe_placement, placement_summary
from eval.preservation import logits_on
from pipeline.sizing import LlamaShape, scoring_bytes_per_token

GIB = 2**30


def build_checkpoint(folder: Path, args, device: torch.device) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers, vocab_size=args.vocab,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.02)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model


def emulate(card_bytes: int | None, host_bytes: int | None) -> None:
    """Report at most these free bytes to eval's budgets, as a smaller card and host would."""
    import accelerate.utils

    real = accelerate.utils.get_max_memory

    def capped(max_memory=None):
        free = real(max_memory)
        for key in free:
            cap = host_bytes if key == "cpu" else card_bytes
            if cap is not None:
                free[key] = min(free[key], cap)
        return free

    accelerate.utils.get_max_memory = capped


def scoring_forward(model, ids: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(seconds, peak GiB allocated above what was allocated before) of one lm-eval style scoring forward."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        torch.nn.functional.log_softmax(model(ids.to(device)).logits, dim=-1)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - before) / GIB if cuda else float("nan")
    return seconds, peak


def release(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=6656)
    parser.add_argument("--heads", type=int, default=52)
    parser.add_argument("--intermediate", type=int, default=17920)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8, help="lm-eval batch (eval.benchmarks.batch_size)")
    parser.add_argument("--seq", type=int, default=1300, help="tokens per context (25-shot ARC: ~1.3k)")
    parser.add_argument("--card-gib", type=float, default=6.0, help="free GPU memory the offload run reports")
    parser.add_argument("--host-gib", type=float, default=12.0, help="MemAvailable the preservation run reports")
    parser.add_argument("--quick", action="store_true", help="tiny shape on CPU: checks the script")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.intermediate, args.vocab = 4, 64, 4, 128, 1000
        args.batch, args.seq, args.card_gib, args.host_gib = 2, 64, 0.001, 0.001
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-22b-widths"
        build_checkpoint(folder, args, device)
        entry = ModelEntry("22b-widths", str(folder), folder)
        shape = LlamaShape(args.hidden, args.intermediate, args.layers, args.heads, args.heads,
                           args.hidden // args.heads, args.vocab)
        # What eval's budget keeps free for the forwards below (pipeline/sizing.py's per-token estimate).
        scoring = args.batch * args.seq * scoring_bytes_per_token(shape)
        preservation = 16 * 256 * scoring_bytes_per_token(shape, 4)
        ids = torch.randint(args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        print(f"{args.layers} layers of hidden {args.hidden} / intermediate {args.intermediate}, vocab {args.vocab}; "
              f"scoring batch {args.batch} x {args.seq} tokens on {device}")

        baseline = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=str(device)).eval()
        scoring_forward(baseline, ids[:1, :8], device)  # warm-up: kernel and workspace set-up counts for neither
        base_seconds, base_peak = scoring_forward(baseline, ids, device)
        release(baseline)
        model = load_model(entry, device, torch.bfloat16, scoring)
        eval_seconds, eval_peak = scoring_forward(model, ids, device)
        release(model)
        print("| load | scoring forward | peak above the weights |")
        print("|---|---|---|")
        print(f"| baseline: from_pretrained, use_cache as configured (True) | {base_seconds:.2f} s | "
              f"{base_peak:.2f} GiB |")
        print(f"| eval: eval.models.load_model | {eval_seconds:.2f} s | {eval_peak:.2f} GiB |")

        emulate(int(args.card_gib * GIB), None)
        model = load_model(entry, device, torch.bfloat16, scoring)
        summary = placement_summary(model)
        where = describe_placement(summary, args.layers)
        seconds, peak = scoring_forward(model, ids, device)
        host_bytes = summary["cpu"].bytes if "cpu" in summary else 0
        # The extra time over the all-resident forward is the CPU-held weights crossing to the GPU.
        rate = host_bytes / 1e9 / (seconds - eval_seconds) if host_bytes and seconds > eval_seconds else float("nan")
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids[:4, :64].to(device), attention_mask=torch.ones_like(ids[:4, :64]).to(device),
                           max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)
        generate_seconds = time.perf_counter() - start
        release(model)
        print(f"offload (card reported as {args.card_gib} GiB): {where}; scoring forward {seconds:.2f} s "
              f"(CPU-held weights cross at {rate:.1f} GB/s), peak {peak:.2f} GiB above the resident weights; "
              f"generate 4 x 16 tokens {generate_seconds:.2f} s")

        emulate(int(args.card_gib * GIB), int(args.host_gib * GIB))
        model = load_model(entry, device, torch.float32, preservation, streamed=True)
        where = describe_placement(placement_summary(model), args.layers)
        start = time.perf_counter()
        logits = logits_on(model, [list(range(1, 257))] * 16)
        seconds = time.perf_counter() - start
        release(model)
        finite = all(bool(torch.isfinite(t).all()) for t in logits)
        print(f"preservation in float32 (card {args.card_gib} GiB, host {args.host_gib} GiB reported): {where}; "
              f"one batched forward over 16 x 256 tokens {seconds:.1f} s, finite logits: {finite}")
    ratio = eval_peak / base_peak if base_peak == base_peak and base_peak > 0 else float("nan")
    print(f"eval_memory: scoring peak above the weights {eval_peak:.2f} GiB (eval) vs {base_peak:.2f} GiB "
          f"(baseline), ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
