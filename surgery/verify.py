"""Check a surgery output against its base: fp32 logits on fixed text, and a one-step gradient probe.

The logit check is the proof of exactness (design/surgery.md, "Verifying"); the gradient probe shows whether
training can move the graft at all (the "trainability trap": block-diagonal with zero lm_head columns leaves
every new parameter at exactly zero gradient).

Both stream, so a 22b output is checked in the memory of one layer pair, not of two fp32 models and their
gradients (13b + 22b + 22b of gradients would be ~230 GB): the fixed text's hidden states go through base layer i
and the output's layer(s) side by side, one pair of layers in memory at a time, with the widened residual checked
against the base's after every base layer; the output's hidden state at every layer boundary is kept (tokens x
width floats, megabytes), and the backward pass goes from the loss back one output layer at a time, reloading
each layer with gradients, recording its gradient norms and handing the input gradient on.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.checkpoint import CheckpointReader
from pipeline.errors import UserError
from pipeline.logits import logit_agreement
from pipeline.runs import read_manifest
from surgery.depth import LayerSource
from surgery.plan import DTYPES, EMBED, FINAL_NORM, LAYER_NORMS, LINEARS, LM_HEAD, layer_prefix
from surgery.shapes import Widths, read_model_shape
from surgery.streamed_llama import StreamedLlama, compute_device, text_token_ids

log = logging.getLogger(__name__)

FIXED_TEXT = (
    "The Eiffel Tower was completed in 1889 as the entrance arch to the World's Fair in Paris. At first many "
    "artists called it an eyesore, but within a few decades it had become the symbol of the city. Today it is "
    "repainted every seven years, which takes about sixty tonnes of paint. Question: What is the capital of "
    "France? Answer: The capital of France is Paris."
)
FALLBACK_TOKENS = 96
# fp32 outputs must match to rounding (the design note expects ~1e-5 relative); bf16/fp16 outputs are compared
# with the base rounded to the same dtype, so what remains is the rounding of the compensated norm gains.
FP32_RELATIVE_TOLERANCE = 1e-4
HALF_KL_TOLERANCE = 1e-3
HALF_TOP1_TOLERANCE = 0.98
KIND_ORDER = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "input_layernorm", "post_attention_layernorm", "norm", "lm_head")
NEW_LAYER_WRITERS = ("o_proj", "down_proj")


@dataclass
class VerifyReport:
    tokens: int
    dtype: str
    mode: str
    exact_expected: bool
    max_abs_delta: float
    relative_delta: float
    mean_kl: float
    top1_agreement: float
    finite: bool
    base_layers: int = 0
    new_layer_positions: list[int] = field(default_factory=list)
    residual_relative_delta: float = 0.0  # worst over base layers: max|out[:d] - base| / max|base|
    residual_worst_layer: int = 0  # the output layer where it was worst
    new_dims_max_abs: float = 0.0  # worst |out[d:]| after any base layer; exact modes keep it 0
    new_layers_identity: bool = True  # every new layer returned its input unchanged
    loss: float = math.nan
    new_block_grad: dict[str, float] = field(default_factory=dict)
    base_block_grad: dict[str, float] = field(default_factory=dict)
    new_layer_grad: dict[str, float] = field(default_factory=dict)  # whole tensors of the new layers
    device: str = "cpu"
    peak_gpu_gib: float | None = None  # torch's peak allocation on the GPU, when computed there

    @property
    def exact(self) -> bool:
        if not (self.finite and self.new_layers_identity and self.new_dims_max_abs == 0.0):
            return False
        if self.dtype == "float32":
            return (self.relative_delta <= FP32_RELATIVE_TOLERANCE
                    and self.residual_relative_delta <= FP32_RELATIVE_TOLERANCE)
        return self.mean_kl <= HALF_KL_TOLERANCE and self.top1_agreement >= HALF_TOP1_TOLERANCE

    @property
    def new_writers_learn(self) -> bool:
        """A new layer whose o_proj or down_proj gets no gradient would stay the identity forever."""
        return not self.new_layer_positions or all(self.new_layer_grad.get(k, 0.0) > 0 for k in NEW_LAYER_WRITERS)

    @property
    def passed(self) -> bool:
        return self.finite and self.new_layers_identity and self.new_writers_learn and (
            self.exact or not self.exact_expected
        )

    def render(self) -> str:
        criterion = (
            f"max|delta| <= {FP32_RELATIVE_TOLERANCE:g} x max|logit|" if self.dtype == "float32"
            else f"mean KL <= {HALF_KL_TOLERANCE:g} and top-1 >= {HALF_TOP1_TOLERANCE:.0%} against the base rounded "
                 f"to {self.dtype}"
        )
        verdict = "exact" if self.exact else "NOT exact"
        expectation = "an exact mode" if self.exact_expected else "not an exact mode, so no exactness is required"
        new = self.new_layer_positions
        where = self.device + (f", peak GPU memory {self.peak_gpu_gib:.2f} GiB" if self.peak_gpu_gib else "")
        lines = [
            f"residual stream after each of the {self.base_layers} base layers (fp32 on {where}, layer by layer):",
            f"  base dims: worst max |delta| {self.residual_relative_delta:.3e} of max |base| (output layer "
            f"{self.residual_worst_layer})",
            f"  new dims:  max |value| {self.new_dims_max_abs:.3e} (exact modes keep them 0)",
        ]
        if new:
            lines.append(f"new layers: {len(new)} of {self.base_layers + len(new)} (positions "
                         f"{_positions(new)}); identity on the residual stream: "
                         f"{'yes' if self.new_layers_identity else 'NO'}")
        lines += [
            f"logits ({self.tokens} tokens of fixed text):",
            f"  max |delta logits|      {self.max_abs_delta:.3e}  (relative {self.relative_delta:.3e})",
            f"  mean KL(base || out)    {self.mean_kl:.3e}",
            f"  top-1 agreement         {self.top1_agreement:.2%}",
            f"  finite                  {self.finite}",
            f"  verdict: {verdict} ({criterion}); {self.mode} is {expectation}",
            f"gradient after one backward pass of the LM loss ({self.loss:.4f}), L2 norm per matrix kind:",
            f"  {'kind':<26}{'new blocks':>14}{'base block':>14}" + (f"{'new layers':>14}" if new else ""),
        ]
        for kind in self.new_block_grad:
            row = f"  {kind:<26}{self.new_block_grad[kind]:>14.3e}{self.base_block_grad[kind]:>14.3e}"
            if new:
                row += f"{self.new_layer_grad[kind]:>14.3e}" if kind in self.new_layer_grad else f"{'-':>14}"
            lines.append(row)
        reached = [k for k, v in self.new_block_grad.items() if v > 0]
        lines.append(
            "  the graft receives gradient through: " + ", ".join(reached) if reached
            else "  no new block receives any gradient: the graft is a stationary point (the trainability trap)"
        )
        if new:
            lines.append(
                "  new layers: o_proj and down_proj receive gradient at step one; their readers follow once those "
                "have moved" if self.new_writers_learn
                else "  new layers: o_proj/down_proj receive NO gradient, so they would stay the identity"
            )
        if self.passed:
            lines.append("PASS")
        elif not self.new_layers_identity:
            lines.append("FAIL: a new layer changes the residual stream (its o_proj/down_proj are not zero)")
        elif not self.new_writers_learn:
            lines.append("FAIL: the new layers' writers receive no gradient")
        else:
            lines.append("FAIL: an exact mode did not reproduce the base")
        return "\n".join(lines)


def _positions(positions: list[int]) -> str:
    return ", ".join(map(str, positions)) if len(positions) <= 12 else f"{positions[0]} ... {positions[-1]}"


def fixed_token_ids(base_folder: Path, vocab_size: int) -> torch.Tensor:
    """FIXED_TEXT through the base's tokenizer; seeded token ids when the folder has no tokenizer."""
    return text_token_ids(base_folder, [FIXED_TEXT], vocab_size, FALLBACK_TOKENS)[0]


