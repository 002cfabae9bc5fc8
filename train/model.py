"""The model to train: an NF4 (or plain) base with LoRA adapters on the decoder's linear layers.

QLoRA's recipe: NF4 with double quantization on every decoder linear, bf16 compute on CUDA (fp32 on CPU,
which has no fast bf16 matmul for this path). Unlike peft's `prepare_model_for_kbit_training`, the frozen
embeddings and lm_head are NOT upcast to fp32: they take no gradient, and for a 32000 x 6656 pair the upcast
alone costs 1.7 GB of a 24 GB card. What that upcast does buy is an fp32 residual stream, and that is kept:
see `keep_residual_stream_fp32`. Gradient checkpointing uses the non-reentrant variant, which needs no
`enable_input_require_grads` hook on the embeddings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.config import FastRecipeConfig, LoraSettings, TrainConfig
from pipeline.errors import UserError, error_reason

log = logging.getLogger(__name__)


def training_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def nf4_config(compute: torch.dtype, sharded: bool = False):
    """NF4 with double quantization; `sharded` (FSDP) packs the 4-bit values into the compute dtype.

    FSDP flattens the parameters of each wrapped decoder layer into one tensor and can only do that for one
    floating dtype, so the 4-bit storage must match the layer's other weights (bitsandbytes' FSDP-QLoRA guide).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": compute} if sharded else {}),
    )


def quantized_on_load(name: str, shape: tuple[int, ...]) -> bool:
    """Whether loading with `nf4_config` quantizes this checkpoint tensor.

    transformers' bitsandbytes integration replaces every nn.Linear but the output embedding (lm_head); in a Llama
    those are exactly the 2-D weights inside the decoder layers (q/k/v/o, gate/up/down). Embeddings, norms and
    lm_head keep the compute dtype.
    """
    return name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2


