"""The rehearsal's table: what each stage took at K layers, and the same extrapolated to the full depth.

Measured: wall time (the stage's processes, from the meter's start and end stamps), peak CUDA memory allocated
(the meter's torch.cuda.max_memory_allocated), peak resident memory (the larger of the meter's ru_maxrss and the
tree watch) and disk (the files the stage left). Extrapolated (estimates):

- disk: the tensors under `model.layers.*` of every model folder the stage wrote, and its LoRA checkpoints, are
  per-layer bytes; the rest is fixed: full = fixed + per-layer / K x layers;
- GPU: train adds pipeline/sizing.py's per-layer training terms (NF4 weights, LoRA, checkpointed activations) for
  each missing layer; eval swaps the weights it put on the GPU at K layers for those eval's placement would put
  there at full depth under the same cap (the rest goes to RAM), plus the probe's KV cache per layer;
- RAM: surgery and train stream (fixed); eval adds what placement would keep in CPU RAM at full depth;
- wall: scaled by the parameter ratio (start-up and compilation are scaled too: an upper bound for this run's
  steps); the train row's note gives the config's real max_steps at the extrapolated step time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.doctor import Device, RunShapes, eval_placement, train_estimate
from pipeline.sizing import GIB, PROBE_PROMPT_TOKENS, LlamaShape

STAGES = ("doctor", "surgery", "train", "eval")
METER_STAGE = {"pipeline doctor": "doctor", "surgery": "surgery", "train": "train", "eval": "eval"}


def widths_text(config: dict) -> str:
    return f"{config['hidden_size']}x{config['num_attention_heads']}x{config['intermediate_size']}"


def meter_records(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def layer_bytes(folder: Path) -> int:
    """Bytes of the `model.layers.*` tensors of a safetensors model folder (from the headers)."""
    from pipeline.checkpoint import CheckpointReader

    if not (folder / "config.json").is_file():
        return 0
    reader = CheckpointReader(folder)
    return sum(math.prod(reader.shape(name)) * reader.dtype(name).itemsize for name in reader.names
               if ".layers." in name)


def disk_split(stage: str, folder: Path, data: Path) -> tuple[int, int]:
    """(fixed, per-layer at K layers) bytes of what a stage left."""
    total = folder_bytes(folder)
    if stage == "surgery":
        per_layer = layer_bytes(folder)
    elif stage == "train":
        total += folder_bytes(data)
        lora = sum(folder_bytes(p) for p in [*folder.glob("checkpoint-*"), folder / "adapter"])
        per_layer = layer_bytes(folder / "merged") + lora
    else:
        per_layer = 0
    return total - per_layer, per_layer


def compute_params(shape: LlamaShape) -> int:
    """Parameters a token's forward multiplies with (the embedding is a lookup)."""
    return shape.num_hidden_layers * shape.linear_params_per_layer + shape.vocab_size * shape.hidden_size


def eval_shapes(config: RunConfig, base: LlamaShape, widened: LlamaShape, base_dtype: str) -> RunShapes:
    dtype = config.surgery.dtype if config.surgery else "bfloat16"
    return RunShapes(None, widened, widened, [("base", base, base_dtype), ("surgery", widened, dtype),
                                              ("trained", widened, dtype)])


def probe_kv_per_layer(config: RunConfig, shape: LlamaShape) -> int:
    probe = config.eval.probe
    return probe.batch_size * (PROBE_PROMPT_TOKENS + probe.max_new_tokens) * shape.kv_bytes_per_token() \
        // shape.num_hidden_layers


def train_step_seconds(train_dir: Path, tokens_per_step: int) -> float | None:
    path = train_dir / "log_history.json"
    if not path.is_file():
        return None
    speeds = [entry["tokens_per_second"] for entry in json.loads(path.read_text()) if "tokens_per_second" in entry]
    return tokens_per_step / speeds[-1] if speeds else None


