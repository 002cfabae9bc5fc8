"""The processes of one training run: which one this is, and the rules that keep N of them equal to one.

With `train.num_gpus` > 1 (or `train.distributed: fsdp`) `python -m train` starts one process per GPU through
accelerate launch (train/launch.py); each finds itself here. The rules:

- the global batch is the config's: each process accumulates `grad_accum / processes` micro-batches, so an
  optimizer step sees `batch_size x grad_accum` blocks whatever the number of processes (the HF Trainer's
  seeded sampler hands process i every i-th block of the same order a single process would read);
- only the main process writes (data cache, held-out file, wandb run, export, manifest); the others wait for it;
- a worker dies with the process that launched it, so a killed run never leaves trainers writing into the
  run folder next to the run that resumes it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, MutableMapping
from typing import NoReturn

from pipeline.errors import UserError

log = logging.getLogger(__name__)

LAUNCHER_PID = "FRANKENLLAMA_LAUNCHER_PID"  # set by train/launch.py for the workers it starts
PR_SET_PDEATHSIG = 1


def under_launcher() -> bool:
    """True in a process started by accelerate launch or torchrun (they set LOCAL_RANK for every worker)."""
    return "LOCAL_RANK" in os.environ


def is_secondary_process() -> bool:
    """A worker other than the main one: it reports nothing the main process reports already."""
    return under_launcher() and int(os.environ.get("RANK", "0")) != 0


def processes_to_run(num_gpus: int) -> int:
    """The world size: the launcher's when one started this process, else what the config asks for."""
    return int(os.environ.get("WORLD_SIZE", "1")) if under_launcher() else num_gpus


def world_size() -> int:
    """How many processes train together right now (1 outside a launcher)."""
    return processes_to_run(1)


def launched_with_fsdp() -> bool:
    """Whether the launcher configured FSDP (accelerate sets this for the Trainer's Accelerator to read)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def grad_accum_per_process(grad_accum: int, processes: int) -> int:
    """Micro-batches each process accumulates per optimizer step, keeping the global batch the config's."""
    if grad_accum % processes:
        raise UserError(
            f"train.grad_accum={grad_accum} does not split evenly over {processes} processes; set train.grad_accum "
            f"to a multiple of {processes} (the global batch is train.batch_size x train.grad_accum sequences)"
        )
    return grad_accum // processes


def keep_one_process_on_one_gpu() -> None:
    """Show a training process that runs alone only the first visible GPU; call it before CUDA starts.

    With several GPUs visible and no launcher, the HF Trainer falls back to torch.nn.DataParallel inside the one
    process: a replica of the 4-bit model on every GPU at every step, and a loss scaled by the GPU count (seen on
    a 2-GPU H200: every logged loss doubled, so the 2 -> 1 GPU resumption no longer matched). More GPUs are used
    through train.num_gpus, one process each.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or "," in visible:
        os.environ["CUDA_VISIBLE_DEVICES"] = (visible or "0").split(",")[0]


def grow_cuda_memory_in_place(environment: MutableMapping[str, str] = os.environ) -> None:
    """Let torch's CUDA allocator extend its segments instead of adding fixed ones; call it before CUDA starts
    (or on the environment a process will be started with, as the bench does for its cells).

    The stage's memory figures (benchmarks/train_bench.py) are measured with `expandable_segments:True`: with fixed
    segments a 22b step leaves more of the card reserved but unusable, and settings that fit in the bench (the
    saved layers, the offloaded inputs' transfers) can run out of memory on the same card. A setting the user
    made in PYTORCH_CUDA_ALLOC_CONF is kept; workers started by accelerate inherit it.
    """
    environment.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def join_world():
    """This process's place among the workers (a single process is a world of one); initializes the process group.

    The HF Trainer later builds its Accelerator on this same (shared) state, so the group is made only once. Its
    timeout is long because under an outside launcher the other workers wait while the main one prepares the data
    slice (download and tokenization), which can take longer than the default 10 to 30 minutes.
    """
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=2))


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its launcher dies (workers run in their own session, so a SIGKILL
    of the launcher alone would leave them training). No-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher and int(launcher) != os.getppid():  # the launcher died before prctl took effect
        os._exit(1)


def run_worker(main: Callable[[], int]) -> NoReturn:
    """Run a worker's main function and leave with its exit code without running destructors.

    torch's gloo process group joins its threads in its destructor while holding the GIL; a thread that is still
    releasing the tensors of the last collective waits for the GIL, and the worker never exits (seen right after
    training, under load). Everything is written and flushed by then; a crash still prints its traceback.
    """
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:  # a worker must exit, whatever happened
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
