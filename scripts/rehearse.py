"""Rehearse a run config at its real widths: random base and donor checkpoints K layers deep, then the real stages.

    python scripts/rehearse.py CONFIG [--layers K] [--items N] [--out DIR]      # on a GPU box (the H200: 22b widths)
    python scripts/rehearse.py CONFIG --base-widths 5120,40,40,13824 --donor-widths 6656,52,52,17920   # offline
    python scripts/rehearse.py CONFIG --quick                                    # tiny widths, CPU, about a minute

What it does, in one process tree measured by a meter (scripts/rehearsal/meter/sitecustomize.py):

1. builds the base and donor as HF safetensors folders with the widths and vocabulary of the config's models
   (their config.json from a local folder, the HF cache or the hub; or from the width flags when offline), K
   layers deep (the donor proportionally deeper), random weights; a 32000-entry tokenizer built offline from the
   bundled corpus; and local benchmark files whose few-shot contexts have the real lengths in tokens;
2. writes a run config from CONFIG with those models and the bundled corpus, its own train and eval settings
   otherwise (seq_len, micro-batch, recipe, LoRA, NF4, shots, batch sizes), a short run (two checkpoints) and a
   few items; random weights make every model DEGENERATE, so the verdicts are recorded but not fatal;
3. runs what scripts/run_all.sh runs: `python -m pipeline doctor`, then `python -m pipeline run`, killed with
   SIGKILL (the whole process group) once the first checkpoint is complete, then the same command again, which
   must skip surgery, resume training from that checkpoint, export and evaluate;
4. checks that NF4 keeps the surgery's zero blocks zero and that the NF4 widened model tracks the NF4 base;
5. prints per stage: wall time, peak GPU memory, peak resident memory and disk written, and an extrapolation to the
   full depth (fixed terms + per-layer terms x layers: disk from the written tensors, memory from
   pipeline/sizing.py's per-layer terms), then the line `rehearse: <widths>, <K> layers: all stages ok (...)`.

Every stage process has its CUDA allocator capped (--gpu-cap-gib, 23 by default: a 24 GB card) and sees that card
in torch.cuda.mem_get_info; psutil reports at most --ram-cap-gib of RAM (64: the box), and the rehearsal kills the
run if the tree's resident memory passes it. Exit 0 when every check passed. Needs torch, transformers, peft,
accelerate, bitsandbytes, lm-eval, datasets, pydantic (and liger-kernel for the fast recipe's fused loss on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO), str(SCRIPTS)]

import yaml  # noqa: E402
from rehearsal import report  # noqa: E402
from rehearsal.benchmark_data import fewshot_context_tokens, write_benchmarks  # noqa: E402
from rehearsal.checkpoints import llama_config  # noqa: E402

QUICK_BASE = (128, 4, 4, 352)
QUICK_DONOR = (192, 6, 6, 512)
GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the run config to rehearse, e.g. configs/llama2-22b-readers.yaml")
    parser.add_argument("--layers", type=int, default=8, help="depth of the random base (the donor proportionally)")
    parser.add_argument("--items", type=int, default=8, help="scored items per benchmark (per MMLU subject)")
    parser.add_argument("--save-steps", type=int, default=2, help="train.save_steps; the run trains twice as many")
    parser.add_argument("--out", type=Path, help="working folder (default: a fresh folder under /tmp); emptied first")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and run folder afterwards")
    parser.add_argument("--quick", action="store_true", help="tiny widths and a shrunk recipe: checks the script")
    parser.add_argument("--base-widths", help="HIDDEN,HEADS,KV_HEADS,INTERMEDIATE of the base (else its config.json)")
    parser.add_argument("--donor-widths", help="the same for the donor")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size with the width flags")
    parser.add_argument("--full-layers", type=int, help="depth to extrapolate to (default: the base's config.json)")
    parser.add_argument("--gpu-cap-gib", type=float, default=23.0)
    parser.add_argument("--eval-gpu-cap-gib", type=float, help="eval's cap (default --gpu-cap-gib)")
    parser.add_argument("--ram-cap-gib", type=float, default=64.0)
    parser.add_argument("--deadline-s", type=float, default=0, help="stop whatever runs at this many seconds and "
                        "report what was measured (0: no deadline); keeps a lent machine's command in its limit")
    return parser.parse_args()


def widths(text: str) -> tuple[int, int, int, int]:
    values = tuple(int(part) for part in text.split(","))
    if len(values) != 4:
        raise SystemExit(f"rehearse: widths {text!r}: expected HIDDEN,HEADS,KV_HEADS,INTERMEDIATE")
    return values


def reference_config(ref: str) -> dict | None:
    """A model reference's config.json without downloading weights: a local folder, the HF cache, or the hub."""
    from pipeline.hub import hub_reachable
    from pipeline.models import model_ref_kind, resolve_model

    kind = model_ref_kind(ref)
    if kind in ("local", "packaged"):
        return json.loads((resolve_model(ref) / "config.json").read_text())
    if kind != "hub":
        return None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if hub_reachable():
        return json.loads(Path(hf_hub_download(ref, "config.json", etag_timeout=10)).read_text())
    return None