def build(config: RunConfig, folders: dict[str, Path], base_config: dict, donor_config: dict | None, layers: int,
          full_layers: int, tree_rss: dict[str, int], nf4: dict | None, contexts: dict[str, int], wall_s: float,
          failures: list[str], real_max_steps: int) -> dict:
    records = meter_records(folders["meter"])
    surgery_config = config.stage_dir("surgery") / "config.json"
    base = LlamaShape.from_config(base_config)
    widened = LlamaShape.from_config(json.loads(surgery_config.read_text())) if surgery_config.is_file() else base
    full = widened.with_layers(full_layers)
    gpu_cap = max((r.get("gpu_cap_gib", 0) for r in records), default=0) * GIB
    stages: dict[str, dict] = {}
    for stage in STAGES:
        mine = [r for r in records if METER_STAGE.get(r["stage"]) == stage]
        watch_key = "pipeline doctor" if stage == "doctor" else stage
        row = {
            "processes": len(mine),
            "wall_s": sum(r["end"] - r["start"] for r in mine),
            "gpu_gib": max((r.get("gpu_peak_allocated", 0) for r in mine), default=0) / GIB,
            "gpu_reserved_gib": max((r.get("gpu_peak_reserved", 0) for r in mine), default=0) / GIB,
            "rss_gib": max([r.get("rss_peak", 0) for r in mine] + [tree_rss.get(watch_key, 0)]) / GIB,
        }
        folder = config.stage_dir(stage) if stage != "doctor" else None
        fixed, per_layer = disk_split(stage, folder, config.run_dir / "data") if folder else (0, 0)
        row["disk_gb"] = (fixed + per_layer) / 1e9
        row["full_disk_gb"] = (fixed + per_layer / layers * full_layers) / 1e9
        ratio = (full.params if stage == "surgery" else compute_params(full)) / max(
            widened.params if stage == "surgery" else compute_params(widened), 1)
        row["full_wall_s"] = row["wall_s"] * (ratio if stage != "doctor" else 1)
        row["full_gpu_gib"], row["full_rss_gib"] = row["gpu_gib"], row["rss_gib"]
        stages[stage] = row

    train = stages["train"]
    if train["gpu_gib"]:
        per_layer = (train_estimate(config, widened.with_layers(layers + 1), cuda=True).total
                     - train_estimate(config, widened.with_layers(layers), cuda=True).total)
        train["full_gpu_gib"] = train["gpu_gib"] + (full_layers - layers) * per_layer / GIB
    tokens_per_step = config.train.seq_len * config.train.batch_size * config.train.grad_accum
    step = train_step_seconds(config.stage_dir("train"), tokens_per_step)
    if step is not None:
        full_step = step * compute_params(full) / compute_params(widened)
        train["step_s"], train["full_step_s"] = step, full_step
        train["full_run_h"] = full_step * real_max_steps / 3600
    evaluation = stages["eval"]
    if evaluation["gpu_gib"] and gpu_cap:
        card = Device("cap", int(gpu_cap - GIB), int(gpu_cap), 1)
        base_dtype = str(base_config.get("torch_dtype") or "float16")
        at_k = eval_placement(config, eval_shapes(config, base, widened, base_dtype), card)
        at_full = eval_placement(config, eval_shapes(config, base.with_layers(full_layers), full, base_dtype), card)
        kv = probe_kv_per_layer(config, widened)
        fixed = evaluation["gpu_gib"] * GIB - at_k.on_gpu - layers * kv
        evaluation["full_gpu_gib"] = (fixed + at_full.on_gpu + full_layers * kv) / GIB
        evaluation["full_rss_gib"] = evaluation["rss_gib"] + (at_full.in_ram - at_k.in_ram) / GIB
        evaluation["full_placement"] = f"{at_full.dtype}, {at_full.in_ram / 1e9:.1f} GB in CPU RAM"
    verdicts = {}
    eval_manifest = config.stage_dir("eval") / "manifest.json"
    if eval_manifest.is_file():
        verdicts = json.loads(eval_manifest.read_text()).get("verdicts", {})
    return {
        "widths": {"base": widths_text(base_config), "widened": widths_text(
            {"hidden_size": widened.hidden_size, "num_attention_heads": widened.num_attention_heads,
             "intermediate_size": widened.intermediate_size}), "vocab": widened.vocab_size},
        "layers": layers, "full_layers": full_layers, "gpu_cap_gib": gpu_cap / GIB, "stages": stages,
        "contexts": contexts, "nf4": nf4, "verdicts": verdicts, "wall_s": wall_s, "failures": failures,
        "real_max_steps": real_max_steps,
    }


