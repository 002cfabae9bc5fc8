"""`frankenllama doctor CONFIG`: can this machine run this config? One table, before anything is downloaded.

Each check is ok, warn or fail, with the fix: every model the run needs (reachable with the current token and
shipped as safetensors), the GPU against what train and eval need of it, bitsandbytes' NF4 kernels, RAM
(MemAvailable), free disk for each stage, the benchmark data and wandb. Memory and disk come from the models'
config.json widths through pipeline/sizing.py, so hub models are judged by config.json and their safetensors
headers, never their weights. The hub is probed with short timeouts and not at all when HF_HUB_OFFLINE is set,
so an offline box gets its answer in seconds. Only the stages a run would execute (`--from`, `--only`, what is
already complete) are checked for disk and memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import sizing
from pipeline.checkpoint import CheckpointReader
from pipeline.config import RunConfig
from pipeline.errors import UserError, error_reason
from pipeline.hub import hub_dataset_bytes, hub_reachable, inspect_hub_model
from pipeline.models import model_ref_kind, resolve_model
from pipeline.orchestrate import stages_to_run
from pipeline.sizing import GIB, LlamaShape

Status = Literal["ok", "warn", "fail"]

# Above this size the CPU path (fp32 compute, no NF4 kernels worth the name) is no way to train or evaluate.
CPU_MAX_PARAMS = 1_000_000_000
# The CUDA context and the caching allocator's slack, on top of the allocated peak.
CUDA_OVERHEAD_BYTES = GIB
EVAL_REPORT_BYTES = 100 * 2**20


@dataclass(frozen=True)
class Check:
    """One row of the table: what was checked, the verdict, what was found, and (warn/fail) what to do."""

    name: str
    status: Status
    found: str
    fix: str = ""


@dataclass(frozen=True)
class ModelFacts:
    """A model reference of the config as the doctor found it."""

    role: str
    ref: str
    config: dict | None
    download_bytes: int
    check: Check

    @property
    def shape(self) -> LlamaShape | None:
        return LlamaShape.from_config(self.config) if self.config else None

    @property
    def stored_dtype(self) -> str:
        dtype = str((self.config or {}).get("dtype") or (self.config or {}).get("torch_dtype") or "float32")
        return dtype if dtype in sizing.DTYPE_BYTES else "bfloat16"


def gb(count: float) -> str:
    return f"{count / 1e9:.1f} GB"


def gib(count: float) -> str:
    return f"{count / GIB:.1f} GiB"


def inspect_model(role: str, ref: str) -> ModelFacts:
    """Whether the run can read `ref` (local folder, packaged name or hub id), and its config.json."""
    name = f"model {role}"
    kind = model_ref_kind(ref)
    if kind == "hub":
        found = inspect_hub_model(ref)
        if found.problem:
            return ModelFacts(role, ref, None, 0, Check(name, "fail", f"{ref}: {found.problem}", found.fix or ""))
        where = "in the HF cache" if found.where == "cache" else f"on the hub, {gb(found.download_bytes)} to download"
        return ModelFacts(role, ref, found.config, found.download_bytes, Check(name, "ok", f"{ref}: {where}"))
    if kind is None:
        return ModelFacts(role, ref, None, 0, Check(name, "fail", f"{ref!r} is no folder, hub id or packaged model",
                                                    "give a local folder, a hub id like org/name, or a packaged name"))
    try:
        folder = resolve_model(ref)  # local: no network; packaged: converted once from the package's GGUF
        config = json.loads((folder / "config.json").read_text())
        reader = CheckpointReader(folder)
    except (UserError, OSError, json.JSONDecodeError) as err:
        return ModelFacts(role, ref, None, 0, Check(name, "fail", f"{ref}: {error_reason(err)}",
                                                    "fix or replace that folder"))
    origin = "packaged" if kind == "packaged" else "local folder"
    return ModelFacts(role, ref, config, 0, Check(name, "ok", f"{ref}: {origin}, {gb(reader.total_bytes())}"))


@dataclass(frozen=True)
class RunShapes:
    """The shapes that size a run: what surgery reads and writes, what train trains, what eval loads."""

    base: ModelFacts | None
    widened: LlamaShape | None  # the surgery output, and the merged export made from it
    train: LlamaShape | None
    evaluated: list[tuple[str, LlamaShape, str]]  # (label, shape, the dtype it is stored in)


def widened_shape(config: RunConfig, base: LlamaShape | None, donor: dict | None) -> LlamaShape | None:
    """The surgery output's shape: its own config.json once written, else the base at the target widths."""
    written = config.stage_dir("surgery") / "config.json"
    if written.is_file():
        return LlamaShape.from_config(json.loads(written.read_text()))
    if base is None or config.surgery is None:
        return None
    target = config.surgery.target
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    widths = {key: getattr(target, key) or (donor or {}).get(key) for key in keys}
    widths["num_key_value_heads"] = widths["num_key_value_heads"] or widths["num_attention_heads"]
    return None if any(v is None for v in widths.values()) else base.widened(**widths)


