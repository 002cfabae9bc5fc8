"""Surgery on tiny real checkpoints: blocks against the base and donor tensors, fp32 logit exactness through
transformers, the 2023 legacy construction, the gradient probe and the verify command."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from surgery_pairs import BASE, IDS, logits, make_pair, run, tensors

from pipeline.runs import read_manifest
from surgery.cli import main as surgery_main
from surgery.shapes import Widths
from surgery.verify import verify

LINEARS = {  # suffix -> (role, out axis, in axis)
    "self_attn.q_proj": ("reader", "q", "hidden"),
    "self_attn.k_proj": ("reader", "kv", "hidden"),
    "self_attn.v_proj": ("reader", "kv", "hidden"),
    "self_attn.o_proj": ("writer", "hidden", "q"),
    "mlp.gate_proj": ("reader", "inter", "hidden"),
    "mlp.up_proj": ("reader", "inter", "hidden"),
    "mlp.down_proj": ("writer", "hidden", "inter"),
}
USES_DONOR = {  # mode -> role -> (A from donor, B from donor)
    "zero": {"reader": (False, False), "writer": (False, False)},
    "block_diagonal": {"reader": (False, True), "writer": (False, True)},
    "block_triangular": {"reader": (True, True), "writer": (True, True)},
    "readers": {"reader": (True, True), "writer": (False, False)},
}


def widths(folder: Path) -> Widths:
    config = json.loads((folder / "config.json").read_text())
    return Widths(config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
                  config["intermediate_size"], config["head_dim"])


@pytest.mark.parametrize("mode", ["zero", "block_diagonal", "block_triangular", "readers"])
def test_every_block_comes_from_the_right_source(tiny_llama, tmp_path, mode):
    base, donor = make_pair(tiny_llama, gqa=True)
    out = run(base, donor, tmp_path / "out", "--mode", mode)
    got, base_t, donor_t = tensors(out), tensors(base), tensors(donor)
    b, t = widths(base), widths(donor)
    donor_layer = [0, 2, 4]  # proportional: 3 layers over a 5-layer donor
    for layer in range(3):
        for suffix, (role, out_axis, in_axis) in LINEARS.items():
            name = f"model.layers.{layer}.{suffix}.weight"
            rows, cols, new_rows, new_cols = b.dim(out_axis), b.dim(in_axis), t.dim(out_axis), t.dim(in_axis)
            w, donor_w = got[name], donor_t[f"model.layers.{donor_layer[layer]}.{suffix}.weight"]
            assert w.shape == (new_rows, new_cols)
            assert torch.equal(w[:rows, :cols], base_t[name])
            assert not w[:rows, cols:].any(), f"{name}: base rows read new inputs"
            from_a, from_b = USES_DONOR[mode][role]
            a, bb = w[rows:, :cols], w[rows:, cols:]
            assert torch.equal(a, donor_w[rows:new_rows, :cols]) if from_a else not a.any()
            assert torch.equal(bb, donor_w[rows:new_rows, cols:new_cols]) if from_b else not bb.any()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{layer}.{norm}.weight"
            factor = math.sqrt(b.hidden_size / t.hidden_size)
            assert torch.allclose(got[name][:32], base_t[name] * factor, rtol=1e-6, atol=0)
            assert torch.equal(got[name][32:], donor_t[f"model.layers.{donor_layer[layer]}.{norm}.weight"][32:])
    assert torch.allclose(got["model.norm.weight"][:32], base_t["model.norm.weight"] * math.sqrt(32 / 48))
    assert torch.equal(got["model.embed_tokens.weight"][:, :32], base_t["model.embed_tokens.weight"])
    assert not got["model.embed_tokens.weight"][:, 32:].any()
    head = got["lm_head.weight"]
    assert torch.equal(head[:, :32], base_t["lm_head.weight"])
    if mode == "zero":
        assert not head[:, 32:].any()
    else:
        assert torch.equal(head[:, 32:], donor_t["lm_head.weight"][:, 32:])
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (48, 6, 3)
    assert config["head_dim"] == 8 and config["intermediate_size"] == 96 and config["num_hidden_layers"] == 3
    assert config["rms_norm_eps"] == pytest.approx(1e-6 * 32 / 48)


@pytest.mark.parametrize("mode", ["zero", "block_diagonal", "readers"])
@pytest.mark.parametrize(("gqa", "tied"), [(False, False), (True, False), (False, True), (True, True)])
def test_exact_modes_reproduce_the_base_logits_in_fp32(tiny_llama, tmp_path, mode, gqa, tied):
    base, donor = make_pair(tiny_llama, gqa=gqa, tied=tied)
    out = run(base, donor, tmp_path / "out", "--mode", mode)
    expected, got = logits(base, IDS), logits(out, IDS)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    config = json.loads((out / "config.json").read_text())
    # tied stays tied only when lm_head's new columns are 0; otherwise lm_head gets the donor's columns
    assert config["tie_word_embeddings"] == (tied and mode == "zero")


def test_tied_base_untied_with_the_tied_donors_embedding_columns(tiny_llama, tmp_path):
    base, donor = make_pair(tiny_llama, tied=True)
    got = tensors(run(base, donor, tmp_path / "out", "--mode", "readers"))
    base_t, donor_t = tensors(base), tensors(donor)
    assert "lm_head.weight" not in base_t and "lm_head.weight" not in donor_t
    assert torch.equal(got["lm_head.weight"][:, :32], base_t["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"][:, 32:], donor_t["model.embed_tokens.weight"][:, 32:])
    assert not got["model.embed_tokens.weight"][:, 32:].any()


def test_block_triangular_is_finite_but_not_exact(tiny_llama, tmp_path):
    base, donor = make_pair(tiny_llama, gqa=True)
    out = run(base, donor, tmp_path / "out", "--mode", "block_triangular")
    expected, got = logits(base, IDS), logits(out, IDS)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() > 1e-2 * expected.abs().max()
    assert read_manifest(out)["plan"]["exact"] is False


def legacy_reference(base: dict, donor: dict, mode: str, hidden: int, new_hidden: int) -> dict:
    """The 2023 construction, written independently of surgery/: concatenation on full state dicts, donor layer i
    for layer i, per-layer norms appended without compensation, final norm all ones, zero embed/lm_head columns."""
    out = {}
    for name, m in base.items():
        if name == "model.norm.weight":
            out[name] = torch.ones(new_hidden)
        elif name.endswith("norm.weight"):
            out[name] = torch.cat([m, donor[name][hidden:new_hidden]])
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = torch.cat([m, torch.zeros(m.shape[0], new_hidden - hidden)], dim=1)
        else:
            d = donor[name]
            rows, cols = m.shape
            top = torch.cat([m, torch.zeros(rows, d.shape[1] - cols)], dim=1)
            if mode == "block_diagonal":
                bottom = torch.cat([torch.zeros(d.shape[0] - rows, cols), d[rows:, cols:]], dim=1)
            else:
                bottom = d[rows:, :]
            out[name] = torch.cat([top, bottom], dim=0)
    return out


@pytest.mark.parametrize("mode", ["block_diagonal", "block_triangular"])
def test_legacy_matches_the_2023_construction_tensor_for_tensor(tiny_llama, tmp_path, mode):
    base, donor = make_pair(tiny_llama)
    out = run(base, donor, tmp_path / "out", "--mode", mode, "--legacy")
    got = tensors(out)
    expected = legacy_reference(tensors(base), tensors(donor), mode, 32, 48)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["rms_norm_eps"] == json.loads((base / "config.json").read_text())["rms_norm_eps"]
    assert read_manifest(out)["plan"]["layer_map"] == "index"


def test_gradient_probe_finds_the_trainability_trap(tiny_llama, tmp_path):
    base, donor = make_pair(tiny_llama, gqa=True)
    probes = {}
    for label, flags in {
        "2023": ("--mode", "block_diagonal", "--legacy"),
        "block_diagonal": ("--mode", "block_diagonal"),
        "readers": ("--mode", "readers"),
    }.items():
        report = verify(base, run(base, donor, tmp_path / label, *flags), device="cpu")
        probes[label] = report.loss, report.new_block_grad, report.base_block_grad
    _, new_2023, base_2023 = probes["2023"]
    assert set(new_2023) >= {"q_proj", "o_proj", "down_proj", "embed_tokens", "lm_head", "norm"}
    assert all(value == 0.0 for value in new_2023.values()), new_2023
    assert all(value > 0 for value in base_2023.values())  # the old weights still learn
    # lm_head's donor columns let gradient into the graft; readers also sends it through the writers' new rows
    assert sum(probes["block_diagonal"][1].values()) > 0
    _, new_readers, _ = probes["readers"]
    for kind in ("embed_tokens", "o_proj", "down_proj"):
        assert new_readers[kind] > 0, kind


def test_verify_command_passes_exact_output_and_fails_a_broken_graft(tiny_llama, tmp_path, capsys):
    base, donor = make_pair(tiny_llama)
    out = run(base, donor, tmp_path / "out", "--mode", "readers")
    capsys.readouterr()
    assert surgery_main(["verify", "--base", str(base), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "top-1 agreement         100.00%" in report and "PASS" in report
    # Break exactness: let the new rows of one o_proj write into the new residual dims.
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    weights = load_file(shard)
    weights[name][32:, :] = 0.5
    save_file(weights, shard, metadata={"format": "pt"})
    assert surgery_main(["verify", "--base", str(base), "--out", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_multi_shard_output_config_run_manifest_and_untouched_inputs(tiny_llama, tmp_path, capsys):
    base, donor = make_pair(tiny_llama)
    before = digest(base), digest(donor)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\nseed: 3\nsurgery:\n  base: {base}\n  donor: {donor}\n  mode: block_diagonal\n"
        "  dtype: bfloat16\n  max_shard_size: 30KB\n"
    )
    assert surgery_main(["--config", str(config), "--dry-run"]) == 0
    plan_text = capsys.readouterr().out
    assert "model.layers.2.mlp.down_proj.weight" in plan_text and "exact" in plan_text
    assert not (tmp_path / "run").exists()
    # a flag overrides the config
    assert surgery_main(["--config", str(config), "--mode", "readers"]) == 0
    out = tmp_path / "run" / "surgery"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors(out).values())
    assert all(t.dtype == torch.bfloat16 for t in tensors(out).values())
    manifest = read_manifest(out)
    assert manifest["plan"]["mode"] == "readers" and manifest["plan"]["dtype"] == "bfloat16"
    assert manifest["fingerprint"] and manifest["io"]["bytes_written"] == index["metadata"]["total_size"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()
    assert (digest(base), digest(donor)) == before
    # the same config again: refused without --force, replaced with it
    assert surgery_main(["--config", str(config)]) == 2
    assert surgery_main(["--config", str(config), "--force"]) == 0
    assert read_manifest(out)["plan"]["mode"] == "block_diagonal"


def test_random_donor_needs_no_donor_and_is_reproducible(tiny_llama, tmp_path):
    base = tiny_llama("base", **BASE, num_attention_heads=4, num_key_value_heads=2)
    (base / "generation_config.json").unlink()  # then one is derived from config.json
    flags = ("--hidden-size", "48", "--num-attention-heads", "6", "--num-key-value-heads", "3",
             "--intermediate-size", "96", "--seed", "5")
    first = tensors(run(base, "random", tmp_path / "a", *flags))
    assert json.loads((tmp_path / "a" / "generation_config.json").read_text())["eos_token_id"] == 2
    second = tensors(run(base, "random", tmp_path / "b", *flags))
    assert all(torch.equal(first[n], second[n]) for n in first)
    q = first["model.layers.0.self_attn.q_proj.weight"]
    base_q = tensors(base)["model.layers.0.self_attn.q_proj.weight"]
    assert q[32:].std().item() == pytest.approx(base_q.std().item(), rel=0.25)
    assert torch.equal(first["model.layers.0.input_layernorm.weight"][32:], torch.ones(16))
    expected, got = logits(base, IDS), logits(tmp_path / "a", IDS)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_target_narrower_than_the_donor_takes_its_first_rows_and_columns(tiny_llama, tmp_path):
    base, donor = make_pair(tiny_llama, gqa=True)
    out = run(base, donor, tmp_path / "out", "--mode", "block_triangular", "--hidden-size", "42",
              "--intermediate-size", "80", "--layer-map", "index")
    got, donor_t = tensors(out), tensors(donor)
    up = got["model.layers.1.mlp.up_proj.weight"]
    assert up.shape == (80, 42)
    assert torch.equal(up[64:, :], donor_t["model.layers.1.mlp.up_proj.weight"][64:80, :42])
    down = got["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(down[32:, :], donor_t["model.layers.1.mlp.down_proj.weight"][32:42, :80])
    assert torch.equal(got["lm_head.weight"][:, 32:], donor_t["lm_head.weight"][:, 32:42])
    exact = run(base, donor, tmp_path / "exact", "--mode", "readers", "--hidden-size", "42", "--intermediate-size",
                "80")
    expected = logits(base, IDS)
    assert torch.allclose(logits(exact, IDS), expected, rtol=0, atol=1e-4 * expected.abs().max().item())