def model_configs(args, surgery: dict) -> tuple[dict, dict | None, int]:
    """(base config.json, donor config.json or None for a random donor, full depth) at K layers."""
    keep = ("architectures", "model_type", "hidden_act", "bos_token_id", "eos_token_id", "max_position_embeddings",
            "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias",
            "torch_dtype")

    def resolve(ref: str, flag: str | None, quick: tuple, role: str) -> dict:
        if args.quick or flag:  # as Llama-2-13b and llama-30b: 40 and 60 layers deep, stored in fp16
            return llama_config(quick if args.quick else widths(flag), args.vocab,
                                num_hidden_layers=40 if role == "base" else 60, torch_dtype="float16")
        found = reference_config(ref)
        if found is None:
            raise SystemExit(f"rehearse: cannot read {ref}'s config.json (offline?); pass --{role}-widths "
                             "HIDDEN,HEADS,KV_HEADS,INTERMEDIATE")
        sizes = (found["hidden_size"], found["num_attention_heads"],
                 found.get("num_key_value_heads") or found["num_attention_heads"], found["intermediate_size"])
        return llama_config(sizes, found["vocab_size"], num_hidden_layers=found["num_hidden_layers"],
                            **{k: found[k] for k in keep if k in found})

    base = resolve(surgery["base"], args.base_widths, QUICK_BASE, "base")
    donor = None if surgery.get("donor", "random") == "random" else resolve(surgery["donor"], args.donor_widths,
                                                                            QUICK_DONOR, "donor")
    full = args.full_layers or base["num_hidden_layers"]
    donor_layers = None if donor is None else max(args.layers, round(args.layers * donor["num_hidden_layers"]
                                                                     / base["num_hidden_layers"]))
    base = {**base, "num_hidden_layers": args.layers}
    if donor is not None:
        donor = {**donor, "num_hidden_layers": donor_layers}
    return base, donor, full