def inspect_models(config: RunConfig, stages: list[str]) -> tuple[list[ModelFacts], RunShapes]:
    """Every model reference the stages to run need, and the shapes they imply."""
    facts: dict[str, ModelFacts] = {}

    def facts_for(role: str, ref: str) -> ModelFacts:
        if ref not in facts:
            facts[ref] = inspect_model(role, ref)
        return facts[ref]

    base = donor = None
    if config.surgery is not None:
        base = facts_for("surgery.base", config.surgery.base)
        written = (config.stage_dir("surgery") / "config.json").is_file()
        if config.surgery.donor != "random" and ("surgery" in stages or not written):
            donor = facts_for("surgery.donor", config.surgery.donor)
    widened = widened_shape(config, base.shape if base else None, donor.config if donor else None)
    train = facts_for("train.model", config.train.model).shape if config.train.model else widened
    surgery_dtype = config.surgery.dtype if config.surgery else "bfloat16"
    evaluated: list[tuple[str, LlamaShape, str]] = []
    if "eval" in stages:
        refs = list(config.eval.models or []) + ([config.eval.base] if config.eval.base else [])
        for index, ref in enumerate(dict.fromkeys(refs)):
            model = facts_for(f"eval.models[{index}]", ref)
            if model.shape is not None:
                evaluated.append((ref, model.shape, model.stored_dtype))
        if not config.eval.models:
            if base is not None and base.shape is not None:
                evaluated.append(("base", base.shape, base.stored_dtype))
            if widened is not None:
                evaluated += [("surgery", widened, surgery_dtype), ("trained", widened, surgery_dtype)]
    return list(facts.values()), RunShapes(base, widened, train, evaluated)


# ---- GPU and memory ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """The GPU the stages would use (None on a machine without CUDA), with its free and total memory."""

    name: str | None
    free: int
    total: int
    count: int


def find_device() -> Device:
    import torch

    if not torch.cuda.is_available():
        return Device(None, 0, 0, 0)
    free, total = torch.cuda.mem_get_info(0)
    return Device(torch.cuda.get_device_name(0), free, total, torch.cuda.device_count())


def fused_cross_entropy(config: RunConfig) -> bool:
    train = config.train
    return (train.recipe == "fast" and train.quantization == "nf4"
            and importlib.util.find_spec("liger_kernel") is not None)


def train_estimate(config: RunConfig, shape: LlamaShape, cuda: bool) -> sizing.Estimate:
    train = config.train
    return sizing.train_memory(
        shape, quantization=train.quantization, recipe=train.recipe, seq_len=train.seq_len,
        batch_size=train.batch_size, lora_r=train.lora.r, lora_targets=train.lora.target_modules,
        gradient_checkpointing=train.gradient_checkpointing, fused_cross_entropy=fused_cross_entropy(config),
        cuda=cuda,
    )