def nf4_round_trip(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`weight` as the NF4-loaded model holds it: quantized exactly as loading quantizes it (a bitsandbytes
    Params4bit with nf4_config's settings, from the load dtype, on `device`), then dequantized, in the load dtype."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    load_dtype = compute_dtype(device)
    settings = nf4_config(load_dtype)
    quantized = bnb.nn.Params4bit(
        weight.to(device=device, dtype=load_dtype), requires_grad=False,
        compress_statistics=settings.bnb_4bit_use_double_quant, quant_type=settings.bnb_4bit_quant_type,
        quant_storage=settings.bnb_4bit_quant_storage,
    ).to(device)
    blocksize = quantized.quant_state.blocksize
    code_zero_blocks_exactly(quantized, zero_blocks(weight, blocksize), blocksize)  # as load_base_model does
    return bnbf.dequantize_4bit(quantized.data, quantized.quant_state)


# bitsandbytes' NF4 table holds 0.0 exactly at index 7; one byte packs two 4-bit codes.
NF4_ZERO_BYTE = 0x77


def zero_blocks(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Which blocks of `blocksize` consecutive weights (bitsandbytes' 4-bit blocks, over the row-major flattening)
    are all zero; a last, partial block counts as one."""
    flat = weight.reshape(-1)
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize).eq(0).all(dim=1)


def code_zero_blocks_exactly(packed: torch.Tensor, blocks: torch.Tensor, blocksize: int) -> int:
    """Give every weight of the all-zero `blocks` NF4's exact 0 in the packed 4-bit data; returns how many blocks.

    On CUDA, bitsandbytes codes a block whose weights are all 0 against an absmax of 0, and the double-quantized
    absmax comes back as a tiny non-zero number, so the block dequantizes to small non-zero values (the GPU
    rehearsal saw it for every all-zero block of a 22b-width widening: benchmarks/RESULTS.md). The surgery's exact
    modes are made of such blocks (the top-right 0 of every linear, `readers`' writer rows, new layers' writers);
    coded as 0 they give back exactly 0, whatever the absmax. On CPU bitsandbytes already codes them so.
    """
    data = packed.data.view(-1).view(torch.uint8)  # a view: the writes land in the parameter (view fails otherwise)
    byte_mask = blocks.to(data.device).repeat_interleave(blocksize // 2)[: data.numel()]
    data[byte_mask] = NF4_ZERO_BYTE
    return int(blocks.sum())


def keep_zero_blocks_zero(model: torch.nn.Module, model_dir: Path) -> int:
    """Code every block of 4-bit weights that is all zero in the checkpoint as exact zeros (see
    code_zero_blocks_exactly); reads the stored weights one tensor at a time. Returns how many blocks it found.

    Weights on the meta device (the other processes of an FSDP load, which receive the first process's) are skipped.
    """
    import bitsandbytes as bnb

    from pipeline.checkpoint import CheckpointReader

    reader = CheckpointReader(model_dir)
    found = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type == "meta":
            continue
        blocksize = module.weight.quant_state.blocksize
        blocks = zero_blocks(reader.get(f"{name}.weight"), blocksize)
        if blocks.any():
            found += code_zero_blocks_exactly(module.weight, blocks, blocksize)
    return found


def load_base_model(model_dir: Path, quantization: str, device: torch.device, sharded: bool = False):
    """The frozen base, NF4-quantized while loading (never materialized in full precision on the GPU).

    Each process loads onto its own GPU (`device` is cuda:<local rank> in a worker); with `sharded` FSDP then
    keeps only this process's shard of every decoder layer. On CPU the 4-bit weights keep bitsandbytes' packed
    layout (`keep_cpu_4bit_weights_trainable`): every user of this model, training, the merge and its checks,
    reads that layout, and the AVX512-BF16 repacking fails outright on weights narrower than a block.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": compute_dtype(device), "device_map": {"": str(device)}}
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(compute_dtype(device), sharded)
    log.info("model: loading %s (%s weights, %s compute on %s)", model_dir, quantization, kwargs["dtype"], device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as err:
        reason = error_reason(err)
        raise UserError(
            f"cannot load the model from {model_dir} ({reason}); check the folder is a complete HF model"
        ) from None
    if quantization == "nf4":
        keep_cpu_4bit_weights_trainable(model)
        blocks = keep_zero_blocks_zero(model, model_dir)
        if blocks:
            log.info("model: %s all-zero blocks of the checkpoint coded as exact zeros in NF4", f"{blocks:,}")
    return model


def keep_cpu_4bit_weights_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs; returns how many layers it touched.

    On such CPUs the first eval-mode forward (generate, no_grad) repacks each Linear4bit's weight in place,
    and from then on gradients silently stop at every 4-bit linear: only the LoRA of layers whose input
    gradient is not needed (o_proj, down_proj) keeps learning while the loss still falls. The flag is only
    read on CPU, so setting it everywhere is harmless on CUDA.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def keep_residual_stream_fp32(model: torch.nn.Module, fp32_norms: bool = True) -> None:
    """Carry the residual stream in fp32 while the big frozen tables stay in half precision.

    A 4-bit linear hands back its output in its input's dtype, and peft adds the LoRA delta to that output.
    At the start of training the delta is about 1e-4 of the base output: in a bf16 stream (8 mantissa bits)
    it is rounded away and the loss falls several times slower than with peft's fp32 upcast. Casting the
    embedding output to fp32 and the norm weights (a few MB) to fp32 keeps the stream fp32 end to end; the
    matmuls still run in bf16 under the Trainer's autocast. Only for 4-bit bases: a Linear4bit casts its input
    to the compute dtype itself, a plain half-precision nn.Linear would not. lm_head gets its input cast to its
    own dtype, so generation outside autocast (the watchdog's probes) works too.

    `fp32_norms=False` (FSDP, whose wrapped layers need one parameter dtype) leaves the norm weights in half
    precision: RMSNorm multiplies its half-precision weight with the fp32 stream, so the stream stays fp32.
    """
    for name, param in model.named_parameters():
        if fp32_norms and name.endswith("norm.weight") and param.dtype != torch.float32:
            param.data = param.data.float()
    model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, output: output.float())
    model.get_output_embeddings().register_forward_pre_hook(
        lambda module, inputs: (inputs[0].to(module.weight.dtype), *inputs[1:])
    )


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder layer (transformers renamed the method in 5.x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_for_training(model, lora: LoraSettings, gradient_checkpointing: bool, recipe: str = "fast",
                         sharded: bool = False, fast: FastRecipeConfig | None = None):
    """Freeze the base, add LoRA on the configured projections, enable checkpointing; returns the peft model.

    `plain` is peft's own QLoRA preparation (fp32 upcast of every non-4-bit weight), kept as the reference the
    fast recipe is measured against; `fast` gets the same math with bf16 frozen tables plus, on CUDA, the
    levers of train/fast_recipe.py. `sharded` (FSDP) keeps every frozen weight in the compute dtype and skips
    the CUDA levers: they replace the 4-bit layers' forward and compile the decoder layers, which FSDP wraps.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    for param in model.parameters():
        param.requires_grad_(False)
    quantized_layers = keep_cpu_4bit_weights_trainable(model)
    if recipe == "plain" and not sharded:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        if quantized_layers and model.get_input_embeddings().weight.dtype != torch.float32:
            keep_residual_stream_fp32(model, fp32_norms=not sharded)
        if gradient_checkpointing:
            enable_activation_checkpointing(model)
    lora_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(lora.target_modules) - present)
    if missing:
        raise UserError(f"train.lora.target_modules names {missing[0]!r}, which this model does not have")
    peft_model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("model: LoRA r=%d alpha=%g on %s: %s trainable parameters", lora.r, lora.alpha,
             ",".join(lora.target_modules), f"{trainable:,}")
    if recipe == "fast" and quantized_layers and not sharded and next(model.parameters()).is_cuda:
        from pipeline.config import FastRecipeConfig
        from train.fast_recipe import apply_cuda_levers

        levers = apply_cuda_levers(peft_model, fast or FastRecipeConfig())
        log.info("model: fast recipe on CUDA: %s", ", ".join(levers))
    return peft_model


def load_for_training(model_dir: Path, train: TrainConfig, device: torch.device):
    sharded = train.distributed == "fsdp"
    model = load_base_model(model_dir, train.quantization, device, sharded)
    return prepare_for_training(model, train.lora, train.gradient_checkpointing, train.recipe, sharded, train.fast)
