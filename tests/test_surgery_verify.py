"""`surgery verify` streams: its numbers are a whole-model fp32 forward and backward's, and its peak memory does not
grow with depth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from surgery_pairs import make_pair
from transformers import AutoModelForCausalLM

from pipeline.logits import logit_agreement
from pipeline.runs import read_manifest
from surgery.cli import main as surgery_main
from surgery.verify import fixed_token_ids, verify

REPO = Path(__file__).resolve().parents[1]


def whole_model_probe(base: Path, out: Path, ids: torch.Tensor) -> dict:
    """The check done the memory-hungry way: both models whole in fp32 through transformers, HF's own LM loss,
    one backward over every parameter, and the gradient split by hand into the base's block, the new blocks
    (entries outside it) and the new layers (whole tensors)."""
    plan = read_manifest(out)["plan"]
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(plan["dtype"])
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if half is not None:
        with torch.no_grad():
            for param in base_model.parameters():
                param.copy_(param.to(half).float())
    out_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        agreement = logit_agreement([base_model(ids).logits[0]], [out_model(ids).logits[0]])
    loss = out_model(ids, labels=ids).loss
    loss.backward()
    new_layers = {i for i, source in enumerate(plan["layer_sources"]) if source["base_layer"] is None}
    base_shapes = {name: tuple(p.shape) for name, p in base_model.named_parameters()}
    base_layer_of = {j: s["base_layer"] for j, s in enumerate(plan["layer_sources"])}
    squares: dict[tuple[str, str], float] = {}
    for name, param in out_model.named_parameters():
        kind = name.split(".")[-2]
        parts = name.split(".")
        grad = param.grad.double()
        if parts[1] == "layers" and int(parts[2]) in new_layers:
            squares["new layer", kind] = squares.get(("new layer", kind), 0.0) + grad.pow(2).sum().item()
            continue
        base_name = name
        if parts[1] == "layers":
            base_name = ".".join([*parts[:2], str(base_layer_of[int(parts[2])]), *parts[3:]])
        if base_name not in base_shapes:  # a tied base: lm_head is its embedding
            base_name = "model.embed_tokens.weight"
        block = tuple(slice(0, n) for n in base_shapes[base_name])
        in_base = grad[block].pow(2).sum().item()
        squares["base", kind] = squares.get(("base", kind), 0.0) + in_base
        squares["new", kind] = squares.get(("new", kind), 0.0) + grad.pow(2).sum().item() - in_base
    return {"agreement": agreement, "loss": loss.item(),
            "norms": {key: max(value, 0.0) ** 0.5 for key, value in squares.items()}}


@pytest.mark.parametrize(
    ("mode", "dtype", "depth", "tied"),
    [("readers", "float32", "7", True), ("block_triangular", "bfloat16", "3", False),
     ("block_diagonal", "float16", "5", False)],
)
def test_streamed_verify_matches_a_whole_model_forward_and_backward(tiny_llama, tmp_path, mode, dtype, depth, tied):
    base, donor = make_pair(tiny_llama, gqa=True, tied=tied)
    out = tmp_path / "out"
    assert surgery_main(["--base", str(base), "--donor", str(donor), "--out", str(out), "--mode", mode,
                         "--dtype", dtype, "--num-hidden-layers", depth]) == 0
    report = verify(base, out, device="cpu")
    reference = whole_model_probe(base, out, fixed_token_ids(base, 101))
    agreement = reference["agreement"]
    assert report.loss == pytest.approx(reference["loss"], rel=1e-5)
    assert report.top1_agreement == agreement.top1_agreement
    # half outputs and block_triangular differ from the base by their rounding or construction, the same in both
    # computations; an exact fp32 output only by rounding noise, hence the absolute slack
    assert report.max_abs_delta == pytest.approx(agreement.max_abs_delta, rel=1e-3, abs=1e-4)
    assert report.mean_kl == pytest.approx(agreement.mean_kl, rel=1e-3, abs=1e-10)
    norms = reference["norms"]
    for kind, value in report.new_block_grad.items():
        # the reference gets the new part as total minus base: good to ~1e-7 of the base part
        slack = 1e-6 * norms["base", kind]
        assert value == pytest.approx(norms["new", kind], rel=1e-4, abs=slack), kind
        assert report.base_block_grad[kind] == pytest.approx(norms["base", kind], rel=1e-4), kind
    for kind, value in report.new_layer_grad.items():
        assert value == pytest.approx(norms["new layer", kind], rel=1e-4, abs=1e-12), kind
    assert set(report.new_layer_grad) == {kind for where, kind in norms if where == "new layer"}
    assert report.passed


# verify on each (base, out) pair in turn in one fresh process, printing its peak RSS (ru_maxrss) after each: the
# high-water mark can only rise, so a deeper pair that needs more memory shows as a higher second peak, and the
# interpreter and transformers are imported (several seconds) once, not per pair.
MEASURE = """
import json, resource, sys
from pathlib import Path
from surgery.verify import verify
peaks = []
for base, out in zip(sys.argv[1::2], sys.argv[2::2]):
    assert verify(Path(base), Path(out), device="cpu").passed
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(peaks))
"""
WIDE = ["--hidden-size", "512", "--num-attention-heads", "8", "--num-key-value-heads", "8",
        "--intermediate-size", "1536"]


def test_verify_peak_memory_does_not_grow_with_depth(tiny_llama, tmp_path):
    """A bf16 pair at 8 and at 16 layers whose weights dominate: the output's fp32 layers are 14 MB each, so a
    whole-model verify (both models and the output's gradients in fp32) would need ~250 MB more at 16 layers."""
    pairs, weights = [], {}
    for layers in (8, 16):
        base = tiny_llama(f"base-{layers}", hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                          head_dim=64, intermediate_size=768, num_hidden_layers=layers, vocab_size=512,
                          dtype=torch.bfloat16, weight_std=0.05)
        out = tmp_path / f"out-{layers}"
        assert surgery_main(["--base", str(base), "--donor", "random", "--out", str(out), *WIDE]) == 0  # bf16
        weights[layers] = sum(f.stat().st_size for f in out.glob("*.safetensors")) * 2 / 2**20  # as fp32
        pairs += [str(base), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURE, *pairs], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_8, peak_16 = json.loads(result.stdout.strip().splitlines()[-1])
    assert weights[16] - weights[8] > 100  # the fp32 output alone grows by this much
    assert peak_16 - peak_8 < 30, (peak_8, peak_16)