def pinned_activations(config: RunConfig, shape: LlamaShape) -> int:
    """Pinned CPU RAM of the fast recipe's offloaded activations, all training processes together (none where the
    levers do not apply: the plain recipe, no NF4, FSDP). Taken once loading is done, so it adds to the process, not
    to the loading buffers."""
    train = config.train
    if train.recipe != "fast" or train.quantization != "nf4" or train.distributed == "fsdp":
        return 0
    return train.num_gpus * sizing.pinned_activation_bytes(shape, train.fast, seq_len=train.seq_len,
                                                           batch_size=train.batch_size)


@dataclass(frozen=True)
class EvalPlacement:
    """Where eval would put its largest model: the dtype, its weights, the GPU weight budget eval hands accelerate
    (free memory less the largest forward's activations and the allocator's slack), the bytes accelerate would put
    on the GPU within it and those left in CPU RAM, the activations and the setting that sizes them, and the block
    accelerate moves whole."""

    label: str
    dtype: str
    weights: int
    budget: int
    on_gpu: int
    in_ram: int
    activations: int
    forward: str
    block: int


def eval_placement(config: RunConfig, shapes: RunShapes, device: Device) -> EvalPlacement | None:
    """eval's own rule (pipeline/sizing.py's eval_memory and eval_weight_budget, which eval/precision.py and
    eval/placement.py apply) for the largest evaluated model. accelerate fills the GPU up to the budget less the
    largest block (room for an offloaded one in transit) once the model does not fit whole; the rest goes to RAM."""
    if not shapes.evaluated:
        return None
    label, shape, _ = max(shapes.evaluated, key=lambda entry: entry[1].params)
    room = device.free if device.name else _available_ram()
    memory = sizing.eval_memory(config.eval, [(entry[1], entry[2]) for entry in shapes.evaluated], room)
    width = sizing.DTYPE_BYTES[memory.dtype]
    weights, block = shape.params * width, shape.largest_block_params() * width
    if not device.name:
        return EvalPlacement(label, memory.dtype, weights, 0, 0, weights, memory.activations, memory.forward, block)
    budget = memory.weight_budget
    on_gpu = weights if weights + block <= budget else max(budget - block, 0)
    return EvalPlacement(label, memory.dtype, weights, budget, on_gpu, weights - on_gpu, memory.activations,
                         memory.forward, block)


def gpu_checks(config: RunConfig, shapes: RunShapes, stages: list[str], device: Device) -> list[Check]:
    needs_gpu = [s for s in stages if s in ("train", "eval")]
    if device.name is None:
        return [cpu_only_check(config, shapes, needs_gpu)]
    checks = [Check("GPU", "ok", f"{device.name}, {gib(device.total)} ({gib(device.free)} free), "
                                 f"{device.count} visible")]
    if "train" in stages and config.train.num_gpus > device.count:
        checks.append(Check("GPU count", "fail", f"train.num_gpus={config.train.num_gpus} but {device.count} visible",
                            f"set train.num_gpus to at most {device.count}"))
    if "train" in stages:
        checks.append(train_gpu_check(config, shapes.train, device))
    if "eval" in stages:
        checks.append(eval_gpu_check(eval_placement(config, shapes, device), device))
    return checks


