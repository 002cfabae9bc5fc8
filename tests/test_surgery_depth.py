"""Depth growth on tiny real checkpoints: where every layer comes from, exactness in fp32, the new layers'
gradient, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from surgery_pairs import IDS, logits, make_pair, run, tensors

from pipeline.checkpoint import INDEX_NAME, TensorSpec, assign_shards, safetensors_header
from pipeline.config import load_config
from pipeline.runs import read_manifest
from surgery.cli import main as surgery_main
from surgery.cli import make_plan
from surgery.depth import base_layer_positions, donor_layer_sources, layer_layout
from surgery.plan import expected_tensors
from surgery.shapes import read_model_shape
from surgery.verify import verify

REPO = Path(__file__).resolve().parents[1]
TARGET_DEPTH = 8  # from 3 base layers: positions 0, 4, 7, so layers 1-3 are three new layers in a row
BASE_POSITIONS = {0: 0, 4: 1, 7: 2}  # output position -> base layer: round_half_up(i * 7 / 2)
DONOR_OF_POSITION = [0, 1, 1, 2, 2, 3, 3, 4]  # proportional over the 5-layer donor: round_half_up(j * 4 / 7)
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
READERS_AND_NORMS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj")


def layer_tensor(got: dict, layer: int, suffix: str) -> torch.Tensor:
    return got[f"model.layers.{layer}.{suffix}.weight"]


def test_placement_and_width_donor_maps():
    assert base_layer_positions(3, 8) == [0, 4, 7]
    assert base_layer_positions(3, 6) == [0, 3, 5]  # 2.5 rounds up
    assert base_layer_positions(4, 4) == [0, 1, 2, 3]
    assert donor_layer_sources(60, 60, "proportional") == list(range(60))  # every donor layer once
    assert donor_layer_sources(8, 5, "proportional") == DONOR_OF_POSITION
    # the 33b shape: Llama-2-13b's 40 layers in 60 positions, first and last kept, llama-30b's 60 layers each once
    layout = layer_layout(40, 60, 60, "proportional", "donor")
    positions = base_layer_positions(40, 60)
    assert positions[:4] == [0, 2, 3, 5] and positions[-1] == 59 and len(set(positions)) == 40
    assert [s.donor_layer for s in layout] == list(range(60))
    assert [s.base_layer for s in layout if not s.is_new] == list(range(40))
    copies = layer_layout(3, 8, 5, "proportional", "copy")
    assert [s.copy_of for s in copies] == [None, 0, 0, 0, None, 4, 4, None]


@pytest.mark.parametrize("new_layers", ["donor", "copy"])
@pytest.mark.parametrize("mode", ["zero", "block_diagonal", "block_triangular", "readers"])
def test_every_layer_of_a_grown_model_comes_from_its_source(tiny_llama, tmp_path, mode, new_layers):
    base, donor = make_pair(tiny_llama, gqa=True)
    # With these depths the width donors of the base layers' positions are the plain widening's (0, 2, 4), so a
    # base layer must come out exactly as the plain widening made it.
    plain = tensors(run(base, donor, tmp_path / "plain", "--mode", mode))
    grown = tensors(run(base, donor, tmp_path / "grown", "--mode", mode, "--num-hidden-layers", str(TARGET_DEPTH),
                        "--new-layers", new_layers))
    donor_t = tensors(donor)
    assert len(grown) == len(plain) + 9 * (TARGET_DEPTH - 3)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(grown[name], plain[name]), name
    last_base_position = 0
    for position in range(TARGET_DEPTH):
        if position in BASE_POSITIONS:
            last_base_position = position
            for suffix in WRITERS + READERS_AND_NORMS:
                assert torch.equal(layer_tensor(grown, position, suffix),
                                   layer_tensor(plain, BASE_POSITIONS[position], suffix)), (position, suffix)
            continue
        for suffix in WRITERS:
            writer = layer_tensor(grown, position, suffix)
            assert writer.shape == layer_tensor(plain, 0, suffix).shape and not writer.any(), (position, suffix)
        for suffix in READERS_AND_NORMS:
            got = layer_tensor(grown, position, suffix)
            if new_layers == "copy":
                expected = layer_tensor(grown, last_base_position, suffix)
            else:
                source = layer_tensor(donor_t, DONOR_OF_POSITION[position], suffix)
                expected = source[: got.shape[0], : got.shape[1]] if got.dim() == 2 else source[: got.shape[0]]
            assert torch.equal(got, expected), (position, suffix)
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert config["num_hidden_layers"] == TARGET_DEPTH
    plan = read_manifest(tmp_path / "grown")["plan"]
    assert (plan["num_hidden_layers"], plan["base_num_hidden_layers"], plan["new_layers"]) == (8, 3, new_layers)
    assert [s["base_layer"] for s in plan["layer_sources"]] == [0, None, None, None, 1, None, None, 2]


@pytest.mark.parametrize(("gqa", "tied", "new_layers"), [(False, False, "donor"), (True, True, "copy")])
@pytest.mark.parametrize("mode", ["zero", "block_diagonal", "readers"])
def test_grown_exact_modes_reproduce_the_base_logits_in_fp32(tiny_llama, tmp_path, mode, gqa, tied, new_layers):
    base, donor = make_pair(tiny_llama, gqa=gqa, tied=tied)
    out = run(base, donor, tmp_path / "out", "--mode", mode, "--num-hidden-layers", str(TARGET_DEPTH),
              "--new-layers", new_layers)
    expected, got = logits(base, IDS), logits(out, IDS)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == (tied and mode == "zero")


def test_the_base_depth_asked_for_explicitly_changes_nothing(tiny_llama, tmp_path):
    base, donor = make_pair(tiny_llama, gqa=True)
    default = tmp_path / "default"
    run(base, donor, default)
    explicit = run(base, donor, tmp_path / "explicit", "--num-hidden-layers", "3", "--new-layers", "copy")
    for shard in sorted(default.glob("*.safetensors")):
        assert shard.read_bytes() == (explicit / shard.name).read_bytes(), shard.name
    assert (default / "config.json").read_text() == (explicit / "config.json").read_text()
    plan = read_manifest(explicit)["plan"]
    assert plan["new_layers"] is None and plan["num_hidden_layers"] == 3
    assert plan["layer_sources"] == [{"base_layer": i, "donor_layer": d, "copy_of": None} for i, d in
                                     enumerate([0, 2, 4])]


def test_depth_alone_with_a_random_donor_copies_layers_and_stays_tied(tiny_llama, tmp_path):
    base = tiny_llama("base", hidden_size=32, intermediate_size=64, num_hidden_layers=3, tie_word_embeddings=True)
    out = run(base, "random", tmp_path / "out", "--hidden-size", "32", "--num-attention-heads", "4",
              "--num-key-value-heads", "4", "--intermediate-size", "64", "--num-hidden-layers", "6")
    expected, got = logits(base, IDS), logits(out, IDS)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_hidden_layers"] == 6
    plan = read_manifest(out)["plan"]
    assert plan["new_layers"] == "copy"  # the default with a random donor, which has no layers to take
    grown, base_t = tensors(out), tensors(base)
    assert [s["base_layer"] for s in plan["layer_sources"]] == [0, None, None, 1, None, 2]
    assert torch.equal(layer_tensor(grown, 4, "mlp.up_proj"), layer_tensor(base_t, 1, "mlp.up_proj"))  # copy of 3


def test_verify_reports_the_new_layers_gradient_and_catches_a_writing_new_layer(tiny_llama, tmp_path, capsys):
    base, donor = make_pair(tiny_llama, gqa=True)
    out = run(base, donor, tmp_path / "out", "--mode", "readers", "--num-hidden-layers", str(TARGET_DEPTH))
    report = verify(base, out, device="cpu")
    assert report.passed and report.exact and report.new_layers_identity
    assert report.new_layer_positions == [1, 2, 3, 5, 6]
    for kind in ("o_proj", "down_proj"):
        assert report.new_layer_grad[kind] > 0, kind
    for kind in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "input_layernorm"):
        assert report.new_layer_grad[kind] == 0.0, kind  # their outputs are read by all-zero writers
    assert "new layers: 5 of 8 (positions 1, 2, 3, 5, 6); identity on the residual stream: yes" in report.render()
    # A new layer that writes into the residual stream is no longer the identity.
    name = "model.layers.2.self_attn.o_proj.weight"
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    weights = load_file(shard)
    weights[name][:, :] = 0.01
    save_file(weights, shard, metadata={"format": "pt"})
    capsys.readouterr()
    assert surgery_main(["verify", "--base", str(base), "--out", str(out), "--device", "cpu"]) == 1
    assert "FAIL: a new layer changes the residual stream" in capsys.readouterr().out


def test_dry_run_shows_where_every_layer_comes_from(tiny_llama, tmp_path, capsys):
    base, donor = make_pair(tiny_llama)
    out = tmp_path / "out"
    assert surgery_main(["--base", str(base), "--donor", str(donor), "--out", str(out), "--dry-run",
                         "--num-hidden-layers", "5", "--new-layers", "copy"]) == 0
    text = capsys.readouterr().out
    assert "layers: 3 -> 5, new layers from: copy" in text
    assert "layer   0: base layer 0, new heads and neurons from donor layer 0" in text
    assert "layer   1: new: copy of layer 0, o_proj and down_proj zero" in text
    assert "layer   4: base layer 2, new heads and neurons from donor layer 4" in text
    assert "model.layers.1.mlp.up_proj.weight" in text and "copy of model.layers.0.mlp.up_proj.weight" in text
    assert not out.exists()


def refused(capsys, argv: list[str], fragment: str) -> None:
    assert surgery_main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_depth_refusals(tiny_llama, tmp_path, capsys):
    base, donor = make_pair(tiny_llama)
    out = tmp_path / "out"
    argv = ["--base", str(base), "--donor", str(donor), "--out", str(out)]
    refused(capsys, [*argv, "--num-hidden-layers", "2"], "--num-hidden-layers 2 is below the base's 3 layers")
    refused(capsys, [*argv, "--num-hidden-layers", "5", "--mode", "block_diagonal", "--legacy"],
            "which kept the base's 3 layers; drop --num-hidden-layers 5")
    refused(capsys, [*argv, "--num-hidden-layers", "6", "--layer-map", "index"],
            "layer map index needs a donor at least as deep as the target (donor 5 < target 6 layers)")
    refused(capsys, ["--base", str(base), "--donor", "random", "--out", str(out), "--hidden-size", "48",
                     "--num-attention-heads", "6", "--num-key-value-heads", "6", "--intermediate-size", "96",
                     "--num-hidden-layers", "5", "--new-layers", "donor"], "a random donor has none")
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_config_key_sets_the_depth_and_verify_reads_the_run(tiny_llama, tmp_path, capsys):
    base, donor = make_pair(tiny_llama)
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nsurgery:\n  base: {base}\n  donor: {donor}\n  dtype: float32\n"
                      "  new_layers: copy\n  target:\n    num_hidden_layers: 4\n")
    assert surgery_main(["--config", str(config)]) == 0
    plan = read_manifest(tmp_path / "run" / "surgery")["plan"]
    assert plan["num_hidden_layers"] == 4 and plan["new_layers"] == "copy"
    assert [s["copy_of"] for s in plan["layer_sources"]] == [None, 0, None, None]
    # verify finds the base and the output from the same config
    assert surgery_main(["verify", "--config", str(config), "--device", "cpu"]) == 0
    assert "new layers: 1 of 4 (positions 1)" in capsys.readouterr().out
    refused(capsys, ["verify", "--out", str(tmp_path / "run" / "surgery")], "pass --base REF and --out DIR")


def test_new_layers_add_exactly_nothing_to_a_bf16_output(tiny_llama, tmp_path):
    """A bf16 widening is exact only up to rounding; inserting identity layers must not add even rounding: the
    grown model's logits are the plain widening's, bit for bit (5 layers: the base layers' width donors are the
    plain widening's)."""
    base, donor = make_pair(tiny_llama, tied=True)
    reports = []
    for depth in ("3", "5"):
        out = tmp_path / f"out-{depth}"
        assert surgery_main(["--base", str(base), "--donor", str(donor), "--out", str(out), "--dtype", "bfloat16",
                             "--num-hidden-layers", depth]) == 0
        reports.append(verify(Path(base), out, device="cpu"))
    plain, grown = reports
    assert grown.new_layer_positions == [1, 3] and grown.new_layers_identity and grown.new_dims_max_abs == 0.0
    assert (grown.max_abs_delta, grown.mean_kl, grown.top1_agreement) == (
        plain.max_abs_delta, plain.mean_kl, plain.top1_agreement)
    assert grown.loss == plain.loss


LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 40,
              "num_hidden_layers": 40, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
LLAMA_30B = {"hidden_size": 6656, "intermediate_size": 17920, "num_attention_heads": 52, "num_key_value_heads": 52,
             "num_hidden_layers": 60, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}


def write_sparse_llama(folder: Path, widths: dict) -> Path:
    """A checkpoint with the real shapes in 5 GB shards with real safetensors headers, whose data sections are
    holes in sparse files: planning reads only headers, so a 65 GB model costs no disk."""
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
              "tie_word_embeddings": False, "torch_dtype": "float16", **widths}
    (folder / "config.json").write_text(json.dumps(config))
    specs = [TensorSpec(name, shape, torch.float16)
             for name, shape in expected_tensors(read_model_shape(folder, "test")).items()]
    weight_map = {}
    for number, shard in enumerate(assign_shards(specs, 5 * 10**9)):
        name = f"model-{number:05d}.safetensors"
        header = safetensors_header(shard, {"format": "pt"})
        with open(folder / name, "wb") as file:
            file.write(header)
            file.truncate(len(header) + sum(spec.nbytes for spec in shard))
        weight_map.update({spec.name: name for spec in shard})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_the_33b_shape_config_plans_32_5b_parameters_from_every_donor_layer(tmp_path):
    base = write_sparse_llama(tmp_path / "llama-2-13b", LLAMA2_13B)
    donor = write_sparse_llama(tmp_path / "llama-30b", LLAMA_30B)
    run_config = load_config(REPO / "configs/llama2-33b-shape.yaml",
                             [f"surgery.base={base}", f"surgery.donor={donor}", f"run_dir={tmp_path / 'run'}"])
    plan = make_plan(run_config.surgery, weights=False)
    assert plan.params_before == 13_015_864_320  # Llama-2-13b
    assert round(plan.params_after / 1e8) == 325  # 32.5B
    assert plan.num_hidden_layers == 60 and plan.new_layers == "donor" and plan.exact
    assert plan.donor_layers == list(range(60))  # every llama-30b layer, once
    assert [s.base_layer for s in plan.layers if not s.is_new] == list(range(40))
    assert plan.bytes_to_write == 2 * plan.params_after
