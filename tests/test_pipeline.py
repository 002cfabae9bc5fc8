"""The shared foundation: config strictness, atomic outputs, and streaming safetensors I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from pipeline.checkpoint import CheckpointReader, ShardedWriter, TensorSpec
from pipeline.config import load_config, section_fingerprint, shard_size_bytes
from pipeline.errors import UserError
from pipeline.runs import atomic_output_dir, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).run_dir


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("surgery.mdoe=zero", "unknown key 'surgery.mdoe'"),
        ("train.max_steps=ten", "train.max_steps"),
        ("surgery.mode=diagonal", "surgery.mode"),
        ("train.max_shard_size=2GiB", "train.max_shard_size"),
        ("nonsense", "dotted.key=value"),
    ],
)
def test_bad_config_names_the_key(override, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        load_config(REPO / "configs/smoke.yaml", [override])


@pytest.mark.parametrize("lever", ["train.fast.saved_layers=2", "train.fast.offload_inputs=true",
                                   "train.fast.host_saved_layers=4"])
def test_a_selective_lever_asked_for_under_another_checkpointing_mode_is_refused_with_the_fix(lever):
    offload = ["train.fast.checkpointing=offload"]
    fast = load_config(REPO / "configs/smoke.yaml", offload).train.fast  # the defaults: ignored there
    assert fast.saved_layers_in_effect == 0 and not fast.offload_inputs_in_effect
    assert fast.host_saved_layers_in_effect == 0
    with pytest.raises(UserError) as error:
        load_config(REPO / "configs/smoke.yaml", [*offload, lever])
    message = str(error.value)
    assert "\n" not in message and f"{lever.split('=')[0]}=" in message
    assert "needs train.fast.checkpointing=selective" in message


def test_overrides_parse_yaml_values_and_change_fingerprint():
    base = load_config(REPO / "configs/smoke.yaml")
    changed = load_config(REPO / "configs/smoke.yaml", ["train.max_steps=7"])
    assert changed.train.max_steps == 7
    assert section_fingerprint(base.surgery) == section_fingerprint(changed.surgery)
    assert section_fingerprint(base.train) != section_fingerprint(changed.train)


def test_a_benchmark_subset_override_keeps_the_leaderboard_shots():
    config = load_config(REPO / "configs" / "llama2-22b-readers.yaml", ["eval.benchmarks.arc_challenge.n=100"])
    assert (config.eval.benchmarks.arc_challenge.n, config.eval.benchmarks.arc_challenge.num_fewshot) == (100, 25)
    config = load_config(REPO / "configs" / "llama2-22b-readers.yaml", ["eval.benchmarks.mmlu.num_fewshot=0"])
    assert (config.eval.benchmarks.mmlu.n, config.eval.benchmarks.mmlu.num_fewshot) == (10, 0)


def test_atomic_output_dir_leaves_nothing_on_failure_and_refuses_existing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"x")
    assert (final / "whole.bin").is_file()
    with pytest.raises(UserError, match="already exists"), atomic_output_dir(final):
        pass
    with atomic_output_dir(final, force=True) as tmp:
        (tmp / "new.bin").write_bytes(b"y")
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_manifest_roundtrip(tmp_path):
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, "surgery", inputs={"base": "x"})
    manifest = read_manifest(tmp_path)
    assert manifest["stage"] == "surgery" and manifest["inputs"] == {"base": "x"}
    assert "torch" in manifest["versions"]


def test_sharded_writer_roundtrips_through_safetensors_and_transformers_layout(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.randn(7),
        "c": torch.randn(2, 2, dtype=torch.float16),
        "d": torch.randn(4, 4),
    }
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    (tmp_path / "ours").mkdir()
    (tmp_path / "library").mkdir()
    writer = ShardedWriter(tmp_path / "ours", specs, max_shard_size=40)
    for name, tensor in tensors.items():  # in plan order, although "d" (64 bytes) gets a shard before b and c's
        writer.write(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    # the shards huggingface_hub's own writer (save_pretrained's split) makes of the same tensors
    save_torch_state_dict(tensors, tmp_path / "library", max_shard_size=40)
    assert index == json.loads((tmp_path / "library" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(writer.shard_names) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for shard in writer.shard_names:
        loaded.update(load_file(tmp_path / "ours" / shard))
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    reader = CheckpointReader(tmp_path / "ours")
    assert reader.names == sorted(tensors)
    assert torch.equal(reader.get("c"), tensors["c"])


def test_writer_refuses_tensors_off_plan(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("a", (2,), torch.float32)], max_shard_size=100)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("a", torch.zeros(3))


def test_reader_refuses_pickle_and_torn_files(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(UserError, match="never unpickles"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(UserError, match="truncated or corrupt"):
        CheckpointReader(tmp_path)


def test_shard_sizes_read_as_save_pretrained_reads_them():
    assert shard_size_bytes("5GB") == 5 * 10**9
    assert shard_size_bytes("500mb") == 5 * 10**8
    with pytest.raises(ValueError, match="5GB"):
        shard_size_bytes("five gigs")