def cpu_only_check(config: RunConfig, shapes: RunShapes, needs_gpu: list[str]) -> Check:
    if not needs_gpu:
        return Check("GPU", "ok", "none visible; not needed (surgery runs on the CPU)")
    cuda_only = [key for key, on in (("train.optimizer paged_*", config.train.optimizer.startswith("paged_")),
                                     ("train.distributed fsdp", config.train.distributed == "fsdp"),
                                     ("eval.device cuda", config.eval.device == "cuda")) if on]
    if cuda_only:
        return Check("GPU", "fail", f"no CUDA GPU visible, and {', '.join(cuda_only)} needs one",
                     "run on a machine with an NVIDIA GPU and a CUDA build of torch")
    sizes = [s.params for s in [shapes.train, *(entry[1] for entry in shapes.evaluated)] if s is not None]
    if not sizes:
        return Check("GPU", "warn", "no CUDA GPU visible, and the models' size is unknown (see the model rows)",
                     "fix the model rows; anything larger than 1B parameters needs a CUDA GPU")
    largest = max(sizes)
    if largest > CPU_MAX_PARAMS:
        return Check("GPU", "fail", f"no CUDA GPU visible; {', '.join(needs_gpu)} of a {largest / 1e9:.1f}B-parameter "
                     "model needs one", "run on a machine with a 24 GB NVIDIA GPU (README: Run it on a rented GPU)")
    verb = "runs" if len(needs_gpu) == 1 else "run"
    return Check("GPU", "ok", f"none visible; {' and '.join(needs_gpu)} {verb} on the CPU, fine at "
                 f"{largest / 1e9:.2f}B parameters")


def train_gpu_check(config: RunConfig, shape: LlamaShape | None, device: Device) -> Check:
    name = "GPU memory: train"
    if shape is None:
        return Check(name, "warn", "not estimated: the model's config.json could not be read", "fix the model rows")
    estimate = train_estimate(config, shape, cuda=True)
    need = estimate.total + CUDA_OVERHEAD_BYTES
    if config.train.distributed == "fsdp":
        need -= (estimate.parts["weights"] + estimate.parts["tables"]) * (1 - 1 / config.train.num_gpus)
    train = config.train
    paged = sizing.optimizer_state_bytes(shape, train.lora.r, train.lora.target_modules)
    found = (f"~{gib(need)} at {train.batch_size} x {train.seq_len} tokens ({estimate.describe()}, +1 CUDA context) "
             f"of {gib(device.free)} free; AdamW's {gib(paged)} are paged")
    if train.recipe == "fast" and train.quantization == "nf4" and not fused_cross_entropy(config):
        found += "; liger-kernel is not installed, so the logits are not fused (pip install liger-kernel)"
    shrink = "lower train.batch_size (raising train.grad_accum keeps the batch), train.seq_len or train.lora.r"
    if need > device.total:
        return Check(name, "fail", found, shrink)
    if need > device.free:
        return Check(name, "fail", found + f"; other processes hold {gib(device.total - device.free)}",
                     "stop the other GPU processes, or " + shrink)
    return Check(name, "ok", found)


def eval_gpu_check(placement: EvalPlacement | None, device: Device) -> Check:
    name = "GPU memory: eval"
    if placement is None:
        return Check(name, "warn", "not estimated: no evaluated model's config.json could be read",
                     "fix the model rows")
    p = placement
    beside = (f"{gib(p.activations)} of activations for the largest forward ({p.forward}) and "
              f"{gib(sizing.EVAL_ALLOCATOR_SLACK)} of allocator slack kept free of {gib(device.free)}")
    if p.in_ram == 0:
        return Check(name, "ok", f"{p.label} in {p.dtype}: {gib(p.weights)} of weights on the GPU; {beside}")
    if p.on_gpu == 0:
        return Check(name, "fail", f"{p.label} in {p.dtype}: {beside} leave {gib(p.budget)} for weights, less than "
                     f"one {gib(p.block)} layer", f"lower {p.forward}")
    found = (f"{p.label} in {p.dtype} is {gb(p.weights)}: eval keeps {gb(p.on_gpu)} on the GPU and {gb(p.in_ram)} in "
             f"CPU RAM (slower, same scores); {beside}")
    return Check(name, "warn", found, "a GPU with more memory runs it faster; nothing to fix")


