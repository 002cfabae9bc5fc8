"""Train-step speed and memory of the train stage against the plain QLoRA recipe, at equal terms, 24 GB budget.

Builds a random-init Llama of the llama2-22b shape (40 layers, hidden 6656, 52 heads, intermediate 17920,
vocab 32000; `--layers 60` gives the Llama-1-33b shape) directly in NF4 on the GPU, one linear at a time (never
the bf16 weights), caps the process at 23.0 GiB with torch.cuda.set_per_process_memory_fraction (a 24 GB card),
and times train steps for three recipes on identical weights, data, LoRA init and micro-batch:

- `plain`: transformers + peft as the QLoRA recipe is usually written: prepare_model_for_kbit_training (which
  upcasts embeddings, lm_head and norms to fp32), LoRA r=64 on all seven projections, paged AdamW 32-bit,
  gradient checkpointing, bf16 autocast, the HF Trainer;
- `plain+liger`: the same with `use_liger_kernel=True` (liger's RoPE, RMSNorm, SwiGLU and fused linear
  cross-entropy), what an informed user of the HF Trainer runs;
- `stage`: the train stage's own code path (train.model.prepare_for_training + train.trainer.build_trainer) on a
  real `pipeline.config.TrainConfig` (the schema's defaults, `--set train.KEY=VALUE` on top);
  `--variant NAME=train.KEY=VALUE[,...]` adds stage cells with other settings (a `train.fast.*` lever off, say),
  validated by the same schema as a run config before any cell starts.

Every seq runs at one micro-batch for all recipes (`--batch`, default 2 at the shorter seq and 1 at the longer):
the ratio is at equal terms. Each cell runs in its own subprocess, so an out-of-memory cell cannot poison the next
and every peak is that cell's own. Steps hold one micro-batch each; a few warm-up steps, then timed steps, each
split (CUDA-synchronized) into the micro-batch's forward and backward and the optimizer update. tokens/s is given
for a step of `--sequences-per-step` sequences (16, QLoRA's batch and the 22b configs' 2 x 8): that many
micro-batches and one update, from the two measured times (the measured one-micro-batch-per-step figure is in the
table too). The table also has the ratio to plain, the utilisation (model FLOPs / 790 TFLOP/s, see
`model_flops_per_token`), peak allocated/reserved memory and the first losses (same seed, data and dropout masks
where the kernels allow: they should agree within bf16 noise; plain+liger against plain shows what that noise is).
Paged-optimizer state lives in CUDA unified memory and is not in the allocator's peak.

`--profile` profiles one step of one cell instead (benchmarks/step_profile.py): GPU time by kind, device-to-host
copies, host reads and synchronizations with the call chains that issue them.

`--num-gpus N` measures data-parallel scaling instead: the stage's recipe at the first seq and micro-batch, on one
GPU and then on N GPUs of this machine, launched the way the stage launches them (accelerate launch with
train/launch.py's config, DDP, each GPU capped at `--cap-gib`); tokens/s is measured (one micro-batch per GPU and
step) and counts the tokens of all GPUs, and the run ends with `train_bench: N-GPU scaling X.XXx vs 1 GPU`.

Needs torch, transformers, peft, accelerate, bitsandbytes, pydantic (the stage's config) and, for plain+liger and
the stage's fused cross-entropy, liger-kernel.

    python benchmarks/train_bench.py                 # 22b shape, seq 2048 (micro-batch 2) and 4096 (micro-batch 1)
    python benchmarks/train_bench.py --variant full=train.fast.checkpointing=full      # and one lever off
    python benchmarks/train_bench.py --layers 60 --seq 2048 4096 --batch 1 1 --recipes stage \
        --set train.fast.checkpointing=offload --lora-r 64                            # the 33b shape
    python benchmarks/train_bench.py --profile --layers 8 --seq 2048 --batch 2        # one profiled stage step
    python benchmarks/train_bench.py --quick --cpu   # tiny shape on CPU (adamw_torch, fp32, no cap): checks the script
    python benchmarks/train_bench.py --num-gpus 2    # 22b shape, seq 2048, micro-batch 2: 1 GPU vs 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE_22B = {"num_hidden_layers": 40, "hidden_size": 6656, "num_attention_heads": 52, "num_key_value_heads": 52,
             "intermediate_size": 17920, "vocab_size": 32000}
SHAPE_QUICK = {"num_hidden_layers": 2, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8,
               "intermediate_size": 1408, "vocab_size": 32000}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = ("plain", "plain+liger", "stage")
RESULT = "RESULT "
PEAK_TFLOPS = 790.0  # bf16 matmul rate measured on the lent H200 (8192^3 products on random data)


@dataclass
class Cell:
    """One measurement: a recipe (and, for the stage, a named variant of its train settings) at one shape."""

    recipe: str
    seq: int
    batch: int
    variant: str = ""  # "" is the stage's default train settings
    sets: list[str] = field(default_factory=list)  # dotted train-config overrides of the variant
    gpus: int = 1

    @property
    def name(self) -> str:
        return f"{self.recipe}[{self.variant}]" if self.variant else self.recipe


def bench_shape(args: argparse.Namespace) -> dict:
    shape = dict(SHAPE_QUICK if args.quick else SHAPE_22B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    return shape


def model_flops_per_token(shape: dict, seq: int, lora_r: int) -> float:
    """FLOPs one trained token costs with full activation checkpointing, whatever the recipe does to get there.

    Frozen decoder linears: 6N (forward 2N, recompute 2N, input-gradient backward 2N; no weight gradient). lm_head:
    4N (forward and input gradient; it is outside the checkpointed layers). LoRA: 8N (forward, recompute, input and
    weight gradients). Causal attention scores and values: 2 * seq * hidden per layer and pass, four passes' worth
    (forward, recompute, a backward of twice the forward). Norms, activations and the optimizer are not counted.
    """
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    decoder = layers * (2 * d * d + 2 * d * kv + 3 * d * f)
    lora = layers * lora_r * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
    attention = layers * 2 * seq * d
    return 6 * decoder + 4 * shape["vocab_size"] * d + 8 * lora + 4 * attention


def tokens_per_second(cell: Cell, micro_batch_s: float, update_s: float, sequences_per_step: int) -> float:
    """Tokens/s of an optimizer step of `sequences_per_step` sequences: micro-batches, then one update.

    The bench times steps of one micro-batch each, so every step pays a whole optimizer update (paged AdamW over
    all LoRA weights, with a synchronization per matrix); a run accumulates 16 sequences per update (QLoRA's batch,
    the 22b configs' 2 x 8). Both times are measured in the cell; this is what a step of the run costs.
    """
    micro_batches = max(1, sequences_per_step // (cell.batch * cell.gpus))
    tokens = micro_batches * cell.batch * cell.gpus * cell.seq
    return tokens / (micro_batches * micro_batch_s + update_s)


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


# ---- one cell, in its own process ------------------------------------------------------------------------

def stage_train_config(cell: Cell, steps: int, lora_r: int):
    """The stage's TrainConfig for a cell: the schema's defaults (the QLoRA recipe) at the cell's shape.

    One micro-batch per GPU and step, so the global batch grows with the GPUs (the same per-GPU work); checkpoints
    never come due. The variant's overrides go through the same parsing and validation as a run config's --set.
    """
    from pipeline.config import apply_override, validate_config
    from pipeline.errors import UserError

    raw = {"run_dir": "unused", "train": {"max_steps": steps, "save_steps": steps + 1, "seq_len": cell.seq,
                                          "batch_size": cell.batch, "grad_accum": cell.gpus, "num_gpus": cell.gpus,
                                          "lora": {"r": lora_r},
                                          "eval_steps": None}}  # no held-out evaluation: the cells time training
    for assignment in cell.sets:
        if not assignment.startswith("train."):
            raise UserError(f"--variant {cell.variant}: {assignment!r} is not a train.* setting")
        apply_override(raw, assignment)
    return validate_config(raw, source=f"--variant {cell.variant or 'default'}").train


def plain_trainer(model, dataset, cell: Cell, steps: int, lora_r: int, out_dir: str, cuda: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=cell.batch, gradient_accumulation_steps=1,
        learning_rate=1e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=0.03, max_grad_norm=0.3,
        optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda, seed=0, data_seed=0,
        logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
        use_liger_kernel=cell.recipe == "plain+liger",
    )
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)


class LeverLog(logging.Handler):
    """Keeps the stage's "fast recipe on CUDA: ..." line, so each result says which levers ran."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.levers = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "fast recipe" in message:
            self.levers = message.split(": ", 2)[-1]


def run_cell(cell: Cell, args: argparse.Namespace) -> dict:
    import torch
    from transformers import TrainerCallback

    cuda = not args.cpu
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    shape = bench_shape(args)
    steps = args.warmup + args.steps + (1 if args.profile else 0)

    class StepClock(TrainerCallback):
        """Per step: the micro-batch (forward and backward) and the optimizer update, each CUDA-synchronized."""

        def __init__(self):
            self.micro: list[float] = []
            self.update: list[float] = []

        def _now(self):
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = self._now()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.before_update = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            end = self._now()
            self.micro.append(self.before_update - self.start)
            self.update.append(end - self.before_update)

    result = {**asdict(cell), "name": cell.name, "rank": rank, "status": "ok"}
    clock, levers = StepClock(), LeverLog()
    logging.getLogger("train").addHandler(levers)
    logging.getLogger("train").setLevel(logging.INFO)
    build_start = time.perf_counter()
    try:
        model = build_random_nf4_llama(shape, seed=0, device=device, compute_dtype=compute_dtype)
        result["build_s"] = round(time.perf_counter() - build_start, 1)
        dataset = RandomBlocks(steps * cell.batch * cell.gpus, cell.seq, shape["vocab_size"], seed=0)
        torch.manual_seed(0)  # the LoRA initialization: the same for every recipe
        with tempfile.TemporaryDirectory() as out_dir:
            if cell.recipe == "stage":
                from train.model import prepare_for_training
                from train.trainer import build_trainer

                train = stage_train_config(cell, steps, args.lora_r)
                model = prepare_for_training(model, train.lora, train.gradient_checkpointing, train.recipe,
                                             fast=train.fast)
                trainer = build_trainer(model, dataset, train, Path(out_dir), seed=0, device=device)
            else:
                trainer = plain_trainer(model, dataset, cell, steps, args.lora_r, out_dir, cuda)
            trainer.add_callback(clock)
            profiler = None
            if args.profile:
                from benchmarks.step_profile import ProfileOneStep

                profiler = ProfileOneStep(step=args.warmup, cuda=cuda)
                trainer.add_callback(profiler)
            trainer.train()
        timed = [i for i in range(len(clock.micro)) if i >= args.warmup and not (args.profile and i == args.warmup)]
        micro = statistics.mean(clock.micro[i] for i in timed)
        update = statistics.mean(clock.update[i] for i in timed)
        result["micro_batch_s"], result["update_s"] = round(micro, 3), round(update, 3)
        result["step_s"] = round(micro + update, 3)
        result["tokens_per_s_measured"] = round(cell.gpus * cell.batch * cell.seq / (micro + update), 1)  # all GPUs
        result["tokens_per_s"] = round(tokens_per_second(cell, micro, update, args.sequences_per_step), 1)
        result["losses"] = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
        result["levers"] = levers.levers
        if profiler is not None:
            result["profile"] = profiler.summary
    except (torch.OutOfMemoryError, RuntimeError) as err:  # bitsandbytes reports some OOMs as RuntimeError
        if "out of memory" not in str(err).lower():
            raise
        result["status"] = "out of memory"
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        host_stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
        pinned = host_stats.get("allocated_bytes.peak")
        if pinned is not None:  # the offloaded activations' host RAM (torch's pinned allocator; paged state is not)
            result["pinned_host_gib"] = round(pinned / 2**30, 2)
    return result


# ---- the driver: every cell in a subprocess, then the table ----------------------------------------------

def launcher_command(gpus: int, folder: str) -> list[str]:
    """accelerate launch with the accelerate config the train stage writes for `gpus` DDP processes."""
    import yaml

    from pipeline.config import TrainConfig
    from train.launch import accelerate_config

    config_file = Path(folder) / "accelerate_config.yaml"
    config_file.write_text(yaml.safe_dump(accelerate_config(TrainConfig(num_gpus=gpus, distributed="ddp"))))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]


