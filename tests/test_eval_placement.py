"""Where eval puts a model's weights: all on the device when they fit, else (on a GPU) split with CPU RAM, so
a 22b in bf16 still runs on a 24 GB card. The GPU's free memory is the only thing stood in for here."""

from __future__ import annotations

import torch

from eval import models
from eval.models import MEMORY_MARGIN, placement


def test_weights_stay_on_the_device_when_they_fit_and_split_with_cpu_ram_when_not(tiny_llama, monkeypatch):
    folder = tiny_llama("model", hidden_size=64, intermediate_size=128, vocab_size=1000)
    fp32_bytes = models.parameter_count(folder) * 4
    assert placement(folder, torch.float32, torch.device("cpu")) == ("cpu", None)

    def free(gpu_bytes: int):
        return lambda device: gpu_bytes if device.type == "cuda" else 64 * 10**9

    monkeypatch.setattr(models, "free_memory_bytes", free(int(fp32_bytes * MEMORY_MARGIN) + 1))
    assert placement(folder, torch.float32, torch.device("cuda")) == ("cuda", None)
    # The same weights in bf16 need half the room.
    monkeypatch.setattr(models, "free_memory_bytes", free(fp32_bytes))
    assert placement(folder, torch.float32, torch.device("cuda"))[0] == "auto"
    assert placement(folder, torch.bfloat16, torch.device("cuda")) == ("cuda", None)
    # "auto" means the checkpoint's own dtype: its bytes on disk (fp32 here) decide.
    device_map, max_memory = placement(folder, "auto", torch.device("cuda"))
    assert device_map == "auto"
    assert max_memory == {0: int(fp32_bytes / MEMORY_MARGIN), "cpu": int(64 * 10**9 * 0.9)}
