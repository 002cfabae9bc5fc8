"""`surgery verify`'s peak memory against the whole-model check it replaced, measured in the same run.

Writes a random bf16 base (`--shape small`: hidden 1024, 8 heads, intermediate 2816; `22b`: Llama-2-13b's widths;
vocab 32000) at 8 and 16 layers, widens each with a random donor (small: to hidden 1536, 12 heads, intermediate
4096; 22b: to llama-30b's widths) in bf16 with `python -m surgery`, grows the 16-layer one to 24 layers too, then
checks every output twice, each as its own process through a small launcher (peak RSS is the child's ru_maxrss
from wait4):

- streamed: `python -m surgery verify --device cpu` (one decoder layer in fp32 at a time, forward and backward);
- whole model (the baseline: verify before it streamed): both models loaded whole in fp32 with transformers, the
  base rounded through bf16, logits of both on the same 96 tokens, then one backward of the LM loss over every
  parameter of the output.

    .venv/bin/python benchmarks/verify_memory.py [--layers 8 16] [--grow-to 24] [--shape small|22b]
        [--device cpu|cuda] [--no-whole-model] [--workdir /tmp]

On CUDA the streamed verify's line with its peak GPU memory is printed too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from surgery_bench import Measured, measure, print_checks, write_random_llama

# base widths and the target's, per --shape: small for a CPU box, 22b for Llama-2-13b -> llama-30b's widths
SHAPES = {
    "small": ({"hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 2816},
              {"hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 12, "intermediate_size": 4096}),
    "22b": ({"hidden_size": 5120, "num_attention_heads": 40, "num_key_value_heads": 40, "intermediate_size": 13824},
            {"hidden_size": 6656, "num_attention_heads": 52, "num_key_value_heads": 52, "intermediate_size": 17920}),
}
TARGETS = {"rss_growth": 1.10}

WHOLE_MODEL = """
import sys, torch
from transformers import AutoModelForCausalLM
base, out = sys.argv[1], sys.argv[2]
ids = torch.randint(32000, (1, 96), generator=torch.Generator().manual_seed(0))
base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
with torch.no_grad():
    for param in base_model.parameters():
        param.copy_(param.to(torch.bfloat16).float())
    base_logits = base_model(ids).logits
out_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
with torch.no_grad():
    out_logits = out_model(ids).logits
del base_model
out_model(ids, labels=ids).loss.backward()
"""


def bench(workdir: Path, layers: int, grow_to: int | None, shape: str, device: str, whole_model: bool) -> dict:
    depth = grow_to or layers
    base, out = workdir / f"base-{layers}", workdir / f"out-{layers}-{depth}"
    base_widths, target = SHAPES[shape]
    if not base.exists():
        write_random_llama(base, base_widths, layers, seed=0)
    flags = [item for name, value in target.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    measure([sys.executable, "-m", "surgery", "--base", str(base), "--donor", "random", "--out", str(out), *flags,
             "--dtype", "bfloat16", "--num-hidden-layers", str(depth)])
    fp32_gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) * 2 / 1e9
    label = f"{layers} -> {depth}" if grow_to else str(layers)
    print(f"== {label} layers: output {fp32_gb:.2f} GB in fp32", flush=True)
    streamed = measure([sys.executable, "-m", "surgery", "verify", "--base", str(base), "--out", str(out),
                        "--device", device])
    verdict = [line for line in streamed.stdout.splitlines() if "fp32 on" in line or line.startswith(("PASS", "FAIL"))]
    whole = measure([sys.executable, "-c", WHOLE_MODEL, str(base), str(out)]) if whole_model else None
    print(f"   streamed {streamed.peak_rss_gb:.2f} GB in {streamed.wall_s:.1f} s ({'; '.join(verdict)})"
          + (f", whole model {whole.peak_rss_gb:.2f} GB in {whole.wall_s:.1f} s" if whole else ""), flush=True)
    shutil.rmtree(out)
    return {"label": label, "fp32_gb": fp32_gb, "streamed": streamed, "whole": whole}


def report(results: list[dict]) -> bool:
    print("\nverify: streamed vs whole model (the baseline), peak RSS of each process; ratio = whole / streamed")
    print(f"{'layers':>8} {'output fp32 GB':>14} {'streamed GB':>11} {'streamed s':>10} {'whole GB':>8} "
          f"{'whole s':>7} {'ratio':>6}")
    for r in results:
        s, w = r["streamed"], r["whole"]
        whole = (f"{w.peak_rss_gb:>8.2f} {w.wall_s:>7.1f} {w.peak_rss_gb / s.peak_rss_gb:>6.2f}" if w
                 else f"{'-':>8} {'-':>7} {'-':>6}")
        print(f"{r['label']:>8} {r['fp32_gb']:>14.2f} {s.peak_rss_gb:>11.2f} {s.wall_s:>10.1f} {whole}")
    first: Measured = results[0]["streamed"]
    checks = []
    for r in results[1:]:
        growth = r["streamed"].peak_rss_gb / first.peak_rss_gb
        checks.append((f"streamed peak RSS at {r['label']} layers x{growth:.3f} the {results[0]['label']}-layer "
                       f"run's (no growth: <= x{TARGETS['rss_growth']})", growth <= TARGETS["rss_growth"]))
    return print_checks(checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--grow-to", type=int, default=24, help="also grow the deepest base to this many layers "
                        "(0: none)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="base and target widths")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the streamed verify computes")
    parser.add_argument("--no-whole-model", action="store_true", help="skip the baseline (it needs both models and "
                        "the output's gradients in fp32 in RAM)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary checkpoints go")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="verify-bench-", dir=args.workdir))
    options = {"shape": args.shape, "device": args.device, "whole_model": not args.no_whole_model}
    try:
        results = [bench(workdir, layers, None, **options) for layers in args.layers]
        if args.grow_to:
            results.append(bench(workdir, max(args.layers), args.grow_to, **options))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