def worker_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--cap-gib", str(args.cap_gib), "--warmup", str(args.warmup), "--steps", str(args.steps),
             "--lora-r", str(args.lora_r)]
    flags += ["--layers", str(args.layers)] if args.layers else []
    return flags + [flag for flag in ("--quick", "--cpu", "--profile") if getattr(args, flag[2:])]


def run_cell_subprocess(cell: Cell, args: argparse.Namespace) -> dict:
    if cell.recipe == "plain+liger" and args.cpu:
        return {**asdict(cell), "name": cell.name, "status": "skipped (liger-kernel needs CUDA)"}
    command = [__file__, "--worker", json.dumps(asdict(cell)), *worker_flags(args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not args.cpu:  # every recipe's cell under the allocator setting the train command makes
        from train.world import grow_cuda_memory_in_place

        grow_cuda_memory_in_place(env)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        if cell.gpus > 1:
            command = [*launcher_command(cell.gpus, folder), *command]
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
        result = {**asdict(cell), "status": f"timed out after {args.cell_timeout} s"}
    else:
        tail = (process.stderr or process.stdout).strip().splitlines() or ["no output"]
        status = "out of memory" if "out of memory" in process.stderr.lower() else f"crashed: {tail[-1][:160]}"
        result = {**asdict(cell), "status": status}
        if status.startswith("crashed"):  # one device call must be enough to see why
            print("\n".join(f"[train_bench]   {line[:300]}" for line in tail[-25:]), flush=True)
    result["name"] = cell.name
    result["wall_s"] = round(time.perf_counter() - started, 1)
    on_gpus = f" on {cell.gpus} {'CPU processes' if args.cpu else 'GPUs'}" if args.num_gpus > 1 else ""
    print(f"[train_bench] {cell.name} seq {cell.seq} micro-batch {cell.batch}{on_gpus}: {result.get('status')} "
          f"{result.get('tokens_per_s', '-')} tok/s, peak {result.get('peak_allocated_gib', '-')} GiB "
          f"({result['wall_s']} s){' levers: ' + result['levers'] if result.get('levers') else ''}", flush=True)
    return result


def baseline(results: list[dict], r: dict, recipe: str) -> dict | None:
    """The `recipe` cell at r's seq and micro-batch, if it ran."""
    return next((b for b in results if b["recipe"] == recipe and not b.get("variant") and b["seq"] == r["seq"]
                 and b["batch"] == r["batch"] and b["status"] == "ok"), None)


def utilisation(r: dict, shape: dict, lora_r: int) -> float:
    return r["tokens_per_s"] * model_flops_per_token(shape, r["seq"], lora_r) / (PEAK_TFLOPS * 1e12)


def format_table(results: list[dict], shape: dict, lora_r: int, sequences_per_step: int) -> str:
    lines = [f"| recipe | seq | micro-batch | tokens/s ({sequences_per_step} seq/step) | vs plain | utilisation "
             "| micro-batch s | update s | tokens/s (1 micro-batch/step) | peak allocated GiB | peak reserved GiB "
             "| pinned host GiB | status | first losses |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = r["status"] == "ok"
        plain = baseline(results, r, "plain") if ok else None
        ratio = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if plain else "-"
        mfu = f"{100 * utilisation(r, shape, lora_r):.1f}%" if ok and "peak_allocated_gib" in r else "-"  # GPU only
        losses = ", ".join(f"{x:.4f}" for x in r.get("losses", [])[:6])
        lines.append(f"| {r['name']} | {r['seq']} | {r['batch']} | {r.get('tokens_per_s', '-')} | {ratio} | {mfu} | "
                     f"{r.get('micro_batch_s', '-')} | {r.get('update_s', '-')} | "
                     f"{r.get('tokens_per_s_measured', '-')} | {r.get('peak_allocated_gib', '-')} | "
                     f"{r.get('peak_reserved_gib', '-')} | {r.get('pinned_host_gib', '-')} | {r['status']} | "
                     f"{losses} |")
    return "\n".join(lines)


def loss_agreement(results: list[dict]) -> list[str]:
    """Largest |loss difference| of each cell from plain's at its seq and micro-batch (same weights, data, init).

    plain+liger against plain is the yardstick: the same math through other kernels, so its difference is what
    bf16 rounding and dropout's random streams alone produce.
    """
    lines = []
    for r in results:
        plain = baseline(results, r, "plain") if r["status"] == "ok" and r["recipe"] != "plain" else None
        if plain:
            pairs = list(zip(plain["losses"], r["losses"], strict=False))
            worst = max(abs(a - b) for a, b in pairs)
            lines.append(f"seq {r['seq']} micro-batch {r['batch']}: first {len(pairs)} losses of {r['name']} vs plain "
                         f"differ by at most {worst:.4f}")
    return lines


def speedup_line(results: list[dict], seqs: list[int], key: str = "tokens_per_s") -> str:
    """The stage (default settings) over plain and over plain+liger, each at the stage cell's seq and micro-batch."""
    versus: dict[str, list[str]] = {"plain": [], "plain+liger": []}
    for seq in seqs:
        stage = next((r for r in results if r["recipe"] == "stage" and not r.get("variant") and r["seq"] == seq
                      and r["status"] == "ok"), None)
        for recipe, ratios in versus.items():
            base = baseline(results, stage, recipe) if stage else None
            ratios.append(f"{stage[key] / base[key]:.2f}x" if base else "n/a")
    plain = ", ".join(f"seq{seq} {ratio}" for seq, ratio in zip(seqs, versus["plain"], strict=True))
    return (f"train_bench: equal micro-batch speedup {plain} vs plain "
            f"(vs plain+liger {', '.join(versus['plain+liger'])})")


def shape_lines(results: list[dict], shape: dict, lora_r: int) -> list[str]:
    """One `fits` line per stage cell of a deeper-than-22b shape (the 33b shape is 60 layers of the 22b widths)."""
    layers = shape["num_hidden_layers"]
    label = "33b shape" if layers == 60 and shape["hidden_size"] == 6656 else f"{layers}-layer shape"
    lines = []
    for r in results:
        if r["recipe"] != "stage":
            continue
        fits = "yes" if r["status"] == "ok" else "no"
        peak = r.get("peak_allocated_gib", "n/a")
        speed = f", {r['tokens_per_s']:.0f} tok/s" if r["status"] == "ok" else f", {r['status']}"
        variant = f" [{r['variant']}]" if r.get("variant") else ""
        lines.append(f"train_bench: {label} ({layers} layers) seq{r['seq']}{variant} fits {fits} "
                     f"(peak {peak} GiB, r={lora_r}{speed})")
    return lines


def format_scaling_table(results: list[dict]) -> str:
    lines = ["| GPUs | seq | micro-batch per GPU | tokens/s (all GPUs) | step s | peak allocated GiB (GPU 0) "
             "| status |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['gpus']} | {r['seq']} | {r['batch']} | {r.get('tokens_per_s_measured', '-')} | "
                     f"{r.get('step_s', '-')} | {r.get('peak_allocated_gib', '-')} | {r['status']} |")
    return "\n".join(lines)


def scaling_line(results: list[dict], gpus: int) -> str:
    """tokens/s on `gpus` GPUs over tokens/s on one, same per-GPU micro-batch: the data-parallel scaling."""
    speed = {r["gpus"]: r["tokens_per_s_measured"] for r in results if r["status"] == "ok"}
    ratio = f"{speed[gpus] / speed[1]:.2f}x" if gpus in speed and 1 in speed else "n/a"
    return f"train_bench: {gpus}-GPU scaling {ratio} vs 1 GPU (data-parallel)"


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """NAME=train.key=value[,train.key=value...] -> (NAME, [assignments])."""
    name, sep, sets = spec.partition("=")
    if not sep or not name or not sets:
        raise argparse.ArgumentTypeError(f"--variant {spec!r}: expected NAME=train.key=value[,train.key=value]")
    return name, sets.split(",")


def planned_cells(args: argparse.Namespace, seqs: list[int], batches: list[int]) -> list[Cell]:
    """Per seq: each recipe at that seq's micro-batch, then each stage variant; --profile: one cell only.

    Every stage cell takes --set's settings first, a variant's own after them."""
    def recipe_cell(recipe: str, seq: int, batch: int) -> Cell:
        return Cell(recipe, seq, batch, sets=list(args.set) if recipe == "stage" else [])

    if args.profile:
        name, sets = args.variant[0] if args.variant else ("", [])
        cell = recipe_cell(args.recipes[0], seqs[0], batches[0])
        return [Cell(cell.recipe, cell.seq, cell.batch, name, cell.sets + sets)]
    cells = []
    for seq, batch in zip(seqs, batches, strict=True):
        cells += [recipe_cell(recipe, seq, batch) for recipe in args.recipes]
        if args.variant_seq is None or seq in args.variant_seq:
            cells += [Cell("stage", seq, batch, name, [*args.set, *sets]) for name, sets in args.variant]
    return cells


def run_scaling(args: argparse.Namespace, seq: int, batch: int) -> list[dict]:
    """The stage's recipe on 1 GPU, then on `args.num_gpus`, at the first seq and micro-batch."""
    print(f"[train_bench] data-parallel scaling: shape {bench_shape(args)}, seq {seq}, micro-batch {batch} per "
          f"{'CPU process' if args.cpu else 'GPU'}, cap {args.cap_gib} GiB per GPU, {args.warmup} warm-up + "
          f"{args.steps} timed steps, LoRA r={args.lora_r} on {len(TARGETS)} projections", flush=True)
    results = [run_cell_subprocess(Cell("stage", seq, batch, gpus=gpus), args) for gpus in (1, args.num_gpus)]
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
    parser.add_argument("--batch", type=int, nargs="+",
                        help="micro-batch per seq, the same for every recipe (default 2 then 1 for longer seqs)")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES,
                        help="default: all three; with --profile the stage")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=SETTINGS",
                        help="also time the stage with these train settings, e.g. sac=train.fast.saved_layers=8")
    parser.add_argument("--variant-seq", type=int, nargs="+", help="run the variants at these seqs only (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                        help="a train setting for every stage cell, as the stage's --set (repeatable)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 40, the 22b; 60 is the 33b shape)")
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank for every recipe (QLoRA's 64)")
    parser.add_argument("--sequences-per-step", type=int, default=16,
                        help="sequences per optimizer step that tokens/s is given for (QLoRA's 16; the update's "
                             "measured time is spread over them)")
    parser.add_argument("--cap-gib", type=float, default=23.0, help="GPU memory cap per process (a 24 GB card)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--cell-timeout", type=int, default=300, help="seconds per cell's subprocess")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step after the warm-up of one cell (the first recipe, seq and variant)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="measure data-parallel scaling from 1 to this many GPUs instead (the stage's recipe)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        cell = Cell(**json.loads(args.worker))
        result = run_cell(cell, args)
        if result["rank"] == 0:
            print(RESULT + json.dumps(result), flush=True)
        if cell.gpus > 1:  # as the stage's workers do: a process group's destructor can hang on exit
            sys.stdout.flush()
            os._exit(0)
        return

    args.recipes = args.recipes or (["stage"] if args.profile else list(RECIPES))
    seqs = args.seq or ([256, 512] if args.quick else [2048, 4096])
    batches = args.batch or [2 if i == 0 and len(seqs) > 1 else 1 for i in range(len(seqs))]
    if len(batches) != len(seqs):
        parser.error(f"--batch gives {len(batches)} micro-batches for {len(seqs)} sequence lengths")
    for name, sets in [("", []), *args.variant]:  # a typo fails here, before any cell is started
        stage_train_config(Cell("stage", seqs[0], batches[0], name, [*args.set, *sets]), 1, args.lora_r)
    if args.num_gpus > 1:
        results = run_scaling(args, seqs[0], batches[0])
    else:
        shape = bench_shape(args)
        print(f"[train_bench] shape {shape}, seqs {seqs} at micro-batches {batches}, cap {args.cap_gib} GiB, "
              f"{args.warmup} warm-up + {args.steps} timed steps, LoRA r={args.lora_r} on {len(TARGETS)} projections",
              flush=True)
        fast = stage_train_config(Cell("stage", seqs[0], batches[0], sets=list(args.set)), 1, args.lora_r).fast
        variants = "; ".join(f"{name}: {', '.join(sets)}" for name, sets in args.variant) or "none"
        print(f"[train_bench] stage: train.fast {fast.model_dump()} (--set {args.set or 'none'}); variants: {variants}",
              flush=True)
        results = []
        for cell in planned_cells(args, seqs, batches):
            results.append(run_cell_subprocess(cell, args))
            if args.json:  # after every cell: a device call cut short still brings back the cells it finished
                args.json.write_text(json.dumps(results, indent=2) + "\n")
        print()
        if args.profile:
            from benchmarks.step_profile import format_summary

            r = results[0]
            print(format_summary(r["profile"], f"{r['name']} seq {r['seq']} micro-batch {r['batch']}")
                  if r.get("profile") else f"train_bench profile: no profile ({r['status']})")
        else:
            print(format_table(results, shape, args.lora_r, args.sequences_per_step))
            print()
            print("\n".join(loss_agreement(results)))
            if "stage" in args.recipes and "plain" in args.recipes:
                print(speedup_line(results, seqs, "tokens_per_s_measured").replace(
                    "train_bench: equal micro-batch speedup", "(one micro-batch per optimizer step:") + ")")
                print(speedup_line(results, seqs))
            if shape["num_hidden_layers"] != (SHAPE_QUICK if args.quick else SHAPE_22B)["num_hidden_layers"]:
                print("\n".join(shape_lines(results, shape, args.lora_r)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
