"""The fast QLoRA recipe: the plain recipe's math at a multiple of its tokens/s, on one 24 GB card.

Measured on an H200 (the packed dropout masks and host-saved layers on an H100) capped at 23 GiB with the 22b shape
(benchmarks/RESULTS.md has the tables and the notes), each lever kept only if it paid on its own:

- **fp32 residual stream, bf16 frozen tables** (train.model.keep_residual_stream_fp32, on every device): the
  plain recipe's fp32 upcast of the two 32000 x 6656 tables costs 1.7 GB; its side effect, an fp32 residual
  stream, is what keeps the early LoRA deltas from being rounded away, and that part is kept.
- **Dequantize once per layer and pass.** bitsandbytes dequantizes each 4-bit weight in the forward and again
  in the backward. A plain `F.linear` on the dequantized weight lets autograd keep that bf16 weight for the
  backward instead; under activation checkpointing the first forward keeps nothing, so the extra memory is one
  decoder layer's weights (about 1 GB on the 22b shape) during its recompute and backward. The dequantization
  itself is one Triton kernel (train/nf4_kernel.py, `train.fast.dequantize`), the same bits as bitsandbytes'.
- **Compiled decoder layers** (`torch.compile` per layer): fuses the residual adds, norms, SwiGLU, RoPE and the
  LoRA elementwise work that otherwise run as hundreds of small kernels per layer.
- **LoRA's dropout masks bit-packed** (`train.fast.dropout_masks: packed`, train/lora_dropout.py; measured on an
  H100, 2-3% fewer seconds per micro-batch than inductor's own RNG): each Philox call decides 8 elements instead of
  inductor's 1, in one kernel per dropout whose mask the fused kernels read back.
- **Fused linear cross-entropy** (liger-kernel, optional): the 32000-wide fp32 logits and their gradient are
  never materialized, which frees the memory for a micro-batch of 2 at 2048 tokens.
- **What a layer keeps for its backward** (`train.fast.checkpointing`): `full` keeps only its input and runs the
  layer again in the backward; `selective` keeps the same, but the recompute is compiled into the backward graph,
  which reruns only what the backward reads (down_proj's product never is), and the last `train.fast.saved_layers`
  layers also keep q, k, v, o, gate and up's products and attention's output, so those run once, and with
  `train.fast.offload_inputs` the layers' inputs wait in pinned CPU memory, which leaves room for more such layers;
  the first `train.fast.host_saved_layers` layers keep their products too, in pinned CPU memory
  (train/activation_offload.py; measured on an H100, 4-5% fewer seconds per micro-batch at 12 layers);
  `offload` keeps only the input, in pinned CPU memory, which frees seq x hidden x 4 bytes per layer (what lets
  the 33b fit).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pipeline.config import FastRecipeConfig
from train.activation_offload import ActivationOffload, activations_in_cpu_memory, offloaded_checkpoint

log = logging.getLogger(__name__)


def _dequantize_once_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x)  # generation keeps bitsandbytes' fast small-batch kernels
    if self.dequantize_in_one_kernel:
        from train.nf4_kernel import dequantize

        weight = dequantize(self.weight.data, self.weight.quant_state)
    else:
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state)
    weight = weight.to(self.compute_dtype or x.dtype)
    # Like bitsandbytes: compute in the compute dtype, hand back the input's dtype (fp32 stream stays fp32).
    return F.linear(x.to(weight.dtype), weight, self.bias).to(x.dtype)


def dequantize_once_per_pass(model: torch.nn.Module, one_kernel: bool = False) -> int:
    """Route every training forward of a 4-bit linear through F.linear on its dequantized weight.

    `one_kernel`: NF4 weights of whole blocks are dequantized by train/nf4_kernel.py (the same bits in one kernel
    instead of bitsandbytes' three); FP4 weights keep bitsandbytes' kernel.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        state = layer.weight.quant_state
        layer.dequantize_in_one_kernel = (one_kernel and state.quant_type == "nf4"
                                          and state.shape.numel() % state.blocksize == 0)
        layer.forward = types.MethodType(_dequantize_once_forward, layer)
    return len(layers)


def fuse_linear_cross_entropy(model: torch.nn.Module) -> bool:
    """liger-kernel's fused lm_head + cross-entropy on this model instance; False when liger is absent."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        log.info("liger-kernel not installed, keeping the plain cross-entropy (pip install liger-kernel)")
        return False
    apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)
    return True


# ---- what a decoder layer keeps for its backward -----------------------------------------------------------

MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)  # what F.linear becomes in a traced layer


def keep_down_proj_output(hidden_size: int, intermediate_size: int):
    """A selective-checkpointing policy: save the down_proj product, recompute everything else.

    Of a Llama layer's matmuls, down_proj's (K = intermediate, N = hidden) gives the most FLOPs per byte kept:
    2 x intermediate FLOPs per output element, 2.7x q/k/v/o's or gate/up's on the 22b widths. Its input is still
    recomputed (down_proj's LoRA needs it), so only that one product is skipped. Matched by shape, because the
    policy sees aten ops, not modules; LoRA's products have the rank as one dimension and never match. Under
    torch.compile the backward graph drops that product anyway (the backward never reads it), so there the policy
    changes nothing; what pays is the recompute compiled into the backward graph.
    """
    def policy(ctx, op, *args, **kwargs):
        if op in MATMULS:
            a, b = args[-2], args[-1]
            if a.shape[-1] == intermediate_size and b.shape[-1] == hidden_size:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


ATTENTION_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))


def keep_frozen_products(rank: int):
    """A selective-checkpointing policy: save every frozen matmul product and attention's output.

    What the backward then recomputes is cheap: norms, RoPE, SwiGLU, LoRA's rank-r products and dropout, and the
    dequantized weights (the input gradients need them; kept, they would cost a layer's weights in bf16). What it
    no longer recomputes is most of a layer's FLOPs: q, k, v, o, gate and up (down's product is never needed) and
    the attention forward, for (5 x hidden + 2 x intermediate) x 2 bytes per token kept. LoRA's products are told
    apart by having the rank as one dimension.
    """
    def policy(ctx, op, *args, **kwargs):
        if op in MATMULS:
            if min(args[-2].shape[-1], args[-1].shape[-1]) > rank:
                return CheckpointPolicy.MUST_SAVE
        elif op in ATTENTION_OPS:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_checkpoint(policy):
    """A decoder layer's forward under selective checkpointing, for one torch.compile shared by every layer.

    The layer comes in as an argument, like `self` of a compiled bound method, so the one compiled graph serves all
    layers; a function per layer (or a policy per layer) would be recompiled for each and, past dynamo's limit of
    8, silently run eager.
    """
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)

    def forward(layer, *args, **kwargs):
        return checkpoint(type(layer).forward, layer, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return forward


def cudnn_attention_first():
    """scaled_dot_product_attention tries cuDNN's attention first (Hopper kernels), then flash, efficient, math.

    torch's own order puts flash (FlashAttention-2) first; the choice is made when a layer is traced, so the
    context only needs to hold around the compiled training forward (generation keeps torch's order).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def trace_checkpoint_side_effects_once() -> None:
    """Let dynamo trace a checkpointed region that mutates Python state, the mutation left out of the recompute.

    transformers >= 5.2x, with the `kernels` package it depends on, wraps LlamaAttention's forward in a context
    variable that routes RoPE to a hub kernel: set before the forward, reset after, no state left behind. Inside the
    selective layers' checkpoint that mutation is a side effect dynamo refuses to replay in the backward, so it
    breaks the graph and the whole layer silently runs eager (no fusion, no compiled recompute). The recompute has
    nothing to redo there; torch names this flag for exactly that case. A process-wide dynamo setting, read when a
    layer is traced: the decoder layers are all this process compiles. No-op on a torch without it.
    """
    import torch._dynamo.config

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


class GraphBreakWatch:
    """Warn once if tracing a compiled decoder layer broke its graph.

    A graph break is not an error: dynamo runs the rest of the layer eager (inside a checkpoint, the whole layer),
    training stays correct and only the speed is gone, which nothing else reports. Read from dynamo's own counters
    around each layer's first training call, where its graph is traced.
    """

    def __init__(self):
        self.traced: set[int] = set()
        self.warned = False

    @contextlib.contextmanager
    def first_call(self, index: int):
        """Around layer `index`'s training call: its first one traces it (or finds its shared graph compiled)."""
        if index in self.traced or self.warned:
            yield
            return
        from torch._dynamo.utils import counters

        before = dict(counters["graph_break"])
        yield
        self.traced.add(index)
        reasons = [reason for reason, count in counters["graph_break"].items() if count > before.get(reason, 0)]
        if reasons:
            self.warned = True
            log.warning("model: the compiled decoder layers broke their graph (%s): they run partly eager and train "
                        "slower than benchmarks/RESULTS.md says; report it with your torch and transformers versions, "
                        "or set train.recipe: plain", reasons[0].splitlines()[0][:200])


def compile_decoder_layers(layers: torch.nn.ModuleList, checkpointing: str = "full", cuda_graphs: bool = False,
                           compiler=torch.compile, attention_context=contextlib.nullcontext,
                           saved_layers: int = 0, rank: int = 0, offload_inputs: bool = False,
                           host_saved_layers: int = 0) -> int:
    """torch.compile each decoder layer's training forward and take over its activation checkpointing.

    transformers checkpoints around the layer's `__call__` (5.17) or inside its `forward` (5.24); doing it here
    instead makes the compiled region the same on both: the layer's own forward, checkpointed outside (`full`,
    `offload`) or inside (`selective`). Layers that were not checkpointed are compiled alone. Training blocks all
    have one shape, so one static graph serves every step; generation (the watchdog's probes, with a growing KV
    cache) and no-grad forwards keep the eager forward instead of recompiling for every length. Under `selective`,
    the last `saved_layers` layers keep their frozen matmul products for the backward (`keep_frozen_products`,
    `rank` being LoRA's); they share a second compiled graph; with `offload_inputs`, every layer's input but the
    last one's waits in pinned CPU memory for the backward (`activations_in_cpu_memory`). The first `host_saved_layers`
    layers (those not already among the last `saved_layers`) run that second graph too, and what it saves, their
    products with it, waits in pinned CPU memory.
    """
    compiler = functools.partial(compiler, dynamic=False, **({"mode": "reduce-overhead"} if cuda_graphs else {}))
    host_saved_layers = min(host_saved_layers, len(layers) - saved_layers) if checkpointing == "selective" else 0
    offload = (ActivationOffload(len(layers), host_saved_layers)
               if checkpointing == "offload" or offload_inputs or host_saved_layers else None)
    down_proj = layers[0].mlp.down_proj  # a LoRA wrapper knows its base layer's widths
    selective = saving = None
    graph_breaks = GraphBreakWatch()
    trace_checkpoint_side_effects_once()
    if checkpointing == "selective":
        selective = compiler(selective_checkpoint(keep_down_proj_output(down_proj.out_features,
                                                                        down_proj.in_features)))
        if saved_layers or host_saved_layers:
            saving = compiler(selective_checkpoint(keep_frozen_products(rank)))
    for index, layer in enumerate(layers):
        eager = types.MethodType(type(layer).forward, layer)
        if not getattr(layer, "gradient_checkpointing", False):
            train_forward = compiler(eager)
        elif selective is not None:
            on_host = index < host_saved_layers
            kept = on_host or (saved_layers and index >= len(layers) - saved_layers)
            train_forward = functools.partial(saving if kept else selective, layer)
            if offload_inputs or on_host:
                offloaded = index < len(layers) - 1
                train_forward = activations_in_cpu_memory(train_forward, offload, index, offloaded, layer)
                if offloaded:
                    layer.offload_slot = offload.slots[index]  # where what it saves waits for the backward
        elif offload is not None:
            train_forward = offloaded_checkpoint(compiler(eager), offload.slots[index], attention_context)
        else:
            train_forward = functools.partial(checkpoint, compiler(eager), use_reentrant=False)
        layer.gradient_checkpointing = False  # done here, once, around or inside the compiled forward

        def forward(*args, _layer=layer, _eager=eager, _train=train_forward, _index=index, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _eager(*args, **kwargs)
            with attention_context(), graph_breaks.first_call(_index):
                return _train(*args, **kwargs)

        layer.forward = forward
    return len(layers)


def draw_dropout_masks_with_torch() -> None:
    """Let compiled graphs call torch's dropout kernel instead of generating the random numbers in Triton.

    Inductor draws one Philox call per element (tl.rand keeps one of its four outputs) inside the kernel that uses
    them; torch's kernel keeps all four but writes the mask and the dropped tensor to memory for the next kernel to
    read. On the 22b the second cost more: 2-3% fewer tokens/s (benchmarks/RESULTS.md), so it is
    `train.fast.dropout_masks: torch`, not the default. A process-wide inductor setting (`fallback_random`): the
    decoder layers are all this process compiles.
    """
    import torch._inductor.config

    torch._inductor.config.fallback_random = True


def apply_cuda_levers(peft_model: torch.nn.Module, fast: FastRecipeConfig) -> list[str]:
    """Apply every lever to a LoRA-wrapped 4-bit Llama on CUDA; returns their names for the log."""
    causal_lm = peft_model.get_base_model()
    one_kernel = fast.dequantize == "triton"
    applied = [f"one dequantization per pass ({'one Triton kernel' if one_kernel else 'bitsandbytes'}) on "
               f"{dequantize_once_per_pass(causal_lm, one_kernel)} 4-bit linears"]
    if fuse_linear_cross_entropy(causal_lm):
        applied.append("fused linear cross-entropy (liger-kernel)")
    if fast.dropout_masks == "packed":
        from train.lora_dropout import pack_lora_dropout_masks

        if pack_lora_dropout_masks(peft_model):
            applied.append("LoRA dropout masks drawn 8 elements per Philox call, bit-packed")
    elif fast.dropout_masks == "torch":
        draw_dropout_masks_with_torch()
    attention = cudnn_attention_first if fast.cudnn_attention else contextlib.nullcontext
    rank = max(peft_model.peft_config[name].r for name in peft_model.peft_config)
    saved_layers = fast.saved_layers_in_effect
    offload_inputs = fast.offload_inputs_in_effect
    host_saved_layers = fast.host_saved_layers_in_effect
    compiled = compile_decoder_layers(causal_lm.model.layers, fast.checkpointing, fast.cuda_graphs,
                                      attention_context=attention, saved_layers=saved_layers, rank=rank,
                                      offload_inputs=offload_inputs, host_saved_layers=host_saved_layers)
    extras = [name for name, on in (("CUDA graphs", fast.cuda_graphs), ("torch dropout", fast.dropout_masks == "torch"),
                                    ("cuDNN attention", fast.cudnn_attention)) if on]
    saved = f", frozen products kept in the last {saved_layers}" if saved_layers else ""
    saved += f" and, in pinned CPU memory, the first {host_saved_layers}" if host_saved_layers else ""
    saved += ", layer inputs in pinned CPU memory" if offload_inputs else ""
    applied.append(f"{compiled} compiled decoder layers{' with ' + ', '.join(extras) if extras else ''}, "
                   f"{fast.checkpointing} activation checkpointing{saved}")
    return applied
