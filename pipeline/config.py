"""The one config schema for a whole run, and how a YAML file plus `--set` overrides become one.

Every key is declared here with its default; unknown keys and wrong types fail before any work, with the
dotted key in the message (mergekit's strict-pydantic habit).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError

FillMode = Literal["readers", "block_diagonal", "block_triangular", "zero"]
# `none`: no widening. A control run: the train stage trains `surgery.base` itself with the run's train and eval
# sections, so a graft and its control differ only in the model that is trained.
SurgeryMode = Literal[FillMode, "none"]
LayerMap = Literal["index", "proportional"]
DType = Literal["bfloat16", "float16", "float32"]
NewLayers = Literal["donor", "copy"]
# How the donor's residual basis is re-parameterised towards the base's before grafting (surgery/alignment.py).
AlignMethod = Literal["none", "permutation", "rotation"]
# Which donor heads and neurons land in the grafted positions: by index, or those with the largest output.
UnitSelection = Literal["index", "output"]
MergeInto = Literal["dequantized_nf4", "base"]


def shard_size_bytes(size: str) -> int:
    """Bytes in a `max_shard_size`, read as transformers' save_pretrained reads its own ("5GB" is 5e9 bytes; KB, MB,
    GB, TB, decimal): by huggingface_hub's parser, the one its shard split applies (pipeline.checkpoint), so a size
    accepted here is the size the writer splits by."""
    from huggingface_hub.serialization._base import parse_size_to_int  # the split's own parser (not re-exported)

    try:
        return parse_size_to_int(size)
    except ValueError:
        raise ValueError(f"shard size {size!r} not understood; write it like 5GB or 500MB (KB, MB, GB or TB)") from None


def _known_shard_size(size: str) -> str:
    shard_size_bytes(size)
    return size


# Checked when the config is read, not when the first shard is written hours later (train's export).
ShardSize = Annotated[str, AfterValidator(_known_shard_size)]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetWidths(StrictModel):
    """Widths of the grown model; unset ones come from the donor (required with a random donor). Depth too:
    num_hidden_layers unset keeps the base's; more inserts new layers whose o_proj and down_proj are zero."""

    hidden_size: int | None = Field(default=None, gt=0)
    num_attention_heads: int | None = Field(default=None, gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    intermediate_size: int | None = Field(default=None, gt=0)
    num_hidden_layers: int | None = Field(default=None, gt=0)


class SurgeryConfig(StrictModel):
    """How to widen `base` with the blocks of `donor` (a model reference, or `random`); mode `none` keeps `base`
    as it is (a control run)."""

    base: str
    donor: str = "random"
    mode: SurgeryMode = "readers"
    layer_map: LayerMap = "proportional"
    legacy: bool = False
    dtype: DType = "bfloat16"
    seed: int = 0
    target: TargetWidths = Field(default_factory=TargetWidths)
    # What fills the layers depth growth inserts (their o_proj/down_proj are zero either way): donor = the donor
    # layer of that position cut to the target widths, copy = the widened base layer before it (LLaMA-Pro).
    # None: donor with a real donor, copy with a random one.
    new_layers: NewLayers | None = None
    max_shard_size: ShardSize = "5GB"
    align: AlignMethod = "none"
    select: UnitSelection = "index"


class WandbConfig(StrictModel):
    """Where a stage logs to Weights & Biases; `auto` goes online only with an API key and a reachable server."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "frankenllama"
    entity: str | None = None
    group: str | None = None  # default: the run folder's name, so all stages of one run share a group
    name: str | None = None  # default: "<group>-<stage>"


class TrainDataConfig(StrictModel):
    """The token slice to train on: jsonl/jsonl.gz files with `text` (RedPajama's schema), local or on the hub.

    A source is a local file, folder or glob; a hub dataset id (`org/name`, all its jsonl files) or one
    file pattern in it (`org/name/wikipedia_*.jsonl`); or `python-stdlib-docs`, the bundled sample corpus.
    `seed` chooses which documents form the slice and the held-out set, and nothing else: the order the blocks
    are trained in follows the run's `seed`, so runs that differ only in `seed` train on the very same tokens.
    """

    sources: list[str] = Field(default_factory=lambda: ["togethercomputer/RedPajama-Data-1T-Sample"], min_length=1)
    tokens: int = Field(default=20_000_000, gt=0)  # the whole slice, held-out documents included
    heldout_fraction: float = Field(default=0.005, gt=0, lt=0.5)
    seed: int = 0


class LoraSettings(StrictModel):
    """LoRA adapters; defaults are the QLoRA paper's recipe for 33B-class models."""

    r: int = Field(default=64, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )


class WatchdogConfig(StrictModel):
    """The training-time degeneration check (pipeline/watchdog.py): greedy samples every `every_steps` steps."""

    enabled: bool = True
    every_steps: int = Field(default=50, gt=0)
    max_new_tokens: int = Field(default=48, ge=16)  # the detector's one-token-run threshold is 8 tokens
    stop_on_degenerate: bool = True  # save a checkpoint and stop instead of spending the rest of the budget
    prompts: int = Field(default=8, ge=1, le=60)  # the first N shipped probe prompts (pipeline/probe_prompts.jsonl)


class FastRecipeConfig(StrictModel):
    """Levers of the fast recipe on CUDA (train/fast_recipe.py), each measured on its own in benchmarks/RESULTS.md."""

    # What each decoder layer keeps for its backward. full: its input only (the layer runs again in the backward);
    # selective: its input too, but the recompute is compiled into the backward, which runs only what the backward
    # reads (not down_proj's product), and `saved_layers` layers also keep their frozen products;
    # offload: its input only, in pinned CPU memory (frees seq x hidden x 4 bytes of GPU memory per layer).
    checkpointing: Literal["full", "selective", "offload"] = "selective"
    cuda_graphs: bool = False  # torch.compile's reduce-overhead mode for the compiled decoder layers
    # Who draws LoRA's dropout masks in the compiled layers. packed: one Triton kernel per dropout, each Philox call
    # deciding 8 elements (16 random bits each), the mask stored one bit per element (train/lora_dropout.py), measured
    # 2-3% faster than inductor's on the 22b (-22 ms per micro-batch at seq 2048, -34 ms at 4096, one H100 run);
    # inductor: inductor's own RNG, one Philox call per element inside the fused kernels; torch: torch's dropout
    # kernel (inductor's fallback_random), measured 3% slower than inductor's (benchmarks/RESULTS.md).
    dropout_masks: Literal["inductor", "packed", "torch"] = "packed"
    cudnn_attention: bool = False  # training attention tries cuDNN's kernels before FlashAttention-2
    # Who dequantizes NF4 weights in training: train/nf4_kernel.py's one Triton kernel, or bitsandbytes' three
    # kernels (the same bits).
    dequantize: Literal["triton", "bitsandbytes"] = "triton"
    # Under selective checkpointing, the last N decoder layers keep their frozen matmul products and attention output
    # for the backward instead of recomputing them: 0.47 GiB more peak memory per layer measured on the 22b at 4096
    # tokens per micro-batch, 6 ms less per micro-batch. 10 is what fits that shape in 23 GiB with offload_inputs
    # (22.4 GiB reserved; 12 was no faster, 16 ran out of memory; without offload_inputs 6 fits); ignored under the
    # other modes.
    saved_layers: int = Field(default=10, ge=0)
    # Under selective checkpointing, every layer's input but the last waits in pinned CPU memory for the backward
    # (seq x hidden x 4 bytes per layer of GPU memory freed, 4 GiB on the 22b at 4096 tokens per micro-batch, as much
    # pinned host memory taken, the copies overlapping the compute); the room goes to saved_layers. Ignored under the
    # other modes.
    offload_inputs: bool = True
    # Under selective checkpointing, the first N decoder layers (those not among the last saved_layers) keep their
    # frozen products too, in pinned CPU memory, so they skip their recompute without taking GPU memory: 0.53 GiB of
    # pinned host RAM per layer on the 22b at 4096 tokens per micro-batch (6.3 GiB at 12, beside offload_inputs'
    # 4 GiB), the PCIe copies hidden behind the compute. Measured on an H100 (22b): 12 took 38 ms (seq 2048) and
    # 52 ms (seq 4096) off the micro-batch, 20 took 60 ms at seq 2048 for 14.5 GiB of pinned RAM in all. Set 0 on
    # a box short of RAM. Ignored under the other modes.
    host_saved_layers: int = Field(default=12, ge=0)

    @property
    def saved_layers_in_effect(self) -> int:
        """saved_layers where it applies (selective checkpointing), else 0."""
        return self.saved_layers if self.checkpointing == "selective" else 0

    @property
    def offload_inputs_in_effect(self) -> bool:
        """offload_inputs where it applies (selective checkpointing)."""
        return self.offload_inputs and self.checkpointing == "selective"

    @property
    def host_saved_layers_in_effect(self) -> int:
        """host_saved_layers where it applies (selective checkpointing), else 0."""
        return self.host_saved_layers if self.checkpointing == "selective" else 0

    @model_validator(mode="after")
    def _selective_levers_need_selective(self):
        levers = {"saved_layers": (self.saved_layers, 0), "offload_inputs": (self.offload_inputs, False),
                  "host_saved_layers": (self.host_saved_layers, 0)}  # (set, off)
        for name, (value, off) in levers.items():
            if name in self.model_fields_set and value != off and self.checkpointing != "selective":
                raise ValueError(f"train.fast.{name}={value} needs train.fast.checkpointing=selective (it is "
                                 f"{self.checkpointing}); set {name} to {off} or checkpointing to selective")
        return self


class TrainConfig(StrictModel):
    """QLoRA fine-tuning of the surgery output (or of `model`, a folder or hub id)."""

    model: str | None = None
    max_steps: int = Field(default=100, gt=0)
    save_steps: int = Field(default=50, gt=0)
    seq_len: int = Field(default=2048, gt=0)
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)
    quantization: Literal["nf4", "none"] = "nf4"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optimizer: Literal["auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "auto"  # auto: paged on CUDA
    learning_rate: float = Field(default=1e-4, gt=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    batch_size: int = Field(default=1, gt=0)
    grad_accum: int = Field(default=16, gt=0)
    max_grad_norm: float = Field(default=0.3, gt=0)
    save_total_limit: int = Field(default=3, ge=2)  # 2+: rotation never leaves a torn newest as the only one
    gradient_checkpointing: bool = True
    # fast: the plain recipe's math with bf16 frozen tables, one dequantization per pass, compiled decoder layers
    # and fused cross-entropy on CUDA (train/fast_recipe.py); plain: peft's prepare_model_for_kbit_training.
    recipe: Literal["fast", "plain"] = "fast"
    # Like num_gpus below, the levers change how fast the stage runs, not what it computes: kept out of fingerprints.
    fast: FastRecipeConfig = Field(default_factory=FastRecipeConfig, exclude=True)
    max_shard_size: ShardSize = "5GB"  # shards of the merged export
    # What the merged export adds the adapter to (train/export.py): the NF4 weights training saw, each quantized as
    # loading does and dequantized (closer to the trained model: benchmarks/RESULTS.md, Export fidelity), or the
    # stored base weights. With quantization none both are the stored weights.
    merge: MergeInto = "dequantized_nf4"
    # The held-out loss and bits per byte (train/heldout.py), logged to log_history.json and wandb as heldout_loss
    # and heldout_bits_per_byte with tokens_seen: at the start, every eval_steps steps and at the end, on the first
    # eval_blocks seq_len-token windows of the held-out documents (at the 22b's seq 2048, 16 windows are 33k
    # tokens: forward passes only, a fraction of one optimizer step). None: off.
    eval_steps: int | None = Field(default=50, gt=0)
    eval_blocks: int = Field(default=16, gt=0)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    # How many processes (one per GPU) train, and how they split the work: ddp = a full 4-bit copy per GPU, fsdp =
    # the model sharded across GPUs (train/launch.py). They change how the stage runs, not what it computes (the
    # global batch stays batch_size x grad_accum), so `exclude` keeps them out of dumps and thus out of stage
    # fingerprints: a finished stage is not retrained and checkpoints resume when only these change.
    num_gpus: int = Field(default=1, ge=1, exclude=True)
    distributed: Literal["ddp", "fsdp"] = Field(default="ddp", exclude=True)


class ProbeConfig(StrictModel):
    """The degeneration probe: greedy outputs on the shipped prompts, judged against the base's outputs."""

    prompts: int = Field(default=60, ge=1, le=60)  # the first N of pipeline/probe_prompts.jsonl
    max_new_tokens: int = Field(default=64, ge=16)  # the detector's one-token-run threshold is 8 tokens
    batch_size: int = Field(default=16, gt=0)
    fail_on_degenerate: bool = True  # a DEGENERATE model makes the stage exit 3 (recorded in its manifest)
    skip_benchmarks_on_degenerate: bool = True


class PreservationConfig(StrictModel):
    """Logit agreement of each model with the base on held-out text (the surgery must be exact)."""

    enabled: bool = True
    texts: int = Field(default=16, gt=0)
    max_tokens: int = Field(default=256, gt=1)  # per text


class PerplexityConfig(StrictModel):
    """Bits per byte and token perplexity on <run_dir>/train/heldout.jsonl."""

    enabled: bool = True
    max_texts: int | None = Field(default=None, gt=0)  # None: every held-out document
    window: int = Field(default=1024, gt=1)  # tokens per forward; context restarts at each window


class BenchmarkSubset(StrictModel):
    """Items to score (None: the whole split; for MMLU: items per subject) and few-shot examples per item."""

    n: int | None = Field(default=None, gt=0)
    num_fewshot: int = Field(default=0, ge=0)


# The old Open LLM Leaderboard's shots, and the subset sizes the 22b runs score.
LEADERBOARD_SUBSETS = {
    "arc_challenge": {"n": 300, "num_fewshot": 25},
    "hellaswag": {"n": 300, "num_fewshot": 10},
    "mmlu": {"n": 10, "num_fewshot": 5},
    "truthfulqa_mc2": {"n": 300, "num_fewshot": 0},
}


class BenchmarksConfig(StrictModel):
    """lm-evaluation-harness with the old Open LLM Leaderboard settings, on seeded item subsets."""

    enabled: bool = True
    data_dir: Path | None = None  # a folder in the hub schemas (scripts/fetch_benchmarks.py); None: the hub
    batch_size: int = Field(default=8, gt=0)
    subset_seed: int = 0  # the same items for every model of a run
    arc_challenge: BenchmarkSubset = Field(
        default_factory=lambda: BenchmarkSubset(**LEADERBOARD_SUBSETS["arc_challenge"]))
    hellaswag: BenchmarkSubset = Field(default_factory=lambda: BenchmarkSubset(**LEADERBOARD_SUBSETS["hellaswag"]))
    mmlu: BenchmarkSubset = Field(default_factory=lambda: BenchmarkSubset(**LEADERBOARD_SUBSETS["mmlu"]))
    truthfulqa_mc2: BenchmarkSubset = Field(
        default_factory=lambda: BenchmarkSubset(**LEADERBOARD_SUBSETS["truthfulqa_mc2"]))

    @model_validator(mode="before")
    @classmethod
    def keep_unset_leaderboard_settings(cls, data: Any) -> Any:
        """A partly given subset keeps the leaderboard's other setting: `--set eval.benchmarks.arc_challenge.n=100`
        must shrink ARC, not also turn it into a 0-shot task."""
        if isinstance(data, dict):
            data = {**data, **{name: {**default, **data[name]} for name, default in LEADERBOARD_SUBSETS.items()
                               if isinstance(data.get(name), dict)}}
        return data


class EvalConfig(StrictModel):
    """Which models to check, and how."""

    # Model references (folder, hub id, packaged name). None: surgery.base, <run_dir>/surgery and
    # <run_dir>/train/merged, whichever exist.
    models: list[str] | None = None
    base: str | None = None  # the reference for verdicts and paired differences; None: surgery.base or models[0]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # One dtype for every model of the run (eval/precision.py). auto: float32 when the largest model's float32
    # weights fit the device's free memory less the largest forward's float32 activations (pipeline/sizing.py),
    # else the largest model's stored half precision (bfloat16 when it is stored in float32). Preservation's
    # logits are float32 either way.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    preservation: PreservationConfig = Field(default_factory=PreservationConfig)
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    benchmarks: BenchmarksConfig = Field(default_factory=BenchmarksConfig)
    # None: the train section's wandb settings (project, entity, group, mode), so the eval results land in the
    # train run's group as their own `<group>-eval` run.
    wandb: WandbConfig | None = None


class RunConfig(StrictModel):
    """One run: where it writes, and one section per stage."""

    run_dir: Path
    # The run seed: LoRA initialisation, dropout and the order the training blocks are drawn in (not the data slice:
    # train.data.seed). `python -m pipeline run CONFIG --seeds 0,1,2` repeats a run with other seeds.
    seed: int = 0
    surgery: SurgeryConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    @property
    def is_control(self) -> bool:
        """A control run (surgery.mode none): nothing is widened and the train stage trains surgery.base itself."""
        return self.surgery is not None and self.surgery.mode == "none"


def section_fingerprint(section: BaseModel | None) -> str:
    """A stable hash of a config section, so a manifest can tell whether its stage is stale."""
    payload = json.dumps(section.model_dump(mode="json") if section else None, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (so 3 is an int)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: expected dotted.key=value, for example train.max_steps=10")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}{extra}; check its spelling against configs/smoke.yaml"
    return f"{source}: {key}: {first['msg']} (got {first.get('input')!r}){extra}; fix the value"


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config (YAML) and apply `--set` overrides; every problem is a one-line UserError."""
    raw: dict[str, Any] = {}
    source = "--set"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found; pass an existing YAML file, e.g. configs/smoke.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return validate_config(raw, source)
