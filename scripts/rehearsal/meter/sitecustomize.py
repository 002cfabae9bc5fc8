"""The rehearsal's meter, loaded by every Python process it starts (this folder leads their PYTHONPATH).

With REHEARSE_METER_DIR set, each process:

- caps its CUDA caching allocator at REHEARSE_GPU_CAP_GIB (REHEARSE_EVAL_GPU_CAP_GIB for `python -m eval`) with
  torch.cuda.set_per_process_memory_fraction, queued for CUDA's lazy initialization so that a process that never
  touches the GPU (surgery) never creates a context, and makes torch.cuda.mem_get_info report that card: free =
  cap - reserved, total = cap, so eval's placement and accelerate decide as they would on a 24 GB card;
- makes psutil.virtual_memory report at most REHEARSE_RAM_CAP_GIB (available = cap - this process's resident
  memory), so the budgets that read MemAvailable see the smaller box (the rehearsal enforces the cap by
  watching the resident memory of the whole process tree);
- writes `<pid>.json` there every second and at exit: its command line, start and end times, peak CUDA memory
  allocated and reserved, and peak resident memory, so even a process killed with SIGKILL leaves its figures.

Without REHEARSE_METER_DIR it does nothing. A sitecustomize of the interpreter's own is shadowed while this one
is on PYTHONPATH; none of the stages rely on one.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import resource
import sys
import threading
import time

GIB = 2**30


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a hook right after a top-level module finishes importing (once)."""

    def __init__(self, hooks: dict):
        self.hooks = hooks

    def find_spec(self, name, path=None, target=None):
        if name not in self.hooks:
            return None
        hook = self.hooks.pop(name)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            hook(module)

        spec.loader.exec_module = run
        return spec


def _stage() -> str:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "-m" in argv and argv.index("-m") + 1 < len(argv):
        module = argv[argv.index("-m") + 1]
        if module == "pipeline" and argv.index("-m") + 2 < len(argv):
            return f"pipeline {argv[argv.index('-m') + 2]}"
        return module
    return os.path.basename(argv[1]) if len(argv) > 1 else "python"


STAGE = _stage()
METER_DIR = os.environ.get("REHEARSE_METER_DIR")
_cap_text = os.environ.get("REHEARSE_EVAL_GPU_CAP_GIB") if STAGE == "eval" else None
GPU_CAP = float(_cap_text or os.environ.get("REHEARSE_GPU_CAP_GIB") or 0) * GIB
RAM_CAP = float(os.environ.get("REHEARSE_RAM_CAP_GIB") or 0) * GIB
_record = {"pid": os.getpid(), "stage": STAGE, "argv": list(getattr(sys, "orig_argv", sys.argv)),
           "start": time.time(), "gpu_cap_gib": GPU_CAP / GIB}


def _cap_torch(torch) -> None:
    original = torch.cuda.mem_get_info

    def capped_mem_get_info(device=None):
        free, total = original(device)
        reserved = torch.cuda.memory_reserved(device)
        return max(0, min(free, int(GPU_CAP) - reserved)), min(total, int(GPU_CAP))

    def apply_cap():
        for index in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, GPU_CAP / total), index)

    torch.cuda.mem_get_info = capped_mem_get_info
    torch.cuda.memory.mem_get_info = capped_mem_get_info
    torch.cuda._lazy_call(apply_cap)


def _cap_psutil(psutil) -> None:
    original = psutil.virtual_memory

    def capped_virtual_memory():
        real = original()
        own = psutil.Process().memory_info().rss
        return real._replace(total=min(real.total, int(RAM_CAP)),
                             available=max(0, min(real.available, int(RAM_CAP) - own)))

    psutil.virtual_memory = capped_virtual_memory


def _snapshot(final: bool) -> None:
    record = dict(_record, end=time.time(), final=final,
                  rss_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            record["gpu_peak_allocated"] = max(torch.cuda.max_memory_allocated(i)
                                               for i in range(torch.cuda.device_count()))
            record["gpu_peak_reserved"] = max(torch.cuda.max_memory_reserved(i)
                                              for i in range(torch.cuda.device_count()))
            _record["gpu_peak_allocated"] = record["gpu_peak_allocated"]
            _record["gpu_peak_reserved"] = record["gpu_peak_reserved"]
        elif "gpu_peak_allocated" in _record:  # CUDA already torn down at exit: keep the last reading
            record["gpu_peak_allocated"] = _record["gpu_peak_allocated"]
            record["gpu_peak_reserved"] = _record["gpu_peak_reserved"]
    except Exception:  # never let the meter break the process it measures
        pass
    path = os.path.join(METER_DIR, f"{os.getpid()}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(record, handle)
    os.replace(tmp, path)


def _every_second() -> None:
    while True:
        time.sleep(1.0)
        try:
            _snapshot(final=False)
        except OSError:
            return


if METER_DIR:
    hooks = {}
    if GPU_CAP:
        hooks["torch"] = _cap_torch
    if RAM_CAP:
        hooks["psutil"] = _cap_psutil
    if hooks:
        sys.meta_path.insert(0, _AfterImport(hooks))
    atexit.register(_snapshot, True)
    threading.Thread(target=_every_second, name="rehearse-meter", daemon=True).start()