def _available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def ram_check(config: RunConfig, shapes: RunShapes, stages: list[str], device: Device) -> Check:
    """RAM against MemAvailable (free memory plus the reclaimable page cache, which 91 GB of downloads fill)."""
    available = _available_ram()
    cuda = device.name is not None
    needs: dict[str, float] = {}
    if "surgery" in stages and shapes.base and shapes.base.shape and shapes.widened and config.surgery:
        needs["surgery"] = sizing.surgery_ram(shapes.base.shape, shapes.widened,
                                              sizing.DTYPE_BYTES[config.surgery.dtype])
    if "train" in stages and shapes.train:
        largest = shapes.train.largest_tensor_params() * 4  # loading reads a tensor and quantizes or casts it
        needs["train"] = sizing.PROCESS_BASE_BYTES + (
            max(2 * largest, pinned_activations(config, shapes.train)) if cuda
            else 2 * largest + train_estimate(config, shapes.train, cuda=False).total)
    placement = eval_placement(config, shapes, device) if "eval" in stages else None
    if placement is not None:
        _, shape, _ = max(shapes.evaluated, key=lambda entry: entry[1].params)
        preservation = config.eval.preservation
        base_logits = preservation.texts * preservation.max_tokens * shape.vocab_size * 4 if preservation.enabled else 0
        needs["eval"] = (sizing.PROCESS_BASE_BYTES + placement.in_ram + base_logits
                         + (0 if cuda else placement.activations))
    if not needs:
        if stages:
            return Check("RAM", "warn", f"MemAvailable {gib(available)}; the need is unknown without the models' "
                         "config.json", "fix the model rows")
        return Check("RAM", "ok", f"MemAvailable {gib(available)}; no stage to run")
    stage, need = max(needs.items(), key=lambda item: item[1])
    found = (f"MemAvailable {gib(available)}; peak ~{gib(need)} in {stage} ("
             + ", ".join(f"{s} {gib(n)}" for s, n in needs.items()) + ")")
    if need > available:
        return Check("RAM", "fail", found, "close other programs, or use a machine with more RAM (README: 32-64 GB)")
    return Check("RAM", "ok", found)


# ---- disk ----------------------------------------------------------------------------------------------------

def existing_ancestor(path: Path) -> Path:
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def datasets_cache_dir() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets"


def hub_data_sources(config: RunConfig) -> list[tuple[str, str | None]]:
    """(repo, file pattern) of the train data sources that live on the hub (local paths are never counted)."""
    found = []
    for source in config.train.data.sources:
        parts = source.split("/", 2)
        if len(parts) >= 2 and not source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
            found.append(("/".join(parts[:2]), parts[2] if len(parts) == 3 else None))
    return found


