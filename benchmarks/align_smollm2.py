"""Does donor alignment recover a planted basis, and what does it do to a block_triangular graft? A known answer.

The donors are SmolLM2-135M-Instruct widened to SmolLM2-360M's widths (hidden 960, 15/5 heads, intermediate 2560)
by the surgery itself, then re-expressed in a random orthogonal residual basis R (norm gains folded first): models
whose first 576 coordinates are SmolLM2's own features, hidden behind a known rotation.

- quiet: the readers-mode widening: the new heads and neurons write nothing into the new dims, so in its true
  basis the donor's new rows of o_proj/down_proj are 0 and a block_triangular graft of it is exact.
- active: the same with seeded noise (the base tensor's std x --scale) in the new dims' rows of every o_proj and
  down_proj and in the new embedding columns, so the new dims carry features of their own. Its best possible
  graft is that of the unrotated donor (the oracle row).

Each donor is grafted onto SmolLM2 in block_triangular mode (the mode whose A blocks read base features in the
donor's basis) with surgery.align none (the baseline), permutation and rotation, and once more from the rotated
donor exactly as `python -m surgery align --method rotation` writes it (gains folded to 1, not matched to the
graft's norms: what grafting that folder with --align none gives). Reported per graft: the basis
error |M[:, :d] - R^T[:, :d]| / |R^T[:, :d]| of the fitted map M (0 = the planted basis recovered), the embedding
residual the surgery logged, KL(base || graft) and top-1 agreement on held-out text, and the loss of the first
LoRA steps (r 16, alpha 16, lr 2e-4, AdamW, 128-token blocks of the bundled corpus, the same blocks and seed for
every model; the base's own row is the reference).

    python benchmarks/align_smollm2.py                    # CPU, offline; writes ~1.4 GB per graft under a temp dir
    python benchmarks/align_smollm2.py --steps 3 --texts 2 --donors quiet   # a shorter run
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.checkpoint import CheckpointReader  # noqa: E402
from pipeline.config import validate_config  # noqa: E402
from pipeline.logits import logit_agreement  # noqa: E402
from pipeline.models import resolve_model  # noqa: E402
from pipeline.runs import read_manifest  # noqa: E402
from surgery.aligned_donor import AlignedDonorReader, fit_alignment, fit_transform  # noqa: E402
from surgery.cli import main as surgery_main  # noqa: E402
from surgery.cli import make_plan  # noqa: E402
from surgery.execute import execute  # noqa: E402
from surgery.shapes import read_model_shape  # noqa: E402

WIDE = ["--hidden-size", "960", "--num-attention-heads", "15", "--num-key-value-heads", "5",
        "--intermediate-size", "2560"]
CORPUS = REPO / "train" / "samples" / "python_stdlib_docs.jsonl.gz"
BLOCK = 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def texts(tokenizer, count: int, skip: int = 0) -> list[torch.Tensor]:
    """The first BLOCK tokens of `count` corpus documents after the first `skip`, as (1, BLOCK) ids."""
    with gzip.open(CORPUS, "rt") as handle:
        documents = [json.loads(line)["text"] for line in handle]
    ids = [tokenizer(text, return_tensors="pt").input_ids[:, :BLOCK] for text in documents[skip:]]
    return [block for block in ids if block.shape[1] == BLOCK][:count]


def noisy_new_dims(model, scale: float, seed: int) -> None:
    """Seeded noise in every write into the new residual dims (576..960) and in the new embedding columns."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        writers = [weight for layer in model.model.layers
                   for weight in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]
        for weight in [*writers, model.model.embed_tokens.weight.T]:
            std = weight[:576].std().item()
            weight[576:] = torch.randn(weight[576:].shape, generator=generator) * std * scale


