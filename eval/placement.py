"""Where a model's weights go: the memory budgets eval hands to accelerate, and what accelerate made of them.

The placement itself is accelerate's (`device_map="auto"` with `max_memory`): the GPU first, then CPU RAM, then
the checkpoint files on disk, whole decoder layers at a time, with room kept on the GPU for an offloaded layer in
transit. Eval only decides the budgets, from what is free now as accelerate counts it: a GPU's free memory less
the largest forward's activations and the allocator's slack (pipeline/sizing.py's rule, which the doctor applies
too: a relative margin does not know how large the forwards are, and left a 6 GiB card too little for a 25-shot
ARC batch), and the host's MemAvailable (psutil). Not MemFree: after 91 GB of downloads most of the RAM holds page
cache, which MemFree leaves out although the kernel hands it back at once, so a MemFree budget sends layers to disk.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from pipeline.sizing import EVAL_ALLOCATOR_SLACK, eval_weight_budget

log = logging.getLogger(__name__)

# Of MemAvailable, the share the weights may take; the rest is the interpreter, lm-eval's data, the kept logits.
CPU_SHARE = 0.9
PLACE_NAMES = {"cpu": "in CPU RAM", "disk": "on disk"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def device_key(device: torch.device) -> int | str:
    """The key accelerate uses for a device in `max_memory` and `hf_device_map`."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return device.type


def available_memory(device: torch.device) -> int:
    """Bytes free for weights on `device` now: a GPU's free memory, or the host's MemAvailable."""
    from accelerate.utils import get_max_memory

    return get_max_memory()[device_key(device)]


def memory_budgets(device: torch.device, activations: int) -> dict[int | str, int]:
    """`max_memory` for `from_pretrained`: the GPU's free memory less `activations` (the largest forward eval will
    make, eval/precision.py's estimate) and the allocator's slack, then CPU RAM.

    On a CPU device the whole budget is CPU RAM; what fits nowhere goes to disk (accelerate's last resort).
    """
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    budgets: dict[int | str, int] = {"cpu": int(free["cpu"] * CPU_SHARE)}
    if device.type == "cuda":
        key = device_key(device)
        budgets = {key: eval_weight_budget(free[key], activations), **budgets}
        if budgets[key] == 0:
            log.warning("the %s free on %s hold no weights beside the largest forward's %s of activations and %s of "
                        "allocator slack: every layer stays in CPU RAM or on disk; lower eval.benchmarks.batch_size "
                        "to keep some on the GPU", human_bytes(free[key]), device, human_bytes(activations),
                        human_bytes(EVAL_ALLOCATOR_SLACK))
    return budgets


def input_device(model) -> torch.device:
    """Where a model's inputs go: its one device, or for a model accelerate spread out, the device it computes
    offloaded layers on (the GPU, else the CPU). Not the first parameter's device: an offloaded embedding's
    parameters are meta tensors."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return next(model.parameters()).device
    computing = [where for where in device_map.values() if where not in ("cpu", "disk")]
    return torch.device(computing[0]) if computing else torch.device("cpu")


@dataclass(frozen=True)
class Place:
    """How much of a model ended up on one device."""

    layers: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _place_name(where) -> str:
    if isinstance(where, int):
        return f"cuda:{where}"
    return str(where)


def placement_summary(model) -> dict[str, Place]:
    """Decoder layers and weight bytes per place ("cuda:0", "cpu", "disk"), from accelerate's `hf_device_map`.

    Offloaded weights are meta tensors in the model (shape and dtype kept), so their bytes still count; a model
    that fit one device has no device map and sits where its parameters are.
    """
    device_map = getattr(model, "hf_device_map", None) or {}
    # Longest prefix first, so "model.layers.3" wins over "model.layers" and "" (the whole model).
    prefixes = sorted(device_map, key=len, reverse=True)
    layers: dict[str, set[int]] = defaultdict(set)
    sizes: dict[str, int] = defaultdict(int)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        key = next((p for p in prefixes if p == "" or name == p or name.startswith(p + ".")), None)
        where = _place_name(device_map[key]) if key is not None else _place_name(tensor.device)
        sizes[where] += tensor.numel() * tensor.element_size()
        match = _LAYER.search(name)
        if match:
            layers[where].add(int(match.group(1)))
    return {where: Place(len(layers[where]), size) for where, size in sizes.items()}


def human_bytes(count: float) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def describe_placement(summary: dict[str, Place], total_layers: int) -> str:
    """'18 of 40 layers (19.1 GB) on cuda:0, 22 layers (23.9 GB) in CPU RAM' (the GPU first, disk last)."""
    order = sorted(summary, key=lambda where: (where == "disk", where == "cpu", where))
    parts = []
    for index, where in enumerate(order):
        place = summary[where]
        count = f"{place.layers} of {total_layers} layers" if index == 0 else f"{place.layers} layers"
        parts.append(f"{count} ({human_bytes(place.bytes)}) {PLACE_NAMES.get(where, 'on ' + where)}")
    return ", ".join(parts)
