"""Batched, left-padded probe generation vs one prompt at a time (the baseline), in the same run.

    python benchmarks/probe_batching.py [--model smollm2-135m-instruct] [--prompts 16] [--max-new-tokens 32]
        [--batch-size 16] [--repeats 2]

Prints the best-of-N seconds for each and the speedup ratio, plus how many outputs are token-identical
(left padding changes float rounding, which can flip a near-tied greedy choice).
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.models import resolve_model
from pipeline.probing import generate_probe_samples, load_probe_prompts


def best_time(run, repeats: int) -> tuple[float, list]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = load_probe_prompts(args.prompts)

    def run(batch_size: int):
        return lambda: generate_probe_samples(model, tokenizer, prompts, args.max_new_tokens, batch_size,
                                              progress=False)

    run(args.batch_size)()  # warm-up: first-call kernel setup is not what either variant costs
    single, single_out = best_time(run(1), args.repeats)
    batched, batched_out = best_time(run(args.batch_size), args.repeats)
    same = sum(a.output_ids == b.output_ids for a, b in zip(single_out, batched_out, strict=True))
    print(f"model {args.model}, {args.prompts} prompts x {args.max_new_tokens} new tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"one prompt at a time (baseline): {single:.2f} s")
    print(f"batched, batch size {args.batch_size}: {batched:.2f} s")
    print(f"speedup: {single / batched:.2f}x; identical outputs: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
