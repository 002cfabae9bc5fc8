"""Train-step speed and memory of the train stage against the plain QLoRA recipe, same run, 24 GB budget.

Builds a random-init Llama of the llama2-22b shape (40 layers, hidden 6656, 52 heads, intermediate 17920,
vocab 32000) directly in NF4 on the GPU, one linear at a time (never the 44 GB of bf16 weights), caps the
process at 23.0 GiB with torch.cuda.set_per_process_memory_fraction (a 24 GB card), and times train steps at
each sequence length for two recipes on identical weights and data:

- `stage`: the train stage's own code path (train.model.prepare_for_training + train.trainer.build_trainer);
- `plain`: transformers + peft as the QLoRA recipe is usually written: prepare_model_for_kbit_training (which
  upcasts embeddings, lm_head and norms to fp32), LoRA r=64 on all seven projections, paged AdamW 32-bit,
  gradient checkpointing, batch 1, bf16 autocast, the HF Trainer.

Every (recipe, seq) cell runs in its own subprocess, so an out-of-memory cell cannot poison the next and
every peak is that cell's own. A few warm-up steps, then timed steps (CUDA-synchronized); the table shows
tokens/s, peak allocated/reserved memory and the first losses (same seed and data: they should agree within
bf16 noise). Paged-optimizer state lives in CUDA unified memory and is not in the allocator's peak.

`--num-gpus N` measures data-parallel scaling instead: the stage's recipe at the shortest seq and the same
per-GPU micro-batch (`--stage-batch`), on one GPU and then on N GPUs of this machine, launched the way the stage
launches them (accelerate launch with train/launch.py's config, DDP, each GPU capped at `--cap-gib`); tokens/s
counts the tokens of all GPUs, and the run ends with `train_bench: N-GPU scaling X.XXx vs 1 GPU (data-parallel)`.

Needs only torch, transformers, peft, accelerate and bitsandbytes.

    python benchmarks/train_bench.py                 # 22b shape, seq 2048 and 4096 (an H200 or any 24 GB+ GPU)
    python benchmarks/train_bench.py --quick         # tiny shape, seconds: checks the script itself
    python benchmarks/train_bench.py --quick --cpu   # the same on CPU (adamw_torch, fp32, no cap)
    python benchmarks/train_bench.py --num-gpus 2    # 22b shape, seq 2048, micro-batch 2: 1 GPU vs 2 GPUs
    python benchmarks/train_bench.py --num-gpus 2 --quick --cpu   # the scaling path on 2 CPU processes (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE_22B = {"num_hidden_layers": 40, "hidden_size": 6656, "num_attention_heads": 52, "num_key_value_heads": 52,
             "intermediate_size": 17920, "vocab_size": 32000}
SHAPE_QUICK = {"num_hidden_layers": 2, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8,
               "intermediate_size": 1408, "vocab_size": 32000}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = ("plain", "stage")
RESULT = "RESULT "


# ---- the model: random weights, quantized one linear at a time -------------------------------------------

def build_random_nf4_llama(shape: dict, seed: int, device, compute_dtype, quantize: bool = True):
    """A LlamaForCausalLM with random weights whose decoder linears are NF4 (double-quantized) Linear4bit.

    The skeleton is built on the meta device; each linear's bf16 weight is drawn on `device`, quantized
    and dropped, so peak memory is the quantized model plus one bf16 matrix.
    """
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(seed)

    def random_matrix(rows: int, cols: int):
        return torch.empty(rows, cols, device=device, dtype=compute_dtype).normal_(0.0, 0.02, generator=generator)

    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, linear in list(block.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                weight = random_matrix(linear.out_features, linear.in_features)
                if quantize:
                    replacement = bnb.nn.Linear4bit(
                        linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                        compress_statistics=True, quant_type="nf4", device="meta",
                    )
                    replacement.weight = bnb.nn.Params4bit(
                        weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=replacement
                    ).to(device)  # quantizes on the way
                else:
                    replacement = torch.nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
                    replacement.weight = torch.nn.Parameter(weight, requires_grad=False)
                setattr(block, name, replacement)
                del weight
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = torch.nn.Parameter(torch.ones(config.hidden_size, device=device, dtype=compute_dtype))
    model.model.norm.weight = torch.nn.Parameter(torch.ones(config.hidden_size, device=device, dtype=compute_dtype))
    model.model.embed_tokens.weight = torch.nn.Parameter(random_matrix(config.vocab_size, config.hidden_size))
    model.lm_head.weight = torch.nn.Parameter(random_matrix(config.vocab_size, config.hidden_size))
    with torch.device(device):  # its inv_freq buffer was computed on meta: build it again for real
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"tensors left on the meta device: {left_on_meta[:3]}")
    if quantize:
        # What from_pretrained(quantization_config=...) marks: peft and the Trainer key their 4-bit handling on it.
        model.is_loaded_in_4bit = True
        model.quantization_method = "bitsandbytes"
    return model


class RandomBlocks:
    """Seeded random token blocks, identical for every recipe (labels = inputs, as the stage packs them)."""

    def __init__(self, count: int, seq_len: int, vocab_size: int, seed: int):
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (count, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return {"input_ids": self.ids[index], "labels": self.ids[index].clone()}


# ---- one cell: one recipe at one sequence length, in its own process --------------------------------------

def stage_settings(seq_len: int, max_steps: int, optimizer: str, batch_size: int, gpus: int = 1):
    """The fields of pipeline.config.TrainConfig the stage's model, trainer and launcher read, at the QLoRA
    recipe; one micro-batch per GPU and step, so the global batch grows with the GPUs (same per-GPU batch)."""
    return SimpleNamespace(
        max_steps=max_steps, save_steps=10**9, save_total_limit=2, seq_len=seq_len, batch_size=batch_size,
        grad_accum=gpus, recipe="fast", num_gpus=gpus, distributed="ddp",
        learning_rate=1e-4, warmup_ratio=0.03, max_grad_norm=0.3, optimizer=optimizer, gradient_checkpointing=True,
        eval_steps=None,  # no held-out evaluation: the cells time training steps only
        data=SimpleNamespace(seed=0),
        lora=SimpleNamespace(r=64, alpha=16, dropout=0.05, target_modules=TARGETS),
    )


def plain_trainer(model, dataset, seq_len: int, max_steps: int, out_dir: str, cuda: bool, optimizer: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=1e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=0.03, max_grad_norm=0.3,
        optim=optimizer, bf16=cuda, use_cpu=not cuda, seed=0, logging_steps=1, save_strategy="no",
        report_to="none", remove_unused_columns=False,
    )
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)


def run_cell(recipe: str, seq_len: int, batch: int, quick: bool, cpu: bool, cap_gib: float, warmup: int,
             steps: int) -> dict:
    import torch
    from transformers import TrainerCallback

    cuda = not cpu
    gpus = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 when started by the scaling mode's launcher
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device)
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    optimizer = "paged_adamw_32bit" if cuda else "adamw_torch"
    shape = SHAPE_QUICK if quick else SHAPE_22B

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def _sync(self):
            if cuda:
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.times.append(time.perf_counter() - self.start)

    result = {"recipe": recipe, "seq": seq_len, "batch": batch, "gpus": gpus, "rank": rank, "status": "ok"}
    clock = StepClock()
    build_start = time.perf_counter()
    try:
        model = build_random_nf4_llama(shape, seed=0, device=device, compute_dtype=compute_dtype)
        result["build_s"] = round(time.perf_counter() - build_start, 1)
        dataset = RandomBlocks((warmup + steps) * batch * gpus, seq_len, shape["vocab_size"], seed=0)
        torch.manual_seed(0)  # the LoRA initialization: the same for both recipes
        with tempfile.TemporaryDirectory() as out_dir:
            if recipe == "stage":
                from train.model import prepare_for_training
                from train.trainer import build_trainer

                settings = stage_settings(seq_len, warmup + steps, optimizer, batch, gpus)
                model = prepare_for_training(model, settings.lora, settings.gradient_checkpointing, settings.recipe)
                trainer = build_trainer(model, dataset, settings, Path(out_dir), seed=0, device=device)
            else:
                trainer = plain_trainer(model, dataset, seq_len, warmup + steps, out_dir, cuda, optimizer)
            trainer.add_callback(clock)
            trainer.train()
        timed = clock.times[warmup:]
        result["step_s"] = round(statistics.mean(timed), 3)
        result["tokens_per_s"] = round(gpus * batch * seq_len / statistics.mean(timed), 1)  # all GPUs' tokens
        result["losses"] = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    except (torch.OutOfMemoryError, RuntimeError) as err:  # bitsandbytes reports some OOMs as RuntimeError
        if "out of memory" not in str(err).lower():
            raise
        result["status"] = "out of memory"
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return result


# ---- the driver: every cell in a subprocess, then the table ----------------------------------------------

def launcher_command(gpus: int, folder: str) -> list[str]:
    """accelerate launch with the accelerate config the train stage writes for `gpus` DDP processes."""
    import yaml

    from train.launch import accelerate_config

    config_file = Path(folder) / "accelerate_config.yaml"
    config_file.write_text(yaml.safe_dump(accelerate_config(SimpleNamespace(num_gpus=gpus, distributed="ddp"))))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]


def run_cell_subprocess(recipe: str, seq_len: int, batch: int, args: argparse.Namespace, gpus: int = 1) -> dict:
    command = [__file__, "--worker", recipe, str(seq_len), str(batch), "--cap-gib", str(args.cap_gib),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
    command += ["--quick"] if args.quick else []
    command += ["--cpu"] if args.cpu else []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not args.cpu:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        if gpus > 1:
            command = [*launcher_command(gpus, folder), *command]
        else:
            command = [sys.executable, *command]
            if not args.cpu:  # one process, one GPU: with more visible the HF Trainer would run DataParallel
                env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        try:
            process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.cell_timeout)
        except subprocess.TimeoutExpired:
            process = None
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)] if process else []
    if lines:
        result = json.loads(lines[-1][len(RESULT):])
    elif process is None:
        result = {"recipe": recipe, "seq": seq_len, "batch": batch,
                  "status": f"timed out after {args.cell_timeout} s"}
    else:
        tail = (process.stderr or process.stdout).strip().splitlines()[-1:] or ["no output"]
        status = "out of memory" if "out of memory" in process.stderr.lower() else f"crashed: {tail[0][:120]}"
        result = {"recipe": recipe, "seq": seq_len, "batch": batch, "status": status}
    result["gpus"] = gpus
    result["wall_s"] = round(time.perf_counter() - started, 1)
    on_gpus = f" on {gpus} {'CPU processes' if args.cpu else 'GPUs'}" if args.num_gpus > 1 else ""
    print(f"[train_bench] {recipe} seq {seq_len} batch {batch}{on_gpus}: {result.get('status')} "
          f"{result.get('tokens_per_s', '-')} tok/s, peak {result.get('peak_allocated_gib', '-')} GiB "
          f"({result['wall_s']} s)", flush=True)
    return result


def format_table(results: list[dict]) -> str:
    header = ("| recipe | seq | micro-batch | tokens/s | step s | peak allocated GiB | peak reserved GiB | status "
              "| losses |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        losses = ", ".join(f"{x:.4f}" for x in r.get("losses", [])[:5])
        lines.append(f"| {r['recipe']} | {r['seq']} | {r['batch']} | {r.get('tokens_per_s', '-')} | "
                     f"{r.get('step_s', '-')} | "
                     f"{r.get('peak_allocated_gib', '-')} | {r.get('peak_reserved_gib', '-')} | {r['status']} | "
                     f"{losses} |")
    return "\n".join(lines)


def loss_agreement(results: list[dict], seq: int) -> str:
    """Largest |loss difference| between plain and stage at micro-batch 1: same weights, data and LoRA init."""
    cell = {(r["recipe"], r["seq"], r["batch"]): r for r in results if r["status"] == "ok"}
    plain, stage = cell.get(("plain", seq, 1)), cell.get(("stage", seq, 1))
    if not (plain and stage):
        return f"seq {seq}: no loss comparison (a micro-batch-1 cell is missing or failed)"
    pairs = list(zip(plain["losses"], stage["losses"], strict=False))
    worst = max(abs(a - b) for a, b in pairs)
    return f"seq {seq}: first {len(pairs)} losses plain vs stage differ by at most {worst:.4f}"


def summary_line(results: list[dict], short_seq: int, long_seq: int) -> str:
    ok = [r for r in results if r["status"] == "ok"]
    plain = next((r for r in ok if r["recipe"] == "plain" and r["seq"] == short_seq), None)
    stage = max((r for r in ok if r["recipe"] == "stage" and r["seq"] == short_seq),
                key=lambda r: r["tokens_per_s"], default=None)
    speedup = f"{stage['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if plain and stage else "n/a"
    long = next((r for r in results if r["recipe"] == "stage" and r["seq"] == long_seq), {})
    fits = "yes" if long.get("status") == "ok" else "no"
    peak = long.get("peak_allocated_gib")
    peak_text = f"{peak:.1f} GiB" if isinstance(peak, (int, float)) else "n/a"
    return f"train_bench: seq{short_seq} speedup {speedup} vs plain; seq{long_seq} fits {fits} (peak {peak_text})"


def format_scaling_table(results: list[dict]) -> str:
    lines = ["| GPUs | seq | micro-batch per GPU | tokens/s (all GPUs) | step s | peak allocated GiB (GPU 0) "
             "| status |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['gpus']} | {r['seq']} | {r['batch']} | {r.get('tokens_per_s', '-')} | "
                     f"{r.get('step_s', '-')} | {r.get('peak_allocated_gib', '-')} | {r['status']} |")
    return "\n".join(lines)


def scaling_line(results: list[dict], gpus: int) -> str:
    """tokens/s on `gpus` GPUs over tokens/s on one, same per-GPU micro-batch: the data-parallel scaling."""
    speed = {r["gpus"]: r["tokens_per_s"] for r in results if r["status"] == "ok"}
    ratio = f"{speed[gpus] / speed[1]:.2f}x" if gpus in speed and 1 in speed else "n/a"
    return f"train_bench: {gpus}-GPU scaling {ratio} vs 1 GPU (data-parallel)"


def run_scaling(args: argparse.Namespace) -> list[dict]:
    """The stage's recipe on 1 GPU, then on `args.num_gpus`, at the shortest seq and micro-batch --stage-batch."""
    seq = (args.seq or [256 if args.quick else 2048])[0]
    shape = SHAPE_QUICK if args.quick else SHAPE_22B
    print(f"[train_bench] data-parallel scaling: shape {shape}, seq {seq}, micro-batch {args.stage_batch} per "
          f"{'CPU process' if args.cpu else 'GPU'}, cap {args.cap_gib} GiB per GPU, {args.warmup} warm-up + "
          f"{args.steps} timed steps, LoRA r=64 on {len(TARGETS)} projections", flush=True)
    results = [run_cell_subprocess("stage", seq, args.stage_batch, args, gpus) for gpus in (1, args.num_gpus)]
    print()
    print(format_scaling_table(results))
    print()
    print(scaling_line(results, args.num_gpus) + (" [CPU processes: a check of the script, not a measurement]"
                                                   if args.cpu else ""))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape and short sequences (checks the script)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (fp32, adamw_torch, no cap): script check only")
    parser.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default 2048 4096; quick: 256 512)")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--cap-gib", type=float, default=23.0, help="GPU memory cap per process (a 24 GB card)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--cell-timeout", type=int, default=300,
                        help="seconds per (recipe, seq) subprocess (4 cells must fit a 10-minute device call)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--stage-batch", type=int, default=2,
                        help="also time the stage at this micro-batch at the shortest seq (what the 22b configs use)")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="measure data-parallel scaling from 1 to this many GPUs instead (the stage's recipe)")
    parser.add_argument("--worker", nargs=3, metavar=("RECIPE", "SEQ", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        recipe, seq, batch = args.worker
        result = run_cell(recipe, int(seq), int(batch), args.quick, args.cpu, args.cap_gib, args.warmup, args.steps)
        if result["rank"] == 0:
            print(RESULT + json.dumps(result), flush=True)
        if result["gpus"] > 1:  # as the stage's workers do: a process group's destructor can hang on exit
            sys.stdout.flush()
            os._exit(0)
        return

    if args.num_gpus > 1:
        results = run_scaling(args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return

    seqs = args.seq or ([256, 512] if args.quick else [2048, 4096])
    shape = SHAPE_QUICK if args.quick else SHAPE_22B
    print(f"[train_bench] shape {shape}, seqs {seqs}, cap {args.cap_gib} GiB, {args.warmup} warm-up + "
          f"{args.steps} timed steps, LoRA r=64 on {len(TARGETS)} projections", flush=True)
    cells = [(recipe, seq, 1) for seq in seqs for recipe in args.recipes]
    if "stage" in args.recipes and args.stage_batch > 1:
        cells.insert(len(args.recipes), ("stage", seqs[0], args.stage_batch))
    results = [run_cell_subprocess(recipe, seq, batch, args) for recipe, seq, batch in cells]
    print()
    print(format_table(results))
    print()
    print(loss_agreement(results, seqs[0]))
    print(summary_line(results, seqs[0], seqs[-1]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