def disk_checks(config: RunConfig, facts: list[ModelFacts], shapes: RunShapes, stages: list[str]) -> list[Check]:
    """Free disk for what each stage to run writes, added up per file system in the order the stages run."""
    writes: list[tuple[str, Path, float, str]] = []  # (stage, where, bytes, what)
    downloads = sum(f.download_bytes for f in facts)
    if downloads:
        writes.append(("downloads", hf_cache_dir(), downloads, f"{gb(downloads)} of model weights"))
    if "train" in stages:
        prepared = any((config.run_dir / "data").glob("*/slice.json"))
        for repo, pattern in ([] if prepared else hub_data_sources(config)):
            size = hub_dataset_bytes(repo, pattern)
            if size is None:
                writes.append(("downloads", datasets_cache_dir(), 0, f"{repo}: size unknown (hub unreachable)"))
            else:  # the jsonl files, then as much again for the datasets library's Arrow cache
                writes.append(("downloads", datasets_cache_dir(), 2 * size, f"{repo}: {gb(size)} of jsonl x 2"))
    widened = shapes.widened
    dtype_bytes = sizing.DTYPE_BYTES[config.surgery.dtype] if config.surgery else 2
    unknown = [stage for stage, shape in (("surgery", widened), ("train", shapes.train))
               if stage in stages and shape is None]
    if "surgery" in stages and widened is not None:
        writes.append(("surgery", config.run_dir, widened.params * dtype_bytes, "the widened model"))
    if "train" in stages and shapes.train is not None:
        train = config.train
        checkpoint = sizing.checkpoint_bytes(shapes.train, train.lora.r, train.lora.target_modules)
        adapter = checkpoint / 3
        merged = shapes.train.params * dtype_bytes
        blocks = train.data.tokens * 4
        # The Trainer writes a new checkpoint before it deletes the oldest: one more than the limit, for a moment.
        total = (train.save_total_limit + 1) * checkpoint + adapter + merged + blocks
        writes.append(("train", config.run_dir, total,
                       f"{train.save_total_limit + 1} x {gb(checkpoint)} checkpoints + {gb(merged)} merged export"))
    if "eval" in stages:
        writes.append(("eval", config.run_dir, EVAL_REPORT_BYTES, "the report"))
    checks = [Check(f"disk: {stage}", "warn", "not estimated: the model's widths are unknown (see the model rows)",
                    "fix the model rows") for stage in unknown]
    claimed: dict[int, float] = {}
    for stage, where, size, what in writes:
        anchor = existing_ancestor(where)
        device = anchor.stat().st_dev
        claimed[device] = claimed.get(device, 0) + size
        free = shutil.disk_usage(anchor).free
        found = f"{gb(size)} in {where} ({what}); {gb(claimed[device])} of {gb(free)} free there so far"
        if claimed[device] > free:
            checks.append(Check(f"disk: {stage}", "fail", found,
                                "free space there, or move run_dir / HF_HOME to a larger disk"))
        elif size == 0 and "unknown" in what:
            checks.append(Check(f"disk: {stage}", "warn", found, "make sure the hub is reachable when train starts"))
        else:
            checks.append(Check(f"disk: {stage}", "ok", found))
    return checks


# ---- the rest ------------------------------------------------------------------------------------------------

def bitsandbytes_check(device: Device) -> Check:
    """Quantize and dequantize one small matrix with NF4 where training will run, with an all-zero block in it.

    A wrong round trip means a broken install. An all-zero block that comes back non-zero is what bitsandbytes'
    double-quantized NF4 does on CUDA (the rehearsal saw it on an H200: the 64 zeros of a block are coded against
    an absmax of 0, and the absmax's own 8-bit quantization hands back a tiny non-zero one); the train stage codes
    the checkpoint's all-zero blocks as exact zeros after loading (train.model.keep_zero_blocks_zero), so it is
    worth knowing, not a reason to stop."""
    import torch

    where = "cuda" if device.name else "cpu"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        return Check("bitsandbytes", "fail", "not installed; train.quantization=nf4 needs it",
                     "pip install bitsandbytes, or set train.quantization=none")
    try:
        weight = torch.randn(256, 128, device=where, dtype=torch.bfloat16 if device.name else torch.float32)
        weight[:64] = 0
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        restored = bnbf.dequantize_4bit(packed, state).float()
        error = ((restored[64:] - weight[64:].float()).abs().max() / weight.float().abs().max()).item()
        leak = restored[:64].abs().max().item() / weight.float().abs().max().item()
    except Exception as err:
        return Check("bitsandbytes", "fail", f"bitsandbytes {bnb.__version__}: NF4 fails on {where} "
                     f"({error_reason(err)})", "install a bitsandbytes build for this CUDA, or set "
                     "train.quantization=none")
    if not error < 0.2:
        return Check("bitsandbytes", "fail", f"NF4 on {where} restores wrong values (max error {error:.2g} of the "
                     "largest weight)", "reinstall bitsandbytes")
    if leak > 0:
        return Check("bitsandbytes", "warn", f"bitsandbytes {bnb.__version__}: NF4 works on {where}, but an all-zero "
                     f"block comes back non-zero (up to {leak:.1g} of the largest weight)",
                     "nothing to fix: the train stage codes the checkpoint's all-zero blocks as exact zeros after "
                     "loading (README, Train)")
    return Check("bitsandbytes", "ok", f"bitsandbytes {bnb.__version__}: NF4 works on {where} (zero blocks stay zero)")


