"""What a run needs, in bytes, from the model widths alone: parameter counts, disk, and GPU and CPU memory.

Everything here is computed from config.json fields, so `frankenllama doctor` can judge a run before a single
weight is downloaded, and the rehearsal (scripts/rehearse.py) can split what it measured at K layers into
per-layer and fixed terms. These are estimates. The training terms are fitted to the train stage's measured
peaks on the 22b shape (benchmarks/RESULTS.md, Train: 16.36, 19.52 and 19.52 GiB for the fast recipe at
2048 x 1, 2048 x 2 and 4096 x 1 tokens), which they reproduce within 0.1 GiB; the plain recipe's two cells
within 5%, on the high side.

Eval's memory rule lives here too, because eval applies it and the doctor predicts it (one rule, two users): a
GPU's weight budget is its free memory less the largest forward's activations and a little allocator slack, and
the largest model is scored in float32 only when its float32 weights fit that budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only read here; sizing stays importable where pydantic is not installed (benchmarks on a GPU box)
    from pipeline.config import EvalConfig, FastRecipeConfig

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 with double quantization: 4 bits per weight, one 8-bit absmax per 64 weights and one fp32 scale per 256
# absmax values (bitsandbytes' blocksizes).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Under activation checkpointing, the one decoder layer being recomputed keeps about this many bytes per token
# for each hidden and each intermediate channel (bf16 q/k/v/o and MLP outputs, LoRA dropout copies, norms):
# fitted to the measured peaks above.
RECOMPUTE_BYTES_PER_HIDDEN = 40
RECOMPUTE_BYTES_PER_INTERMEDIATE = 16
# Unfused cross-entropy: fp32 logits, their softmax and their gradient, per token and vocabulary entry.
UNFUSED_LOGITS_BYTES = 12
# Scoring forwards without a KV cache keep, per token, the logits and their log-softmax (two values per vocabulary
# entry) and one MLP intermediate, all in the dtype the model computes in: in bf16 that reproduces the 1.56 GiB
# measured above the weights for 8 x 1300 tokens at the 22b widths (design note train-and-eval.md).
SCORING_VALUES_PER_VOCAB = 2
# Perplexity upcasts its logits to float32 and cross-entropy takes a float32 log-softmax of them.
PERPLEXITY_FP32_BYTES_PER_VOCAB = 8
# Rough prompt lengths in Llama tokens of the leaderboard's few-shot contexts: (fixed, per shot). ARC's 25-shot is
# about 1.3k tokens; MMLU's is its longest subject's (professional_law, ~2k at 5 shots), since the batch of the
# longest contexts sets the peak; TruthfulQA carries a 6-question preamble. Estimates.
FEWSHOT_TOKENS = {"arc_challenge": (60, 50), "hellaswag": (100, 90), "mmlu": (150, 400), "truthfulqa_mc2": (300, 0)}
PROBE_PROMPT_TOKENS = 100
# What eval keeps free on a GPU beyond the estimated activations: the caching allocator's fragmentation between
# forwards of different sizes, cuBLAS workspaces. The rehearsal's out-of-memory left ~0.3 GiB of a 6 GiB cap
# reserved but unusable (benchmarks/RESULTS.md, Rehearsal); an out-of-memory costs hours, a GiB more in CPU RAM
# costs seconds per model.
EVAL_ALLOCATOR_SLACK = GIB
HALF_DTYPES = ("bfloat16", "float16")
# An interpreter with torch, transformers and the CUDA libraries loaded, before any model.
PROCESS_BASE_BYTES = 3 * GIB


@dataclass(frozen=True)
class LlamaShape:
    """The widths of a Llama that decide its size (config.json's names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict) -> LlamaShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def widened(self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int,
                intermediate_size: int) -> LlamaShape:
        """The surgery's output: new widths, the base's depth, vocabulary and head_dim."""
        return replace(self, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size)

    def with_layers(self, layers: int) -> LlamaShape:
        return replace(self, num_hidden_layers=layers)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder linear."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params_per_layer(self) -> int:
        return sum(n_in * n_out for n_in, n_out in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        return self.linear_params_per_layer + 2 * self.hidden_size  # two RMSNorm gains

    @property
    def table_params(self) -> int:
        """embed_tokens and lm_head (one matrix when tied) plus the final norm."""
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_hidden_layers * self.layer_params + self.table_params

    def largest_tensor_params(self) -> int:
        return max(self.vocab_size * self.hidden_size, *(a * b for a, b in self.linear_shapes().values()))

    def largest_block_params(self) -> int:
        """The largest piece accelerate places whole: a decoder layer, or an embedding table."""
        return max(self.layer_params, self.vocab_size * self.hidden_size)

    def lora_params_per_layer(self, r: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        return sum(r * (shapes[name][0] + shapes[name][1]) for name in targets if name in shapes)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """A KV cache's bytes per token over all layers (generation)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Estimate:
    """Bytes, and the parts they are made of (for a doctor's detail column or a rehearsal's split)."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return " + ".join(f"{name} {value / GIB:.1f}" for name, value in self.parts.items() if value) + " GiB"


def train_memory(shape: LlamaShape, *, quantization: str, recipe: str, seq_len: int, batch_size: int, lora_r: int,
                 lora_targets: list[str], gradient_checkpointing: bool, fused_cross_entropy: bool,
                 cuda: bool = True) -> Estimate:
    """Peak memory of one training process on its device: allocated GPU memory (bf16 compute, paged AdamW), or
    RAM on a CPU (fp32 compute, plain AdamW, none of the fast recipe's CUDA levers). Paged optimizer states are
    left out: they live in CUDA unified memory, which the driver pages out to CPU RAM under pressure."""
    layers, tokens = shape.num_hidden_layers, seq_len * batch_size
    compute_bytes = 2 if cuda else 4
    linear = shape.linear_params_per_layer * layers
    weight_bytes = NF4_BYTES_PER_PARAM if quantization == "nf4" else compute_bytes
    # The plain recipe (peft's prepare_model_for_kbit_training) upcasts the tables to fp32; the fast one does not.
    table_bytes = 4 if recipe == "plain" else compute_bytes
    lora = shape.lora_params_per_layer(lora_r, lora_targets) * layers
    # Checkpointing keeps each layer's fp32 residual input; the LoRA gradients grow as those are freed in the
    # backward, so the peak holds the larger of the two, plus the layer being recomputed.
    recompute = tokens * (shape.hidden_size * RECOMPUTE_BYTES_PER_HIDDEN
                          + shape.intermediate_size * RECOMPUTE_BYTES_PER_INTERMEDIATE) * compute_bytes // 2
    if gradient_checkpointing:
        kept = max(tokens * layers * shape.hidden_size * 4, lora * 4) + recompute
    else:
        kept = layers * (recompute + tokens * shape.hidden_size * 4) + lora * 4
    parts = {
        "weights": linear * weight_bytes,
        "tables": (shape.table_params - shape.hidden_size) * table_bytes + (2 * layers + 1) * shape.hidden_size * 4,
        "LoRA": lora * 4,
        "optimizer": 0 if cuda else 8 * lora,
        # The fast recipe dequantizes one layer's weights to bf16 for autograd (train/fast_recipe.py).
        "dequantized layer": shape.linear_params_per_layer * 2 if cuda and recipe == "fast" and quantization == "nf4"
        else 0,
        "activations": kept,
        "logits": 0 if cuda and fused_cross_entropy else tokens * shape.vocab_size * UNFUSED_LOGITS_BYTES,
    }
    return Estimate(parts)


def pinned_activation_bytes(shape: LlamaShape, fast: FastRecipeConfig, *, seq_len: int, batch_size: int) -> int:
    """Pinned CPU RAM the fast recipe's offloaded activations take on CUDA (train/activation_offload.py).

    Each offloaded layer input is the fp32 residual stream; a host-saved layer also sends its frozen products in
    bf16: q, attention's output and o (hidden wide each), k and v (the KV width), gate and up (intermediate). Each
    tensor's pinned chunks round it up by less than 1 MiB, left out here.
    """
    layers, tokens = shape.num_hidden_layers, seq_len * batch_size
    # The last layer keeps what it saves on the GPU: the backward needs it first.
    host_saved = min(fast.host_saved_layers_in_effect, layers - fast.saved_layers_in_effect, layers - 1)
    if fast.checkpointing == "offload":
        inputs = layers
    elif fast.offload_inputs_in_effect:
        inputs = layers - 1
    else:
        inputs = host_saved
    kv_width = shape.num_key_value_heads * shape.head_dim
    products = 3 * shape.hidden_size + 2 * kv_width + 2 * shape.intermediate_size
    return tokens * (inputs * shape.hidden_size * 4 + host_saved * products * 2)


def optimizer_state_bytes(shape: LlamaShape, lora_r: int, lora_targets: list[str]) -> int:
    """AdamW's two fp32 moments of every LoRA parameter (paged on CUDA)."""
    return 8 * shape.lora_params_per_layer(lora_r, lora_targets) * shape.num_hidden_layers


def scoring_bytes_per_token(shape: LlamaShape, dtype_bytes: int = 2) -> int:
    """Activation bytes per token of a cache-free scoring forward (benchmarks, preservation) in a dtype this wide."""
    return (shape.vocab_size * SCORING_VALUES_PER_VOCAB + shape.intermediate_size) * dtype_bytes


def generation_bytes(shape: LlamaShape, batch: int, tokens: int, dtype_bytes: int = 2) -> int:
    """Greedy generation (the probe): a KV cache for `tokens` per sequence, and one step's fp32 logits."""
    return batch * (tokens * shape.kv_bytes_per_token(dtype_bytes) + shape.vocab_size * 4)


def checkpoint_bytes(shape: LlamaShape, lora_r: int, lora_targets: list[str]) -> int:
    """One training checkpoint: the fp32 adapter and AdamW's two moments."""
    return 12 * shape.lora_params_per_layer(lora_r, lora_targets) * shape.num_hidden_layers


def surgery_ram(base: LlamaShape, target: LlamaShape, dtype_bytes: int) -> int:
    """Surgery holds the largest tensor's base, donor and output copies (benchmarks/RESULTS.md: 0.86 GB peak RSS
    for a 1B -> 1.5B widening, whose largest tensor is 164 MB)."""
    return 3 * target.largest_tensor_params() * dtype_bytes + GIB // 2


def longest_fewshot_context(settings: EvalConfig) -> int:
    """Tokens of the longest few-shot context the configured benchmarks build (FEWSHOT_TOKENS' estimates)."""
    return max(fixed + per_shot * getattr(settings.benchmarks, name).num_fewshot
               for name, (fixed, per_shot) in FEWSHOT_TOKENS.items())


def eval_forward_bytes(settings: EvalConfig, shape: LlamaShape, dtype: str) -> dict[str, int]:
    """Activation bytes of each forward eval makes beside a model's weights when it scores in `dtype`, keyed by the
    setting that sizes it (what to lower when it does not fit): the probe's generation, a perplexity window, a
    benchmark batch of the longest few-shot contexts, preservation's one batched forward over all its texts (always
    float32). Scoring forwards build no KV cache."""
    width = DTYPE_BYTES[dtype]
    probe = settings.probe
    forwards = {"eval.probe.batch_size": generation_bytes(shape, probe.batch_size,
                                                          PROBE_PROMPT_TOKENS + probe.max_new_tokens, width)}
    if settings.perplexity.enabled:
        per_token = scoring_bytes_per_token(shape, width) + shape.vocab_size * PERPLEXITY_FP32_BYTES_PER_VOCAB
        forwards["eval.perplexity.window"] = settings.perplexity.window * per_token
    if settings.preservation.enabled:
        preservation = settings.preservation
        forwards["eval.preservation.texts"] = (preservation.texts * preservation.max_tokens
                                               * scoring_bytes_per_token(shape, DTYPE_BYTES["float32"]))
    if settings.benchmarks.enabled:
        forwards["eval.benchmarks.batch_size"] = (settings.benchmarks.batch_size * longest_fewshot_context(settings)
                                                  * scoring_bytes_per_token(shape, width))
    return forwards


def eval_weight_budget(free: int, activations: int) -> int:
    """Bytes of weights eval lets accelerate place on a device with `free` bytes free: what is left after the
    largest forward's activations and the allocator's slack. accelerate keeps room for an offloaded layer in
    transit within this budget itself (its infer_auto_device_map, and transformers' copy of it, subtract the
    largest remaining layer on the first GPU), so that layer is not counted here."""
    return max(free - activations - EVAL_ALLOCATOR_SLACK, 0)


def half_dtype(stored: str) -> str:
    """The half precision a model too large for float32 is scored in: its stored one, bfloat16 (float32's range)
    when it is stored in float32."""
    return stored if stored in HALF_DTYPES else "bfloat16"


@dataclass(frozen=True)
class EvalMemory:
    """How eval uses a device: the dtype every model is scored in, the bytes of its largest forward in that dtype
    and the setting that sizes that forward, the device's free bytes, and the largest forward's bytes in float32
    (what "auto" asked about: do the largest model's float32 weights fit beside them)."""

    dtype: str
    activations: int
    forward: str
    free: int
    float32_activations: int

    @property
    def weight_budget(self) -> int:
        return eval_weight_budget(self.free, self.activations)

    @property
    def float32_budget(self) -> int:
        return eval_weight_budget(self.free, self.float32_activations)


def eval_memory(settings: EvalConfig, models: Iterable[tuple[LlamaShape, str]], free: int) -> EvalMemory:
    """eval.dtype for `models` ((shape, stored dtype) pairs) on a device with `free` bytes free; for "auto",
    float32 when the largest model's float32 weights fit the budget float32's forwards leave, else the largest
    model's half precision. The activations are the largest forward of any of the models in the chosen dtype."""
    models = list(models)
    largest, stored = max(models, key=lambda model: model[0].params)

    def largest_forward(dtype: str) -> tuple[str, int]:
        return max(((setting, size) for shape, _ in models
                    for setting, size in eval_forward_bytes(settings, shape, dtype).items()), key=lambda item: item[1])

    float32_activations = largest_forward("float32")[1]
    dtype = settings.dtype
    if dtype == "auto":
        fits = largest.params * DTYPE_BYTES["float32"] <= eval_weight_budget(free, float32_activations)
        dtype = "float32" if fits else half_dtype(stored)
    forward, activations = largest_forward(dtype)
    return EvalMemory(dtype, activations, forward, free, float32_activations)
