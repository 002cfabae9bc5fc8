"""Check a surgery output against its base: fp32 logits on fixed text, and a one-step gradient probe.

The logit check is the proof of exactness (design/surgery.md, "Verifying"); the gradient probe shows whether
training can move the graft at all (the "trainability trap": block-diagonal with zero lm_head columns leaves
every new parameter at exactly zero gradient).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.logits import LogitAgreement, logit_agreement
from pipeline.runs import read_manifest
from surgery.plan import EMBED, FINAL_NORM, LAYER_NORMS, LINEARS, LM_HEAD
from surgery.shapes import Widths

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
    loss: float = math.nan
    new_block_grad: dict[str, float] = field(default_factory=dict)
    base_block_grad: dict[str, float] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        if not self.finite:
            return False
        if self.dtype == "float32":
            return self.relative_delta <= FP32_RELATIVE_TOLERANCE
        return self.mean_kl <= HALF_KL_TOLERANCE and self.top1_agreement >= HALF_TOP1_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.finite and (self.exact or not self.exact_expected)

    def render(self) -> str:
        criterion = (
            f"max|delta| <= {FP32_RELATIVE_TOLERANCE:g} x max|logit|" if self.dtype == "float32"
            else f"mean KL <= {HALF_KL_TOLERANCE:g} and top-1 >= {HALF_TOP1_TOLERANCE:.0%} against the base rounded "
                 f"to {self.dtype}"
        )
        verdict = "exact" if self.exact else "NOT exact"
        expectation = "an exact mode" if self.exact_expected else "not an exact mode, so no exactness is required"
        lines = [
            f"logits (fp32 compute, {self.tokens} tokens of fixed text):",
            f"  max |delta logits|      {self.max_abs_delta:.3e}  (relative {self.relative_delta:.3e})",
            f"  mean KL(base || out)    {self.mean_kl:.3e}",
            f"  top-1 agreement         {self.top1_agreement:.2%}",
            f"  finite                  {self.finite}",
            f"  verdict: {verdict} ({criterion}); {self.mode} is {expectation}",
            f"gradient after one backward pass of the LM loss ({self.loss:.4f}), L2 norm per matrix kind:",
            f"  {'kind':<26}{'new blocks':>14}{'base block':>14}",
        ]
        for kind in self.new_block_grad:
            lines.append(f"  {kind:<26}{self.new_block_grad[kind]:>14.3e}{self.base_block_grad[kind]:>14.3e}")
        reached = [k for k, v in self.new_block_grad.items() if v > 0]
        lines.append(
            "  the graft receives gradient through: " + ", ".join(reached) if reached
            else "  no new block receives any gradient: the graft is a stationary point (the trainability trap)"
        )
        lines.append("PASS" if self.passed else "FAIL: an exact mode did not reproduce the base")
        return "\n".join(lines)


def fixed_token_ids(base_folder: Path, vocab_size: int) -> torch.Tensor:
    """FIXED_TEXT through the base's tokenizer; seeded token ids when the folder has no tokenizer."""
    has_tokenizer = any((base_folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
    if has_tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base_folder)(FIXED_TEXT, return_tensors="pt").input_ids
    log.info("%s has no tokenizer; using %d seeded random token ids instead of text", base_folder, FALLBACK_TOKENS)
    return torch.randint(vocab_size, (1, FALLBACK_TOKENS), generator=torch.Generator().manual_seed(0))


def new_block_mask(name: str, shape: tuple[int, ...], base: Widths) -> tuple[str, torch.Tensor] | None:
    """(kind, mask of the entries that did not exist in the base) for a parameter of the widened model."""
    hidden = base.hidden_size
    mask = torch.ones(shape, dtype=torch.bool)
    if name in (EMBED, LM_HEAD):
        mask[:, :hidden] = False
        return name.split(".")[-2], mask
    if name == FINAL_NORM:
        mask[:hidden] = False
        return "norm", mask
    for norm in LAYER_NORMS:
        if name.endswith(f"{norm}.weight"):
            mask[:hidden] = False
            return norm, mask
    for suffix, (_, out_axis, in_axis) in LINEARS.items():
        if name.endswith(f"{suffix}.weight"):
            mask[: base.dim(out_axis), : base.dim(in_axis)] = False
            return suffix.split(".")[-1], mask
    return None


def load_model(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as err:
        raise UserError(f"cannot load {folder} with transformers ({str(err).splitlines()[0]})") from None
    return model.eval()


def round_weights_to(model, dtype: str) -> None:
    """Round every weight through the output dtype, so half-precision storage is not counted as surgery error."""
    target = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(target).to(torch.float32))


def compare_logits(base_model, out_model, ids: torch.Tensor) -> LogitAgreement:
    with torch.no_grad():
        base_logits = base_model(ids).logits[0].float()
        out_logits = out_model(ids).logits[0].float()
    return logit_agreement([base_logits], [out_logits])


def gradient_probe(model, ids: torch.Tensor, base: Widths) -> tuple[float, dict[str, float], dict[str, float]]:
    """One backward pass of the LM loss; the L2 norm of the gradient on the new and on the base entries per kind."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    new_sq: dict[str, float] = {}
    base_sq: dict[str, float] = {}
    for name, param in model.named_parameters():
        located = new_block_mask(name, tuple(param.shape), base)
        if located is None or param.grad is None:
            continue
        kind, mask = located
        grad = param.grad.float()
        new_sq[kind] = new_sq.get(kind, 0.0) + grad[mask].pow(2).sum().item()
        base_sq[kind] = base_sq.get(kind, 0.0) + grad[~mask].pow(2).sum().item()
    order = [k for k in KIND_ORDER if k in new_sq]
    return loss.item(), {k: math.sqrt(new_sq[k]) for k in order}, {k: math.sqrt(base_sq[k]) for k in order}


def verify(base_folder: Path, out_folder: Path) -> VerifyReport:
    manifest = read_manifest(out_folder)
    if manifest is None or manifest.get("stage") != "surgery":
        raise UserError(f"{out_folder} is not a complete surgery output (no surgery manifest.json); run surgery first")
    plan = manifest["plan"]
    base_widths = Widths(**plan["base_widths"])
    torch.manual_seed(0)
    base_model = load_model(base_folder)
    if base_model.config.hidden_size != base_widths.hidden_size:
        raise UserError(
            f"{base_folder} has hidden_size {base_model.config.hidden_size} but {out_folder} was grown from a "
            f"base with {base_widths.hidden_size}; pass the base the surgery used"
        )
    if plan["dtype"] != "float32":
        round_weights_to(base_model, plan["dtype"])
    ids = fixed_token_ids(base_folder, base_model.config.vocab_size)
    out_model = load_model(out_folder)
    log.info("comparing logits of %s and %s on %d tokens", base_folder, out_folder, ids.shape[1])
    logits = compare_logits(base_model, out_model, ids)
    del base_model
    log.info("running the gradient probe")
    loss, new_grad, base_grad = gradient_probe(out_model, ids, base_widths)
    return VerifyReport(
        tokens=ids.shape[1],
        dtype=plan["dtype"],
        mode=plan["mode"] + (" (legacy)" if plan["legacy"] else ""),
        exact_expected=bool(plan["exact"]),
        loss=loss,
        new_block_grad=new_grad,
        base_block_grad=base_grad,
        max_abs_delta=logits.max_abs_delta,
        relative_delta=logits.relative_delta,
        mean_kl=logits.mean_kl,
        top1_agreement=logits.top1_agreement,
        finite=logits.finite,
    )