Region = tuple[slice, ...]


def block_regions(name: str, base: Widths) -> tuple[str, Region, list[Region]] | None:
    """(kind, the base's block, the new blocks) of a tensor of the widened model, as index slices.

    Slices, not boolean masks: a mask the size of a 22b lm_head, and the copy it selects, would cost more than
    the gradient itself.
    """
    everything = slice(None)
    hidden = base.hidden_size
    if name in (EMBED, LM_HEAD):
        return name.split(".")[-2], (everything, slice(0, hidden)), [(everything, slice(hidden, None))]
    if name == FINAL_NORM:
        return "norm", (slice(0, hidden),), [(slice(hidden, None),)]
    for norm in LAYER_NORMS:
        if name.endswith(f"{norm}.weight"):
            return norm, (slice(0, hidden),), [(slice(hidden, None),)]
    for suffix, (_, out_axis, in_axis) in LINEARS.items():
        if name.endswith(f"{suffix}.weight"):
            rows, cols = slice(0, base.dim(out_axis)), slice(0, base.dim(in_axis))
            below = slice(base.dim(out_axis), None)
            return suffix.split(".")[-1], (rows, cols), [(rows, slice(base.dim(in_axis), None)), (below, everything)]
    return None


def squared_norm(values: torch.Tensor) -> float:
    return torch.linalg.vector_norm(values).item() ** 2 if values.numel() else 0.0


