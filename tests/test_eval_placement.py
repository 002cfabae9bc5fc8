"""Where eval puts a model's weights: accelerate places them within eval's budgets (the GPU's free memory less a
margin, then CPU RAM from MemAvailable, then disk), and the log says where they really went.

The host budget is read for real against /proc/meminfo; only in the disk test is the host's free memory stood in
for (a tiny model cannot otherwise overflow 24 GB of RAM), through accelerate's own `get_max_memory`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from eval.models import ModelEntry, load_model
from eval.placement import CPU_SHARE, available_memory, memory_budgets, placement_summary

SLACK = 64 * 2**20  # how far free memory may move between two reads of /proc/meminfo a few milliseconds apart


def meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) * 1024
    return fields


def test_the_cpu_budget_is_memavailable_not_memfree(tmp_path):
    # Page cache is what MemAvailable counts and MemFree does not: make sure there is some (after 91 GB of
    # downloads, there is a lot).
    cached = tmp_path / "cached.bin"
    with cached.open("wb") as handle:
        for _ in range(8):
            handle.write(os.urandom(32 * 2**20))
    cached.read_bytes()

    before = meminfo()
    budget = available_memory(torch.device("cpu"))
    after = meminfo()
    low = min(before["MemAvailable"], after["MemAvailable"]) - SLACK
    high = max(before["MemAvailable"], after["MemAvailable"]) + SLACK
    assert low <= budget <= high
    assert max(before["MemFree"], after["MemFree"]) + SLACK < budget  # MemFree would have been far less
    assert abs(memory_budgets(torch.device("cpu"), 0)["cpu"] - CPU_SHARE * budget) < CPU_SHARE * 2 * SLACK


def test_layers_that_fit_nowhere_go_to_disk_and_the_log_says_where_and_how_to_avoid_it(tiny_llama, monkeypatch,
                                                                                         caplog):
    from transformers import AutoModelForCausalLM

    folder = tiny_llama("model", num_hidden_layers=4, vocab_size=1000)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    entry = ModelEntry("model", str(folder), folder)

    whole = load_model(entry, torch.device("cpu"), torch.float32, 0)
    assert not hasattr(whole, "hf_device_map") or set(whole.hf_device_map.values()) == {"cpu"}
    weight_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    summary = placement_summary(whole)
    assert list(summary) == ["cpu"] and summary["cpu"].layers == 4 and summary["cpu"].bytes >= weight_bytes

    # A host whose MemAvailable holds only the embeddings and about a layer: the rest goes to disk.
    monkeypatch.setattr("accelerate.utils.get_max_memory", lambda max_memory=None: {"cpu": 400_000})
    with caplog.at_level(logging.INFO, logger="eval.models"):
        split = load_model(entry, torch.device("cpu"), torch.float32, 0)
    summary = placement_summary(split)
    assert summary["disk"].layers >= 2
    assert sum(place.layers for place in summary.values()) == 4
    assert sum(place.bytes for place in summary.values()) == summary_bytes(whole)
    warning = next(r.getMessage() for r in caplog.records if r.name == "eval.models" and r.levelno == logging.WARNING)
    assert f"{summary['disk'].layers} layers" in warning and "on disk" in warning and "free CPU RAM" in warning
    ids = torch.tensor([[1, 5, 9, 33, 700]])
    with torch.no_grad():
        assert torch.allclose(split(ids).logits, reference(ids).logits, atol=1e-6)


def summary_bytes(model) -> int:
    return sum(place.bytes for place in placement_summary(model).values())