def benchmark_data_check(config: RunConfig) -> Check:
    data_dir = config.eval.benchmarks.data_dir
    if data_dir is not None:
        if Path(data_dir).is_dir():
            return Check("benchmark data", "ok", f"local files in {data_dir}")
        return Check("benchmark data", "fail", f"eval.benchmarks.data_dir {data_dir} is not a folder",
                     "fill it with scripts/fetch_benchmarks.py DIR")
    if hub_reachable():
        return Check("benchmark data", "ok", "from the hub at eval time")
    return Check("benchmark data", "fail", "the hub is unreachable (or HF_HUB_OFFLINE is set) and "
                 "eval.benchmarks.data_dir is not set", "run scripts/fetch_benchmarks.py DIR where the hub is "
                 "reachable and set eval.benchmarks.data_dir=DIR, or eval.benchmarks.enabled=false")


def wandb_check(config: RunConfig, stages: list[str]) -> Check:
    from pipeline.tracking import choose_mode

    settings = config.train.wandb if "train" in stages else (config.eval.wandb or config.train.wandb)
    try:
        mode, reason = choose_mode(settings)
    except UserError as err:
        return Check("wandb", "fail", str(err).split(";")[0], "set WANDB_API_KEY or run `wandb login`")
    if mode == "offline":
        return Check("wandb", "warn", f"offline: {reason}",
                     "export WANDB_API_KEY=... (or `wandb login`) to go online; offline runs upload with `wandb sync`")
    return Check("wandb", "ok", f"{mode}: {reason}")


def guarded(name: str, check) -> list[Check]:
    """Run one group of checks; an unexpected error becomes a failed row instead of a traceback."""
    try:
        result = check()
    except Exception as err:
        return [Check(name, "fail", f"could not check ({type(err).__name__}: {error_reason(err)})",
                      "report this with the doctor's output")]
    return result if isinstance(result, list) else [result]


def diagnose(config: RunConfig, selected: list[str], force: bool = False) -> list[Check]:
    """Every check for the stages of `selected` that a run would execute."""
    stages = stages_to_run(config, selected, force)
    complete = [s for s in selected if s not in stages]
    checks = [Check("stages", "ok", f"to run: {', '.join(stages) or 'none'}"
                    + (f"; complete for this config: {', '.join(complete)}" if complete else ""))]
    models: list[ModelFacts] = []
    shapes = RunShapes(None, None, None, [])

    def model_checks() -> list[Check]:
        nonlocal models, shapes
        models, shapes = inspect_models(config, stages)
        return [m.check for m in models]

    checks += guarded("models", model_checks)
    device = Device(None, 0, 0, 0)

    def device_checks() -> list[Check]:
        nonlocal device
        device = find_device()
        return gpu_checks(config, shapes, stages, device)

    checks += guarded("GPU", device_checks)
    if "train" in stages and config.train.quantization == "nf4":
        checks += guarded("bitsandbytes", lambda: bitsandbytes_check(device))
    checks += guarded("RAM", lambda: ram_check(config, shapes, stages, device))
    checks += guarded("disk", lambda: disk_checks(config, models, shapes, stages))
    if "eval" in stages and config.eval.benchmarks.enabled:
        checks += guarded("benchmark data", lambda: benchmark_data_check(config))
    if "train" in stages or "eval" in stages:
        checks += guarded("wandb", lambda: wandb_check(config, stages))
    return checks


def render(checks: list[Check], title: str) -> str:
    """The table: status, check, what was found; a fix line under each warning and failure."""
    width = max(len(c.name) for c in checks)
    lines = [title, ""]
    for c in checks:
        lines.append(f"{c.status.upper():<4}  {c.name:<{width}}  {c.found}")
        if c.fix and c.status != "ok":
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append("")
    if failed:
        lines.append(f"doctor: {failed} check(s) failed, {warned} warning(s): fix the failures before running")
    else:
        lines.append(f"doctor: all checks passed ({warned} warning(s))")
    return "\n".join(lines)