def render(result: dict) -> str:
    k, full = result["layers"], result["full_layers"]
    header = (f"{'stage':8} {'wall s':>8} {'GPU GiB':>8} {'RSS GiB':>8} {'disk GB':>8}   |   at {full} layers "
              f"(estimate): {'wall s':>8} {'GPU GiB':>8} {'RSS GiB':>8} {'disk GB':>8}")
    lines = [f"rehearsal at {k} layers (GPU cap {result['gpu_cap_gib']:.0f} GiB)", header, "-" * len(header)]
    for stage, row in result["stages"].items():
        lines.append(f"{stage:8} {row['wall_s']:8.0f} {row['gpu_gib']:8.2f} {row['rss_gib']:8.2f} "
                     f"{row['disk_gb']:8.2f}   |   {'':22}{row['full_wall_s']:8.0f} {row['full_gpu_gib']:8.2f} "
                     f"{row['full_rss_gib']:8.2f} {row['full_disk_gb']:8.2f}")
    train = result["stages"]["train"]
    if "step_s" in train:
        lines.append(f"train step: {train['step_s']:.2f} s at {k} layers -> ~{train['full_step_s']:.1f} s at {full}: "
                     f"the config's {result['real_max_steps']} steps ~{train['full_run_h']:.1f} h (estimate)")
    if "full_placement" in result["stages"]["eval"]:
        lines.append(f"eval at {full} layers under the cap: {result['stages']['eval']['full_placement']} (estimate)")
    lines.append("contexts (tokens): " + ", ".join(f"{name} {count}" for name, count in result["contexts"].items()))
    nf4 = result["nf4"]
    if nf4:
        surgery, quantization = nf4["widened_nf4_vs_base_nf4"], nf4["base_nf4_vs_base_full"]
        lines.append(f"nf4 on {nf4['device']}: zero blocks {'kept' if nf4['zero_blocks_kept'] else 'NOT kept'} "
                     f"({nf4['zero_block_violations']['zeros_checked']:,} zeros); KL(base NF4 || widened NF4) "
                     f"{surgery['mean_kl']:.3g}, top-1 {100 * surgery['top1_agreement']:.1f}% vs quantization's own "
                     f"KL {quantization['mean_kl']:.3g}: {'tracks' if nf4['tracks'] else 'does NOT track'}")
    if result["verdicts"]:
        lines.append("verdicts (random weights, recorded, not fatal): "
                     + ", ".join(f"{label} {verdict}" for label, verdict in result["verdicts"].items()))
    widths = f"{result['widths']['widened']} (base {result['widths']['base']}), vocab {result['widths']['vocab']}"
    stages = result["stages"]
    summary = (f"surgery {stages['surgery']['wall_s']:.0f} s, train {stages['train']['wall_s']:.0f} s, "
               f"eval {stages['eval']['wall_s']:.0f} s; peak GPU train {stages['train']['gpu_gib']:.1f} / eval "
               f"{stages['eval']['gpu_gib']:.1f} GiB; total {result['wall_s']:.0f} s")
    if result["failures"]:
        lines.append(f"rehearse: {widths}, {k} layers: FAILED: {'; '.join(result['failures'])} ({summary})")
    else:
        lines.append(f"rehearse: {widths}, {k} layers: all stages ok ({summary})")
    return "\n".join(lines)