class GradientNorms:
    """Sums of squared gradients per matrix kind: new and base blocks of widened tensors, and new layers."""

    def __init__(self, base: Widths):
        self.base = base
        self.new_sq: dict[str, float] = {}
        self.base_sq: dict[str, float] = {}
        self.new_layer_sq: dict[str, float] = {}

    def add_widened(self, name: str, grad: torch.Tensor) -> None:
        located = block_regions(name, self.base)
        if located is None:
            return
        kind, base_block, new_blocks = located
        self.new_sq[kind] = self.new_sq.get(kind, 0.0) + sum(squared_norm(grad[block]) for block in new_blocks)
        self.base_sq[kind] = self.base_sq.get(kind, 0.0) + squared_norm(grad[base_block])

    def add_new_layer(self, name: str, grad: torch.Tensor) -> None:
        kind = name.split(".")[-2]
        self.new_layer_sq[kind] = self.new_layer_sq.get(kind, 0.0) + squared_norm(grad)

    def norms(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """L2 norms per kind: (new blocks, base blocks, new layers), in KIND_ORDER."""
        def ordered(squares: dict[str, float]) -> dict[str, float]:
            return {kind: math.sqrt(squares[kind]) for kind in KIND_ORDER if kind in squares}

        return ordered(self.new_sq), ordered(self.base_sq), ordered(self.new_layer_sq)


@dataclass
class ForwardTrace:
    """What the forward pass leaves for the logits and the backward pass."""

    boundaries: list[torch.Tensor]  # the output's hidden state before each layer, and after the last
    base_final: torch.Tensor | None = None  # the base's last hidden state [1, T, d]
    residual_relative_delta: float = 0.0
    residual_worst_layer: int = 0
    new_dims_max_abs: float = 0.0
    new_layers_identity: bool = True


def forward_side_by_side(base: StreamedLlama, out: StreamedLlama, sources: list[LayerSource],
                         ids: torch.Tensor) -> ForwardTrace:
    """The fixed text through both models side by side, one decoder layer in memory at a time; the output's
    residual is compared with the base's after every base layer."""
    d = base.hidden_size
    [hidden_base], [hidden_out] = base.embed([ids]), out.embed([ids])
    trace = ForwardTrace(boundaries=[hidden_out])
    for position, source in enumerate(tqdm(sources, desc="verify: forward", unit="layer")):
        layer = out.layer(position)
        following = out.run(layer, hidden_out)
        del layer
        if source.is_new:
            trace.new_layers_identity &= torch.equal(following, hidden_out)
        else:
            base_layer = base.layer(source.base_layer)
            hidden_base = base.run(base_layer, hidden_base)
            del base_layer
            delta = (following[..., :d] - hidden_base).abs().max().item() / max(hidden_base.abs().max().item(), 1e-30)
            if not delta <= trace.residual_relative_delta:  # also takes a NaN, which must not hide
                trace.residual_relative_delta, trace.residual_worst_layer = delta, position
            if following.shape[-1] > d:
                trace.new_dims_max_abs = max(trace.new_dims_max_abs, following[..., d:].abs().max().item())
        hidden_out = following
        trace.boundaries.append(hidden_out)
    trace.base_final = hidden_base
    return trace


def backward_layer_by_layer(out: StreamedLlama, sources: list[LayerSource], ids: torch.Tensor,
                            boundaries: list[torch.Tensor], norms: GradientNorms) -> tuple[float, torch.Tensor]:
    """One backward pass of the LM loss (HF's: next-token cross-entropy, mean over positions), from the loss back
    to the embeddings one output layer at a time; returns the loss and the output's logits."""
    final_norm = out.final_norm()
    final_norm.weight.requires_grad_()
    head = out.lm_head().requires_grad_()
    last = boundaries.pop().requires_grad_()
    logits = final_norm(last)[0] @ head.T
    loss = F.cross_entropy(logits[:-1], ids[0, 1:].to(logits.device))
    loss.backward()
    norms.add_widened(FINAL_NORM, final_norm.weight.grad)
    grad = last.grad
    # a tied lm_head's gradient waits for the embedding's share; an untied one is recorded and freed now (0.85 GB
    # in fp32 for a 22b's, which would otherwise sit next to every layer of the backward pass)
    head_grad = head.grad if out.tied else None
    if not out.tied:
        norms.add_widened(LM_HEAD, head.grad)
    del head, final_norm, last
    for position in tqdm(reversed(range(len(sources))), total=len(sources), desc="verify: backward", unit="layer"):
        layer = out.layer(position).requires_grad_()
        incoming = boundaries.pop().requires_grad_()
        out.run(layer, incoming).backward(grad)
        for name, param in layer.named_parameters():
            full_name = f"{layer_prefix(position)}{name}"
            if sources[position].is_new:
                norms.add_new_layer(full_name, param.grad)
            else:
                norms.add_widened(full_name, param.grad)
        grad = incoming.grad
        del layer, incoming
    # The embedding's gradient lives only in the rows of the tokens present: summed per distinct token.
    tokens, where = torch.unique(ids[0].to(grad.device), return_inverse=True)
    rows = torch.zeros(len(tokens), grad.shape[-1], device=grad.device).index_add_(0, where, grad[0])
    if head_grad is not None:  # one matrix, two uses: the gradient is their sum
        head_grad[tokens] += rows
        rows = head_grad
    norms.add_widened(EMBED, rows)
    return loss.item(), logits.detach()


def layer_sources(plan: dict) -> list[LayerSource]:
    """The manifest's layer sources; a manifest from before depth growth kept layer i at position i."""
    recorded = plan.get("layer_sources")
    if recorded is None:
        return [LayerSource(base_layer=i, donor_layer=None) for i in range(plan["num_hidden_layers"])]
    return [LayerSource(**entry) for entry in recorded]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return compute_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU here; use --device cpu (or auto)")
    return torch.device(device)


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """TF32 would round fp32 matmuls to 10 mantissa bits on a GPU and hide (or fake) an inexact surgery."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def verify(base_folder: Path, out_folder: Path, device: str = "auto") -> VerifyReport:
    manifest = read_manifest(out_folder)
    if manifest is None or manifest.get("stage") != "surgery":
        raise UserError(f"{out_folder} is not a complete surgery output (no surgery manifest.json); run surgery first")
    plan = manifest["plan"]
    base_widths = Widths(**plan["base_widths"])
    sources = layer_sources(plan)
    where = pick_device(device)
    # The half-precision rule: the base's weights rounded through the output dtype, so storage rounding is not
    # counted as surgery error.
    half = None if plan["dtype"] == "float32" else DTYPES[plan["dtype"]]
    base = StreamedLlama(CheckpointReader(base_folder), read_model_shape(base_folder, "base").config, where,
                         round_through=half)
    out = StreamedLlama(CheckpointReader(out_folder), read_model_shape(out_folder, "surgery output").config, where)
    base_depth = sum(not source.is_new for source in sources)
    if base.hidden_size != base_widths.hidden_size or base.num_hidden_layers != base_depth:
        raise UserError(
            f"{base_folder} has hidden_size {base.hidden_size} and {base.num_hidden_layers} layers but {out_folder} "
            f"was grown from a base with {base_widths.hidden_size} and {base_depth}; pass the base the surgery used"
        )
    if out.num_hidden_layers != len(sources):
        raise UserError(f"{out_folder}/config.json has {out.num_hidden_layers} layers but its manifest plans "
                        f"{len(sources)}; the folder was edited after surgery, rebuild it")
    ids = fixed_token_ids(base_folder, base.config.vocab_size)
    log.info("comparing %s with %s layer by layer on %d tokens (%s, fp32)", out_folder, base_folder, ids.shape[1],
             where)
    norms = GradientNorms(base_widths)
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    with full_fp32_matmuls():
        with torch.no_grad():
            trace = forward_side_by_side(base, out, sources, ids)
            reference = base.logits([trace.base_final])
        log.info("running the gradient probe, one layer at a time from the loss back")
        loss, logits = backward_layer_by_layer(out, sources, ids, trace.boundaries, norms)
    agreement = logit_agreement(reference, [logits.cpu()])
    new_grad, base_grad, new_layer_grad = norms.norms()
    return VerifyReport(
        tokens=ids.shape[1],
        dtype=plan["dtype"],
        mode=plan["mode"] + (" (legacy)" if plan["legacy"] else ""),
        exact_expected=bool(plan["exact"]),
        max_abs_delta=agreement.max_abs_delta,
        relative_delta=agreement.relative_delta,
        mean_kl=agreement.mean_kl,
        top1_agreement=agreement.top1_agreement,
        finite=agreement.finite,
        base_layers=base_depth,
        new_layer_positions=[j for j, source in enumerate(sources) if source.is_new],
        residual_relative_delta=trace.residual_relative_delta,
        residual_worst_layer=trace.residual_worst_layer,
        new_dims_max_abs=trace.new_dims_max_abs,
        new_layers_identity=trace.new_layers_identity,
        loss=loss,
        new_block_grad=new_grad,
        base_block_grad=base_grad,
        new_layer_grad=new_layer_grad,
        device=str(where),
        peak_gpu_gib=torch.cuda.max_memory_allocated(where) / 2**30 if where.type == "cuda" else None,
    )
