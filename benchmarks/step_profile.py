"""One training step under torch.profiler: where the GPU's time goes and what makes the host wait for it.

train_bench's `--profile` runs this on one cell. It answers the questions one device call must settle:

- how many device-to-host copies a step makes and which Python call chain issues each (a copy into pageable
  memory blocks the host until the GPU reaches it, so the host loses its lead and the GPU then idles while the
  next kernels are launched);
- how many host reads of a tensor's value (`aten::_local_scalar_dense`: `.item()`, `bool(t)`, `.tolist()`)
  and explicit synchronizations there are, and from where;
- GPU time by kind of kernel (matmul, Triton, NF4 dequantization, attention, copies, optimizer), and how much of
  the step's wall time the GPU was busy at all;
- the matmul time split into the frozen base's products and LoRA's rank-r ones (by the issuing op's shapes: a
  LoRA product has the rank as one dimension), and the kernels that take the most time.

On CPU there is no device timeline: only the host reads and their call chains are reported (enough to check
that the profiling runs).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import torch
from transformers import TrainerCallback

# GPU kernel name fragments -> kind, first match wins (cuBLAS/CUTLASS/nvjet gemms, flash/efficient attention, ...).
KERNEL_KINDS = (
    ("copy device-to-host", ("Memcpy DtoH",)),
    ("copy host-to-device", ("Memcpy HtoD",)),
    ("copy device-to-device", ("Memcpy DtoD", "Memset")),
    ("attention", ("flash", "fmha", "attention", "_efficient_", "cudnn")),
    ("NF4 dequantization", ("kDequantize", "dequantize")),
    ("optimizer", ("kOptimizer", "optimizer", "multi_tensor_apply", "foreach")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "splitKreduce")),
    ("Triton (compiled, liger)", ("triton",)),
    ("elementwise (eager)", ("elementwise", "reduce_kernel", "vectorized", "unrolled")),
)
HOST_READ = "aten::_local_scalar_dense"
SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
# Frames that only say "a module was called": left out of call chains.
NOISE = ("torch/nn/modules/module.py", "torch/utils/_contextlib.py", "<built-in method", "torch/_compile.py",
         "torch/_dynamo/eval_frame.py", "torch/_ops.py")


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment.lower() in lowered for fragment in fragments):
            return kind
    return "other"


def call_chain(event, depth: int = 9) -> str:
    """The event's enclosing ops and Python frames, innermost first, without the module-call plumbing."""
    names, parent = [], event
    while parent is not None and len(names) < depth:
        if not any(noise in parent.name for noise in NOISE):
            names.append(parent.name.split("site-packages/")[-1])
        parent = parent.cpu_parent
    return " < ".join(names)


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time the GPU ran at least one kernel or copy."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def matmul_share(event, rank_at_most: int) -> str | None:
    """'LoRA' or 'base' for a host matmul op by its operands' shapes; None for other ops or unknown shapes."""
    if event.name not in MATMUL_OPS or not event.input_shapes:
        return None
    dims = [d for shape in event.input_shapes[:3] if shape for d in shape[-2:]]
    return "LoRA" if dims and min(dims) <= rank_at_most else "base"


def summarize(events, wall_s: float, top: int = 4, rank_at_most: int = 256, top_kernels: int = 12) -> dict:
    """Counts, times and the most frequent call chains of one profiled step (events: profiler.events())."""
    # GPU-side user annotations (torch.compile's "## Call CompiledFxGraph ... ##") span kernels, they are not ones.
    device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU and not e.name.startswith("## ")]
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    by_kind: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # name -> [count, us]
    for event in device:
        us = event.time_range.end - event.time_range.start
        by_kind[kernel_kind(event.name)] += us
        kernels[event.name[:100]][0] += 1
        kernels[event.name[:100]][1] += us
    matmul_ms: dict[str, float] = defaultdict(float)
    dtoh_chains: Counter[str] = Counter()
    pageable = 0
    for event in host:  # a device copy is attached to the host op that issued it
        share = matmul_share(event, rank_at_most)
        if share is not None:
            matmul_ms[share] += sum(kernel.duration for kernel in event.kernels)
        for kernel in event.kernels:
            if "DtoH" in kernel.name:
                dtoh_chains[call_chain(event)] += 1
                pageable += "Pageable" in kernel.name
    reads = Counter(call_chain(e) for e in host if e.name == HOST_READ)
    syncs = Counter(call_chain(e) for e in host if e.name in SYNCS)
    busy = busy_time_us([(e.time_range.start, e.time_range.end) for e in device])
    return {
        "wall_ms": round(wall_s * 1e3, 1),
        "gpu_busy_ms": round(busy / 1e3, 1),
        "gpu_ms_by_kind": {k: round(v / 1e3, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "matmul_ms_by_share": {k: round(v / 1e3, 1) for k, v in sorted(matmul_ms.items())},
        "top_kernels": [(name, count, round(us / 1e3, 1))
                        for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top_kernels]],
        "dtoh_copies": sum(dtoh_chains.values()),
        "dtoh_pageable": pageable,
        "host_reads": sum(reads.values()),
        "syncs": sum(syncs.values()),
        "dtoh_top": dtoh_chains.most_common(top),
        "host_reads_top": reads.most_common(top),
        "syncs_top": syncs.most_common(top),
    }


def format_summary(summary: dict, cell: str) -> str:
    lines = [f"[profile] {cell}: one step, wall {summary['wall_ms']} ms, GPU busy {summary['gpu_busy_ms']} ms"]
    if summary["gpu_ms_by_kind"]:
        kinds = ", ".join(f"{kind} {ms} ms" for kind, ms in summary["gpu_ms_by_kind"].items())
        lines.append(f"[profile] GPU time by kind: {kinds}")
    if summary.get("matmul_ms_by_share"):
        shares = ", ".join(f"{share} {ms} ms" for share, ms in summary["matmul_ms_by_share"].items())
        lines.append(f"[profile] matmul ops' kernels by operand shapes: {shares}")
    for name, count, ms in summary.get("top_kernels", []):
        lines.append(f"[profile]   kernel {ms:8.1f} ms {count:5d}x  {name}")
    for title, key in (("device-to-host copies", "dtoh_top"), ("host reads of a tensor value", "host_reads_top"),
                       ("explicit synchronizations", "syncs_top")):
        lines.append(f"[profile] {title}, most frequent call chains (innermost first):")
        lines.extend(f"[profile]   {count:5d}x  {chain[:300]}" for chain, count in summary[key])
    lines.append(f"train_bench profile: {summary['dtoh_copies']} device-to-host copies per step "
                 f"({summary['dtoh_pageable']} into pageable memory), {summary['host_reads']} host reads, "
                 f"{summary['syncs']} synchronizations")
    return "\n".join(lines)


class ProfileOneStep(TrainerCallback):
    """Profiles the optimizer step numbered `step` (0-based; after the warm-up, so compilation is excluded)."""

    def __init__(self, step: int, cuda: bool):
        self.step, self.cuda = step, cuda
        self.profiler = None
        self.summary: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        activities += [torch.profiler.ProfilerActivity.CUDA] if self.cuda else []
        if self.cuda:
            torch.cuda.synchronize()
        self.profiler = torch.profiler.profile(activities=activities, with_stack=True, record_shapes=True)
        self.profiler.start()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.stop()
        self.summary = summarize(self.profiler.events(), wall)
        self.profiler = None