def merge(tree: dict, overrides: dict) -> dict:
    out = dict(tree)
    for key, value in overrides.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def rehearsal_config(raw: dict, args, folders: dict[str, Path], items: int) -> dict:
    """CONFIG with the random models, the bundled corpus, a short run, few items and nothing fatal about DEGENERATE."""
    train = raw.get("train") or {}
    steps = 2 * args.save_steps
    seq_len = 128 if args.quick else train.get("seq_len", 2048)
    batch = 1 if args.quick else train.get("batch_size", 1)
    grad_accum = 2 if args.quick else train.get("grad_accum", 16)
    tokens = int(1.3 * steps * seq_len * batch * grad_accum) + 20 * seq_len
    surgery = {"base": str(folders["base"]), "donor": str(folders["donor"]) if folders.get("donor") else "random"}
    if args.quick and surgery["donor"] == "random":
        surgery["target"] = dict(zip(("hidden_size", "num_attention_heads", "num_key_value_heads",
                                      "intermediate_size"), QUICK_DONOR, strict=True))
    overrides: dict = {
        "run_dir": str(folders["run"]),
        "surgery": surgery,
        "train": {
            "model": None, "max_steps": steps, "save_steps": args.save_steps, "num_gpus": 1,
            "data": {"sources": ["python-stdlib-docs"], "tokens": tokens, "heldout_fraction": 0.02, "seed": 0},
            "wandb": {"mode": "disabled"},
            # Random weights repeat one token: the watchdog must probe (its memory counts) but not stop the run.
            "watchdog": {"enabled": True, "every_steps": args.save_steps, "stop_on_degenerate": False},
        },
        "eval": {
            "wandb": {"mode": "disabled"},
            "probe": {"prompts": 4 if args.quick else 16, "fail_on_degenerate": False,
                      "skip_benchmarks_on_degenerate": False},
            "preservation": {"texts": 2 if args.quick else 4},
            "perplexity": {"max_texts": 2},
            "benchmarks": {"data_dir": str(folders["benchmarks"]),
                           **{name: {"n": items} for name in ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2")}},
        },
    }
    if args.quick:
        overrides["train"].update(seq_len=seq_len, batch_size=batch, grad_accum=grad_accum, lora={"r": 8})
        overrides["train"]["watchdog"].update(max_new_tokens=16, prompts=2)
        overrides["eval"]["probe"].update(max_new_tokens=16, batch_size=4)
        overrides["eval"]["preservation"]["max_tokens"] = 64
        overrides["eval"]["perplexity"]["window"] = 256
    config = merge(raw, overrides)
    if args.quick and surgery["donor"] != "random":
        config["surgery"].pop("target", None)  # the config's target widths are the real donor's, not the tiny one's
    return config


class TreeWatch:
    """Polls the resident memory of a process tree: peak per stage, and a SIGKILL of the group past the RAM cap.

    Counted is anonymous memory (RSS minus file-backed and shared pages): mapped safetensors pages are page cache,
    which a 64 GB box reclaims, not memory the run holds."""

    def __init__(self, process: subprocess.Popen, cap_bytes: float, peaks: dict[str, int]):
        self.process, self.cap, self.peaks = process, cap_bytes, peaks
        self.exceeded: tuple[str, int] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def stage_of(cmdline: list[str]) -> str:
        if "-m" in cmdline and cmdline.index("-m") + 1 < len(cmdline):
            module = cmdline[cmdline.index("-m") + 1]
            return module if module != "pipeline" else f"pipeline {cmdline[cmdline.index('-m') + 2]}"
        return "other"

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.process.pid)
        except psutil.Error:
            return
        while self.process.poll() is None:
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    info = proc.memory_info()
                    anonymous = max(0, info.rss - getattr(info, "shared", 0))
                    total += anonymous
                    stage = self.stage_of(proc.cmdline())
                    self.peaks[stage] = max(self.peaks.get(stage, 0), info.rss)
            except psutil.Error:
                pass
            if total > self.cap and self.exceeded is None:
                self.exceeded = (time.strftime("%H:%M:%S"), total)
                os.killpg(self.process.pid, signal.SIGKILL)
            time.sleep(0.5)


class Deadline:
    """The rehearsal's time limit: a command still running past it is killed, and no further step starts."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds if seconds else None
        self.hit_during: str | None = None

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() > self.at


def run_command(command: list[str], log: Path, env: dict, rss_peaks: dict[str, int], cap: float,
                deadline: Deadline, kill_when=None) -> tuple[int, bool, TreeWatch]:
    """Run a command in its own process group with its output in `log`; SIGKILL the group once `kill_when()`."""
    if deadline.hit_during:
        raise DeadlineReached
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        watch = TreeWatch(process, cap, rss_peaks)
        killed = False
        while process.poll() is None:
            if deadline.passed():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                deadline.hit_during = log.stem
                raise DeadlineReached
            if kill_when is not None and kill_when():
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
        return process.wait(), killed, watch


class DeadlineReached(Exception):
    """--deadline-s passed: skip to the report."""


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Rehearsal:
    """One rehearsal: its folders, the environment of every process it starts, and what it has found so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = (args.out or Path(f"/tmp/rehearse-{os.getpid()}")).resolve()
        shutil.rmtree(self.out, ignore_errors=True)
        self.folders = {name: self.out / name
                        for name in ("base", "donor", "benchmarks", "run", "meter", "logs", "tokenizer")}
        for name in ("meter", "logs"):
            self.folders[name].mkdir(parents=True)
        self.raw = yaml.safe_load(args.config.read_text())
        if not self.raw.get("surgery"):
            raise SystemExit(f"rehearse: {args.config} has no surgery section to rehearse")
        self.base_config, self.donor_config, self.full_layers = model_configs(args, self.raw["surgery"])
        if self.donor_config is None:
            self.folders.pop("donor")
        meter = str(SCRIPTS / "rehearsal" / "meter")
        path = os.pathsep.join(p for p in (meter, str(REPO), str(SCRIPTS), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "REHEARSE_METER_DIR": str(self.folders["meter"]),
                    "REHEARSE_GPU_CAP_GIB": str(args.gpu_cap_gib),
                    "REHEARSE_EVAL_GPU_CAP_GIB": str(args.eval_gpu_cap_gib or args.gpu_cap_gib),
                    "REHEARSE_RAM_CAP_GIB": str(args.ram_cap_gib), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.deadline = Deadline(args.deadline_s)
        self.rss: dict[str, int] = {}
        self.failures: list[str] = []
        self.contexts: dict[str, int] = {}
        self.nf4: dict | None = None
        self.run_config = None

    def run(self, command: list[str], log: str, kill_when=None) -> tuple[int, bool, TreeWatch]:
        return run_command(command, self.folders["logs"] / f"{log}.log", self.env, self.rss,
                           self.args.ram_cap_gib * GIB, self.deadline, kill_when)

    def log_tail(self, log: str, lines: int = 30) -> str:
        return tail(self.folders["logs"] / f"{log}.log", lines)

    def build_inputs(self) -> None:
        """The tokenizer, the random checkpoints (each in its own process: its CUDA context ends with it), the
        benchmark files, and the run config."""
        from rehearsal.tokenizer import build_tokenizer, corpus_texts

        from pipeline.config import load_config

        started = time.monotonic()
        tokenizer = build_tokenizer(self.folders["tokenizer"], self.base_config["vocab_size"])
        for role, model_config in (("base", self.base_config), ("donor", self.donor_config)):
            if model_config is None:
                continue
            self.folders[role].mkdir()
            config_file = self.out / f"{role}-config.json"
            config_file.write_text(json.dumps(model_config))
            dtype = str(model_config.get("torch_dtype") or "float16")
            dtype = dtype if dtype in ("float16", "bfloat16", "float32") else "float16"
            code, _, _ = self.run([sys.executable, "-m", "rehearsal.checkpoints", str(self.folders[role]),
                                   str(config_file), dtype, str(1 if role == "base" else 2)], f"checkpoints-{role}")
            if code != 0:
                print(self.log_tail(f"checkpoints-{role}"))
                raise SystemExit(f"rehearse: writing the random {role} failed (exit {code})")
            for file in self.folders["tokenizer"].iterdir():
                shutil.copy2(file, self.folders[role] / file.name)
        write_benchmarks(self.folders["benchmarks"], tokenizer, corpus_texts(), self.args.items)
        config = rehearsal_config(self.raw, self.args, self.folders, self.args.items)
        self.config_path = self.out / "rehearsal.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.run_config = load_config(self.config_path)  # a bad merge fails here, before any stage
        benchmarks = self.run_config.eval.benchmarks
        shots = {name: getattr(benchmarks, name).num_fewshot for name in ("arc_challenge", "hellaswag", "mmlu")}
        self.contexts = fewshot_context_tokens(self.folders["benchmarks"], tokenizer, shots)
        donor = self.donor_config
        donor_text = f", donor {report.widths_text(donor)} x {donor['num_hidden_layers']}" if donor else ""
        print(f"rehearse: base {report.widths_text(self.base_config)} x {self.args.layers} layers{donor_text}, "
              f"vocab {self.base_config['vocab_size']}, written in {time.monotonic() - started:.0f} s; contexts "
              f"(tokens, {shots['arc_challenge']}/{shots['hellaswag']}/{shots['mmlu']} shots): "
              + ", ".join(f"{k} {v}" for k, v in self.contexts.items()), flush=True)

    def run_stages(self) -> None:
        """What run_all.sh runs: the doctor, then the pipeline, killed after its first checkpoint, then again."""
        from train.trainer import checkpoint_step, newest_complete_checkpoint

        pipeline = [sys.executable, "-m", "pipeline"]
        code, _, _ = self.run([*pipeline, "doctor", str(self.config_path)], "doctor")
        print(self.log_tail("doctor", 40), flush=True)
        if code != 0:
            self.failures.append(f"doctor exit {code}")
        train_dir = self.run_config.stage_dir("train")
        code, killed, watch = self.run([*pipeline, "run", str(self.config_path)], "run-killed",
                                       kill_when=lambda: newest_complete_checkpoint(train_dir) is not None)
        killed_at = newest_complete_checkpoint(train_dir)
        how = f"killed with SIGKILL after {killed_at.name}" if killed and killed_at else "ended"
        print(f"rehearse: first run {how} (exit {code})", flush=True)
        if watch.exceeded or not killed:
            print(self.log_tail("run-killed"))
            self.failures.append("RAM cap exceeded in the first run" if watch.exceeded else
                                 f"the first run ended (exit {code}) before its first checkpoint could be killed")
        code, _, watch = self.run([*pipeline, "run", str(self.config_path)], "run-resumed")
        resumed_log = (self.folders["logs"] / "run-resumed.log").read_text(errors="replace")
        print("\n".join(line for line in resumed_log.splitlines() if line.startswith("[frankenllama]")), flush=True)
        if code != 0 or watch.exceeded:
            print(self.log_tail("run-resumed", 60))
            self.failures.append("RAM cap exceeded" if watch.exceeded else f"the resumed run failed (exit {code})")
        elif killed_at is not None and f"resuming from {killed_at}" not in resumed_log:
            self.failures.append(f"the second run did not resume from {killed_at.name}")
        saved = sorted(step for p in train_dir.glob("checkpoint-*") if (step := checkpoint_step(p)) is not None)
        if code == 0 and len(saved) < 2:
            self.failures.append(f"expected two checkpoints, found {saved}")

    def check_nf4(self) -> None:
        """NF4 on the widened model, on the device training uses."""
        widened = self.run_config.stage_dir("surgery")
        if not (widened / "config.json").is_file():
            return
        result = self.out / "nf4.json"
        code, _, _ = self.run([sys.executable, "-m", "rehearsal.nf4_check", str(self.folders["base"]), str(widened),
                               str(result)], "nf4")
        print(self.log_tail("nf4", 2 if code in (0, 1) else 30), flush=True)
        self.nf4 = json.loads(result.read_text()) if result.is_file() else None
        if code != 0:
            self.failures.append("NF4 check failed: zero blocks not kept, or the widened model does not track the "
                                 "base" if self.nf4 else f"NF4 check crashed (exit {code})")

    def finish(self, wall_s: float) -> int:
        """The table, the extrapolation and the summary line; rehearsal.json beside the logs."""
        if self.deadline.hit_during:
            self.failures.append(f"--deadline-s {self.args.deadline_s:.0f} reached during {self.deadline.hit_during}")
        if self.run_config is None:
            print(f"rehearse: FAILED before any stage ran: {'; '.join(self.failures)}")
            return 1
        result = report.build(self.run_config, self.folders, self.base_config, self.donor_config, self.args.layers,
                              self.full_layers, self.rss, self.nf4, self.contexts, wall_s, self.failures,
                              real_max_steps=(self.raw.get("train") or {}).get("max_steps", 100))
        (self.out / "rehearsal.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(report.render(result), flush=True)
        if not self.args.keep:
            for name in ("base", "donor", "run"):
                shutil.rmtree(self.out / name, ignore_errors=True)
        print(f"rehearse: logs and rehearsal.json in {self.out}")
        return 1 if self.failures else 0


def main() -> int:
    args = parse_args()
    if args.quick:
        args.layers, args.items, args.save_steps = 2, min(args.items, 2), 1
    started = time.monotonic()
    rehearsal = Rehearsal(args)
    try:
        rehearsal.build_inputs()
        rehearsal.run_stages()
        rehearsal.check_nf4()
    except DeadlineReached:
        pass
    return rehearsal.finish(time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