def plant_rotation(model, rotation: torch.Tensor) -> None:
    """Fold every norm gain into the linears it feeds, then express the residual stream as x -> x @ rotation."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear, norm in ((attn.q_proj, layer.input_layernorm), (attn.k_proj, layer.input_layernorm),
                                 (attn.v_proj, layer.input_layernorm), (mlp.gate_proj, layer.post_attention_layernorm),
                                 (mlp.up_proj, layer.post_attention_layernorm)):
                linear.weight.copy_((linear.weight * norm.weight) @ rotation)
            for linear in (attn.o_proj, mlp.down_proj):
                linear.weight.copy_(rotation.T @ linear.weight)
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.lm_head.weight.copy_((model.lm_head.weight * model.model.norm.weight) @ rotation)
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ rotation)


def lora_losses(folder: Path, blocks: list[torch.Tensor], steps: int) -> list[float]:
    """The loss at each of the first `steps` LoRA steps (each step's loss before its update)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load(folder), LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                    target_modules=list(LINEARS)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    losses = []
    for step in range(steps):
        ids = blocks[step % len(blocks)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    return losses


def held_out_logits(folder: Path, held_out: list[torch.Tensor]) -> list[torch.Tensor]:
    model = load(folder)
    with torch.no_grad():
        return [model(ids).logits[0] for ids in held_out]


def basis_error(method: str, donor: Path, base_embed: torch.Tensor, truth: torch.Tensor) -> float:
    """How far the fitted map's first d columns are from the planted one's (R^T[:, :d])."""
    if method == "none":
        fitted = torch.eye(truth.shape[0])[:, : truth.shape[1]]
    else:
        transform = fit_transform(method, CheckpointReader(donor).get("model.embed_tokens.weight"), base_embed,
                                  torch.device("cpu"))
        fitted = transform.read(torch.eye(truth.shape[0]), slice(0, truth.shape[1]))
    return ((fitted.double() - truth.double()).norm() / truth.double().norm()).item()


def graft(base: Path, donor: Path, out: Path, case: str) -> dict:
    """A block_triangular graft of `donor` onto `base` in `out`; returns the alignment the manifest records.

    case: none | permutation | rotation (the surgery's --align) | aligned-folder (the rotated donor as the align
    command writes it, grafted as is) | oracle (the unrotated donor, no alignment).
    """
    if case != "aligned-folder":
        flags = ["--align", case] if case in ("permutation", "rotation") else []
        assert surgery_main(["--base", str(base), "--donor", str(donor), "--out", str(out), "--mode",
                             "block_triangular", "--dtype", "float32", "--force", *flags]) == 0
        return (read_manifest(out) or {}).get("alignment", {})
    settings = validate_config({"run_dir": ".", "surgery": {"base": str(base), "donor": str(donor), "mode":
                                                             "block_triangular", "dtype": "float32"}}).surgery
    plan = make_plan(settings)
    shape = read_model_shape(donor, "donor")
    alignment = fit_alignment(plan.base, shape, plan.target, "rotation", "index", plan.donor_layers)
    execute(plan, out, True, {}, AlignedDonorReader(CheckpointReader(donor), shape, alignment))
    return alignment.report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--donors", nargs="+", default=["quiet", "active"], choices=["quiet", "active"])
    parser.add_argument("--steps", type=int, default=5, help="LoRA steps per model")
    parser.add_argument("--texts", type=int, default=6, help="held-out texts of 128 tokens for the KL")
    parser.add_argument("--scale", type=float, default=0.5, help="noise in the active donor's new dims, x base std")
    parser.add_argument("--work-dir", default=None, help="where the temporary models go (default: the system temp)")
    args = parser.parse_args()
    base = resolve_model("smollm2-135m-instruct")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    held_out, train_blocks = texts(tokenizer, args.texts), texts(tokenizer, args.steps, skip=200)
    base_embed = CheckpointReader(base).get("model.embed_tokens.weight")
    base_logits = held_out_logits(base, held_out)
    rows = [("base (reference)", "-", "-", "-", 0.0, 1.0, lora_losses(base, train_blocks, args.steps))]
    work = Path(tempfile.mkdtemp(prefix="align-smollm2-", dir=args.work_dir))
    started = time.monotonic()
    try:
        assert surgery_main(["--base", str(base), "--donor", "random", "--out", str(work / "wide"), "--mode",
                             "readers", "--dtype", "float32", *WIDE]) == 0
        rotation = torch.linalg.qr(torch.randn(960, 960, generator=torch.Generator().manual_seed(1),
                                               dtype=torch.float64)).Q.float()
        truth = rotation.T[:, :576]
        for kind in args.donors:
            model = load(work / "wide")
            if kind == "active":
                noisy_new_dims(model, args.scale, seed=2)
                model.save_pretrained(work / "active-unrotated", safe_serialization=True)
            plant_rotation(model, rotation)
            donor = work / f"{kind}-rotated"
            model.save_pretrained(donor, safe_serialization=True)
            del model
            cases = [(donor, case) for case in ("none", "permutation", "rotation", "aligned-folder")]
            if kind == "active":
                cases.append((work / "active-unrotated", "oracle"))
            for source, case in cases:
                out = work / "graft"
                fit = graft(base, source, out, case).get("embedding_residual", {})
                agreement = logit_agreement(base_logits, held_out_logits(out, held_out))
                method = {"aligned-folder": "rotation", "oracle": "none"}.get(case, case)
                error = 0.0 if case == "oracle" else basis_error(method, donor, base_embed, truth)
                rows.append((kind, case, f"{error:.2e}", f"{fit['after']:.2e}" if fit else "-",
                             agreement.mean_kl, agreement.top1_agreement, lora_losses(out, train_blocks, args.steps)))
                shutil.rmtree(out)
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(held_out)} held-out texts x {BLOCK} tokens; {args.steps} LoRA steps; active noise scale "
          f"{args.scale}; {time.monotonic() - started:.0f} s\n")
    print("| donor | align | basis error | embedding residual | KL(base ‖ graft) | top-1 | LoRA step losses |")
    print("|---|---|---|---|---|---|---|")
    for kind, method, error, residual, kl, top1, losses in rows:
        print(f"| {kind} | {method} | {error} | {residual} | {kl:.4f} | {top1:.1%} | {', '.join(map(str, losses))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
