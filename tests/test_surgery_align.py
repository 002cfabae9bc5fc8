"""Donor alignment on tiny real checkpoints: a donor whose residual basis was scrambled by a known permutation or
rotation is aligned back (its function kept, the base's embedding in its first coordinates), grafts from it stay
exact in the exact modes and become exact in block_triangular, and a head/neuron selection lands the planted
strongest units in the grafted positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.checkpoint import CheckpointReader
from pipeline.config import validate_config
from pipeline.runs import read_manifest
from surgery.aligned_donor import open_aligned_donor
from surgery.alignment import fit_permutation, fit_rotation, place_chosen_units
from surgery.calibration import layer_passes
from surgery.cli import main as surgery_main
from surgery.cli import make_plan
from surgery.streamed_llama import StreamedLlama

BASE = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
        "num_hidden_layers": 3}
WIDE = ["--hidden-size", "48", "--num-attention-heads", "6", "--num-key-value-heads", "3", "--intermediate-size", "96"]
IDS = torch.randint(101, (1, 24), generator=torch.Generator().manual_seed(0))
READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load(folder)(IDS).logits[0]


def relative_delta(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def linears(layer) -> dict[str, torch.nn.Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
            "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}


def base_in_a_wider_donor(tiny_llama, tmp_path: Path):
    """A 48-wide model whose first 32 residual coordinates are the base's at every layer (the known answer): the
    base widened with seeded new heads and neurons in readers mode, which write nothing into the new dims."""
    base = tiny_llama("base", **BASE)
    assert surgery_main(["--base", str(base), "--donor", "random", "--out", str(tmp_path / "wide"), "--dtype",
                         "float32", *WIDE]) == 0
    return base, load(tmp_path / "wide")


def plant_permutation(model, order: torch.Tensor, signs: torch.Tensor) -> None:
    """Re-express the residual stream so that new coordinate j is old coordinate order[j] times signs[j]."""
    with torch.no_grad():
        for layer in model.model.layers:
            for name, linear in linears(layer).items():
                if name in READERS:
                    linear.weight.copy_(linear.weight[:, order] * signs)
                else:
                    linear.weight.copy_(linear.weight[order] * signs[:, None])
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(norm.weight[order])
        model.model.norm.weight.copy_(model.model.norm.weight[order])
        for table in (model.model.embed_tokens.weight, model.lm_head.weight):
            table.copy_(table[:, order] * signs)


def plant_rotation(model, rotation: torch.Tensor) -> None:
    """Fold every norm gain into the linears it feeds, then re-express the residual stream as x -> x @ rotation."""
    with torch.no_grad():
        for layer in model.model.layers:
            gains = {"input": layer.input_layernorm.weight.clone(),
                     "post": layer.post_attention_layernorm.weight.clone()}
            for name, linear in linears(layer).items():
                if name in READERS:
                    gain = gains["input" if name in ("q_proj", "k_proj", "v_proj") else "post"]
                    linear.weight.copy_((linear.weight * gain) @ rotation)
                else:
                    linear.weight.copy_(rotation.T @ linear.weight)
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.lm_head.weight.copy_((model.lm_head.weight * model.model.norm.weight) @ rotation)
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ rotation)


def scrambled_donor(tiny_llama, tmp_path: Path, method: str) -> tuple[Path, Path]:
    base, model = base_in_a_wider_donor(tiny_llama, tmp_path)
    generator = torch.Generator().manual_seed(7)
    if method == "permutation":
        signs = torch.where(torch.rand(48, generator=generator) < 0.5, -1.0, 1.0)
        plant_permutation(model, torch.randperm(48, generator=generator), signs)
    else:
        plant_rotation(model, torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64)).Q.float())
    model.save_pretrained(tmp_path / "donor", safe_serialization=True)
    return base, tmp_path / "donor"


def align(base: Path, donor: Path, out: Path, method: str, *flags: str) -> Path:
    assert surgery_main(["align", "--base", str(base), "--donor", str(donor), "--out", str(out), "--method", method,
                         "--dtype", "float32", *flags]) == 0
    return out


def graft(base: Path, donor: Path, out: Path, *flags: str) -> Path:
    assert surgery_main(["--base", str(base), "--donor", str(donor), "--out", str(out), "--dtype", "float32",
                         *flags]) == 0
    return out


@pytest.mark.parametrize("method", ["permutation", "rotation"])
def test_a_scrambled_donor_is_aligned_back_and_its_grafts_follow(tiny_llama, tmp_path, capsys, method):
    base, donor = scrambled_donor(tiny_llama, tmp_path, method)
    aligned = align(base, donor, tmp_path / "aligned", method)
    report = capsys.readouterr().out
    assert "before" in report and "hidden states" in report
    # the aligned donor is the donor, re-parameterised: same logits in fp32
    assert relative_delta(logits(aligned), logits(donor)) < 1e-5
    # ... and its first 32 coordinates are the base's: exactly for a permutation, to fp32 rounding for a rotation
    base_embed = CheckpointReader(base).get("model.embed_tokens.weight")
    aligned_embed = CheckpointReader(aligned).get("model.embed_tokens.weight")[:, :32]
    if method == "permutation":
        assert torch.equal(aligned_embed, base_embed)
    else:
        assert (aligned_embed - base_embed).abs().max().item() < 1e-3
    fit = read_manifest(aligned)["fit"]
    assert all(layer["after"] > 0.999 for layer in fit["layers"]), fit["layers"]
    assert all(layer["before"] < 0.9 for layer in fit["layers"]), fit["layers"]

    expected = logits(base)
    exact = graft(base, donor, tmp_path / "readers", "--mode", "readers", "--align", method)
    assert relative_delta(logits(exact), expected) < 1e-4
    # block_triangular grafts the donor's writes into the new dims; in the donor's true basis it writes none there,
    # so only the aligned graft reproduces the base
    unaligned = graft(base, donor, tmp_path / "triangular-none", "--mode", "block_triangular")
    assert relative_delta(logits(unaligned), expected) > 1e-2
    realigned = graft(base, donor, tmp_path / "triangular", "--mode", "block_triangular", "--align", method)
    assert relative_delta(logits(realigned), expected) < 1e-4
    recorded = read_manifest(realigned)["alignment"]
    assert recorded["align"] == method and recorded["embedding_residual"]["after"] < 1e-4 < recorded[
        "embedding_residual"]["before"]


def test_rotation_unties_a_tied_donor_and_keeps_its_function(tiny_llama, tmp_path):
    base = tiny_llama("base", **BASE)
    donor = tiny_llama("donor", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96,
                       num_hidden_layers=4, tie_word_embeddings=True, seed=1)
    aligned = align(base, donor, tmp_path / "aligned", "rotation")
    assert json.loads((aligned / "config.json").read_text())["tie_word_embeddings"] is False
    assert relative_delta(logits(aligned), logits(donor)) < 1e-5
    out = graft(base, donor, tmp_path / "graft", "--align", "rotation")
    assert relative_delta(logits(out), logits(base)) < 1e-4


def planted_strong_units(tiny_llama, tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """A donor whose kv group 0 and 32 scattered neurons write 30x more into the residual stream in every layer."""
    base = tiny_llama("base", **BASE)
    tiny_llama("plain", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96,
               num_hidden_layers=3, seed=1)
    model = load(tmp_path / "plain")
    neurons = torch.randperm(96, generator=torch.Generator().manual_seed(5))[:32].tolist()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :16] *= 30  # query heads 0 and 1 = kv group 0
            layer.mlp.down_proj.weight[:, neurons] *= 30
    model.save_pretrained(tmp_path / "donor", safe_serialization=True)
    return base, tmp_path / "donor", neurons


def test_output_selection_keeps_the_function_and_grafts_the_strongest_units(tiny_llama, tmp_path):
    base, donor, neurons = planted_strong_units(tiny_llama, tmp_path)
    selected = align(base, donor, tmp_path / "selected", "none", "--select", "output")
    assert relative_delta(logits(selected), logits(donor)) < 1e-5
    units = read_manifest(selected)["alignment"]["units"]
    assert all(layer["kv_groups"]["chosen"] == [0] for layer in units.values())
    assert all(sorted(layer["neurons"]["chosen"]) == sorted(neurons) for layer in units.values())

    out = graft(base, donor, tmp_path / "graft", "--mode", "readers", "--select", "output", "--align", "rotation")
    grafted, original = CheckpointReader(out), CheckpointReader(donor)

    def effective(reader, prefix: str, name: str, norm: str) -> torch.Tensor:
        """A reader with the gain in front of it folded in: what it applies to the normalised stream."""
        return reader.get(f"{prefix}{name}.weight") * reader.get(f"{prefix}{norm}.weight")

    for layer in range(3):  # the layer maps match: 3 donor layers for 3 target layers
        prefix = f"model.layers.{layer}."
        # the grafted kv group's k rows (16..24) and its query heads' q rows (32..48) are donor group 0's, which a
        # rotation leaves row for row as the donor's rows times the same orthogonal matrix: compare their Gram
        for name, rows, donor_rows in (("self_attn.k_proj", slice(16, 24), slice(0, 8)),
                                       ("self_attn.q_proj", slice(32, 48), slice(0, 16))):
            got = effective(grafted, prefix, name, "input_layernorm")[rows]
            want = effective(original, prefix, name, "input_layernorm")[donor_rows]
            assert torch.allclose(got @ got.T, want @ want.T, atol=1e-4)
        # every grafted neuron is one of the planted ones (same row norm, since a rotation keeps norms)
        norms = effective(original, prefix, "mlp.up_proj", "post_attention_layernorm").norm(dim=1)
        grafted_up = effective(grafted, prefix, "mlp.up_proj", "post_attention_layernorm")[64:]
        matches = [(norms - row.norm()).abs().argmin().item() for row in grafted_up]
        assert sorted(matches) == sorted(neurons)
    assert relative_delta(logits(out), logits(base)) < 1e-4


@pytest.mark.parametrize("method", ["permutation", "rotation"])
def test_the_surgerys_view_of_the_donor_computes_the_donors_function(tiny_llama, method):
    """What the surgery streams with --align (its gains matched to the graft's, units selected) is still the donor,
    re-parameterised: run layer by layer from the view, it gives the donor's logits."""
    base = tiny_llama("base", **BASE)
    donor = tiny_llama("donor", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96,
                       num_hidden_layers=5, seed=1)
    settings = validate_config({"run_dir": ".", "surgery": {"base": str(base), "donor": str(donor), "align": method,
                                                             "select": "output"}}).surgery
    view = open_aligned_donor(make_plan(settings), method, "output")
    assert view.alignment.matched_gains and view.alignment.unit_orders
    config = {**json.loads((donor / "config.json").read_text()), "tie_word_embeddings": view.tie_word_embeddings}
    stream = StreamedLlama(view, config, torch.device("cpu"))
    hidden = stream.embed([IDS])
    for done in layer_passes(stream, hidden, 5):
        hidden = done.hidden
    with torch.no_grad():
        expected = load(donor)(IDS).logits[0]
    assert relative_delta(stream.logits(hidden)[0], expected) < 1e-5


def test_the_streamed_forward_matches_transformers(tiny_llama):
    folder = tiny_llama("model", **BASE, tie_word_embeddings=True)
    config = json.loads((folder / "config.json").read_text())
    stream = StreamedLlama(CheckpointReader(folder), config, torch.device("cpu"))
    hidden = stream.embed([IDS])
    for done in layer_passes(stream, hidden, BASE["num_hidden_layers"]):
        hidden = done.hidden
    with torch.no_grad():
        expected = load(folder)(IDS).logits[0]
    assert relative_delta(stream.logits(hidden)[0], expected) < 1e-5


def test_fits_recover_planted_bases_and_selection_places_the_best_units():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(500, 24, generator=generator, dtype=torch.float64)
    wide = torch.cat([base, torch.randn(500, 8, generator=generator, dtype=torch.float64)], dim=1)
    order = torch.randperm(32, generator=generator)
    permutation = fit_permutation(wide[:, order] * -1, base)  # every coordinate planted with a flipped sign
    assert torch.equal(permutation.read(wide[:, order] * -1, slice(0, 24)), base)
    # a rank-deficient donor embedding (new columns all zero) still gives the least-squares minimum-norm map
    rotation = torch.linalg.qr(torch.randn(32, 32, generator=generator, dtype=torch.float64)).Q
    for donor in (wide @ rotation, torch.cat([base, torch.zeros(500, 8, dtype=torch.float64)], 1) @ rotation):
        q = fit_rotation(donor, base)
        assert torch.allclose(q.T @ q, torch.eye(32, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(donor @ q[:, :24], base, atol=1e-8)
    # scores by unit: the two best (units 2 and 4) go to the grafted positions 2..4, best first
    assert place_chosen_units(torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0]), 2, 4).tolist() == [0, 1, 2, 4, 3]


def refused(capsys, argv: list[str], fragment: str, out: Path) -> None:
    capsys.readouterr()
    assert surgery_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))


def test_alignment_is_refused_where_it_means_nothing(tiny_llama, tmp_path, capsys):
    base = tiny_llama("base", **BASE)
    donor = tiny_llama("donor", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96,
                       seed=1)
    out = tmp_path / "out"
    common = ["--base", str(base), "--out", str(out)]
    refused(capsys, [*common, "--donor", "random", *WIDE, "--align", "rotation"], "a random donor has no trained",
            out)
    refused(capsys, [*common, "--donor", str(donor), "--legacy", "--mode", "block_diagonal", "--select", "output"],
            "drop --select or --legacy", out)
    refused(capsys, ["align", *common, "--donor", str(donor), "--method", "none"], "leaves the donor as it is", out)
    refused(capsys, ["align", *common, "--donor", str(donor), "--method", "permutation", "--max-shard-size", "2GiB"],
            "--max-shard-size: shard size '2GiB' not understood", out)
    # the dry run says what a rotation will cost
    assert surgery_main([*common, "--donor", str(donor), "--align", "rotation", "--select", "output", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "align:  rotation; select: output" in printed and "TFLOP" in printed
