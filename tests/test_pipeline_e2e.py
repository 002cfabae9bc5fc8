"""The whole pipeline through the real orchestrator (`python -m pipeline run|status`), as users launch it.

One run folder (a tiny random Llama with SmolLM2's tokenizer, widened in readers mode, QLoRA-trained a few steps
on the bundled corpus, evaluated on the shipped fixtures) is SIGKILLed in each stage in turn and rerun; the
tests then read what every step left behind: nothing half-written ever counts as complete, training resumes
from its checkpoint in the same wandb run, a finished run is skipped, a changed train section reruns train and
eval only. Separately: a full disk during surgery and bad configs fail with one line and touch nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import copy_tokenizer, write_tiny_llama

from eval.benchmarks import FIXTURES_DIR
from pipeline.config import load_config
from pipeline.orchestrate import stage_state
from pipeline.runs import stage_fingerprint, write_manifest
from train.trainer import newest_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 20
SAVE_STEPS = 2
# One intra-op thread: on 2 shared cores, torch's second thread mostly waits at barriers.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}
STAGES = ("surgery", "train", "eval")


def run_config(run_dir: Path, base: Path) -> dict:
    """The smoke run in miniature: every stage does its real work, on sizes that take seconds."""
    return {
        "run_dir": str(run_dir),
        "seed": 0,
        "surgery": {
            "base": str(base), "donor": "random", "mode": "readers", "dtype": "float32",
            # Several shards, so a kill lands between shard files as well as inside one.
            "max_shard_size": "16MB",
            "target": {"hidden_size": 256, "num_attention_heads": 16, "num_key_value_heads": 16,
                       "intermediate_size": 512},
        },
        "train": {
            "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "seq_len": 32, "batch_size": 1, "grad_accum": 1,
            "quantization": "nf4", "gradient_checkpointing": False, "learning_rate": 1e-3, "warmup_ratio": 0.0,
            "data": {"sources": ["python-stdlib-docs"], "tokens": 2000, "heldout_fraction": 0.1},
            "lora": {"r": 4, "alpha": 8},
            "watchdog": {"enabled": False},
            "wandb": {"mode": "offline"},
        },
        "eval": {
            # Random tiny models loop under greedy decoding; the pipeline, not the verdict, is under test here.
            "probe": {"prompts": 2, "max_new_tokens": 16, "batch_size": 2, "fail_on_degenerate": False,
                      "skip_benchmarks_on_degenerate": False},
            "preservation": {"texts": 2, "max_tokens": 32},
            "perplexity": {"max_texts": 2, "window": 64},
            "benchmarks": {
                "data_dir": str(FIXTURES_DIR), "batch_size": 8,
                "arc_challenge": {"n": 2, "num_fewshot": 0}, "hellaswag": {"n": 2, "num_fewshot": 0},
                "mmlu": {"n": 1, "num_fewshot": 0}, "truthfulqa_mc2": {"n": 2, "num_fewshot": 0},
            },
        },
    }


def pipeline_args(command: str, config: Path, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "pipeline", command, str(config)]
    for assignment in overrides:
        args += ["--set", assignment]
    return args


def run_pipeline(config: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(pipeline_args("run", config, *overrides), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=400, **kwargs)


def status(config: Path, *overrides: str) -> tuple[dict[str, str], str]:
    """({stage: state}, the full text) from `python -m pipeline status`."""
    result = subprocess.run(pipeline_args("status", config, *overrides), cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    states = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line[:1].strip()}
    return states, result.stdout


def run_and_kill(config: Path, ready: Callable[[], bool], log: Path, timeout: float = 300) -> None:
    """Start a pipeline run, SIGKILL its whole process group (orchestrator and stage) once `ready()` holds."""
    with log.open("w") as output:
        process = subprocess.Popen(pipeline_args("run", config), cwd=REPO, env=ENV, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if process.poll() is not None:
                    pytest.fail(f"the run ended (exit {process.returncode}) before it could be killed:\n"
                                f"{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no kill point after {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.002)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def manifest_stamp(folder: Path) -> tuple[int, str] | None:
    path = folder / "manifest.json"
    return (path.stat().st_mtime_ns, path.read_text()) if path.is_file() else None


def wandb_records(run_folder: Path) -> list:
    """The records of an offline wandb run file (leveldb log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    block, pos, chunks, records = 32768, 7, [], []  # 7 bytes of file header: magic ':W&B' and version
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer padding
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a FULL chunk, or the LAST of a FIRST/MIDDLE.../LAST sequence
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def wandb_run_record(run_folder: Path):
    return next(r.run for r in wandb_records(run_folder) if r.WhichOneof("record_type") == "run")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, smollm2_dir) -> Path:
    folder = write_tiny_llama(tmp_path_factory.mktemp("base") / "tiny", hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=4, head_dim=16, intermediate_size=128, vocab_size=49152)
    return copy_tokenizer(smollm2_dir, folder)


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, base_model) -> dict:
    """One run folder killed in surgery, then in training, then in eval, then run to the end; what each step left."""
    root = tmp_path_factory.mktemp("e2e")
    run_dir = root / "run"
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(run_dir, base_model)))
    seen: dict = {"root": root, "run_dir": run_dir, "config": config}

    # 1. Killed while surgery writes its shards.
    run_and_kill(config, lambda: any(run_dir.glob("surgery.tmp-*/model-*.safetensors")), root / "kill-surgery.log")
    seen["after_surgery_kill"] = status(config)
    seen["surgery_leftovers"] = sorted(p.name for p in run_dir.glob("surgery*"))
    seen["surgery_tmp_has_manifest"] = any(run_dir.glob("surgery.tmp-*/manifest.json"))

    # 2. Killed in training, after a checkpoint and before the last step.
    run_and_kill(config, lambda: newest_complete_checkpoint(run_dir / "train") is not None, root / "kill-train.log")
    seen["after_train_kill"] = status(config)
    seen["checkpoint_at_kill"] = newest_complete_checkpoint(run_dir / "train")
    seen["wandb_id_at_kill"] = (run_dir / "train" / "wandb_run_id").read_text().strip()
    seen["train_manifest_at_kill"] = (run_dir / "train" / "manifest.json").exists()

    # 3. Killed in eval, once its temporary report folder is being filled; training finished first (resumed).
    run_and_kill(config, lambda: any(run_dir.glob("eval.tmp-*/tasks")), root / "kill-eval.log")
    seen["resume_log"] = (root / "kill-eval.log").read_text()
    seen["after_eval_kill"] = status(config)

    # 4. A plain rerun finishes the job.
    seen["final_run"] = run_pipeline(config)
    seen["final_status"] = status(config)
    return seen


def test_surgery_killed_mid_write_is_never_taken_for_complete(crashed_run):
    states, text = crashed_run["after_surgery_kill"]
    assert states == {"surgery": "partial", "train": "missing", "eval": "missing"}, text
    assert len(crashed_run["surgery_leftovers"]) == 1 and crashed_run["surgery_leftovers"][0].startswith("surgery.tmp-")
    assert not crashed_run["surgery_tmp_has_manifest"]
    assert "unfinished:" in text and "surgery.tmp-" in text


def test_training_killed_between_checkpoints_resumes_in_the_same_wandb_run(crashed_run):
    states, text = crashed_run["after_train_kill"]
    assert states == {"surgery": "complete", "train": "partial", "eval": "missing"}, text
    checkpoint = crashed_run["checkpoint_at_kill"]
    assert checkpoint is not None and int(checkpoint.name.split("-")[1]) < MAX_STEPS
    assert not crashed_run["train_manifest_at_kill"]
    assert f"checkpoints: checkpoint-{checkpoint.name.split('-')[1]}" in text

    log = crashed_run["resume_log"]
    assert "surgery: complete for this config, skipping" in log
    assert re.search(r"\[train\] resuming from \S*checkpoint-\d+", log), log[-3000:]
    train_dir = crashed_run["run_dir"] / "train"
    assert (train_dir / "wandb_run_id").read_text().strip() == crashed_run["wandb_id_at_kill"]
    manifest = json.loads((train_dir / "manifest.json").read_text())
    assert manifest["steps"] == MAX_STEPS and manifest["wandb_run_id"] == crashed_run["wandb_id_at_kill"]
    history = json.loads((train_dir / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, MAX_STEPS + 1))
    # Both processes wrote into one wandb run: every offline run folder carries the same id, in the run's group.
    runs = sorted((train_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(crashed_run["wandb_id_at_kill"]) for r in runs)
    record = wandb_run_record(runs[-1])
    assert (record.run_id, record.run_group, record.job_type) == (crashed_run["wandb_id_at_kill"], "run", "train")


def test_eval_killed_midway_is_partial_and_the_rerun_completes_every_stage(crashed_run):
    states, text = crashed_run["after_eval_kill"]
    assert states == {"surgery": "complete", "train": "complete", "eval": "partial"}, text
    result = crashed_run["final_run"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "surgery: complete for this config, skipping" in result.stdout
    assert "train: complete for this config, skipping" in result.stdout
    run_dir = crashed_run["run_dir"]
    assert sorted(p.name for p in run_dir.iterdir() if p.name != "data") == ["eval", "surgery", "train"]
    for stage in STAGES:
        assert json.loads((run_dir / stage / "manifest.json").read_text())["status"] == "complete"
    states, text = crashed_run["final_status"]
    assert states == dict.fromkeys(STAGES, "complete"), text


def test_status_shows_where_each_stage_put_its_outputs(crashed_run):
    _, text = crashed_run["final_status"]
    run_dir = crashed_run["run_dir"]
    for label, path in [
        ("widened model", run_dir / "surgery"),
        ("merged model", run_dir / "train" / "merged"),
        ("adapter", run_dir / "train" / "adapter"),
        ("held-out text", run_dir / "train" / "heldout.jsonl"),
        ("report", run_dir / "eval" / "report.md"),
        ("samples", run_dir / "eval" / "samples.jsonl"),
        ("loss plot", run_dir / "eval" / "training_loss.png"),
        ("benchmark plot", run_dir / "eval" / "benchmarks.png"),
    ]:
        assert f"{label}: {path}\n" in text, (label, text)
        assert path.exists()


def test_the_run_ends_with_the_report_and_where_its_files_are(crashed_run):
    stdout = crashed_run["final_run"].stdout
    run_dir = crashed_run["run_dir"]
    report = (run_dir / "eval" / "report.md").read_text()
    assert report.rstrip() in stdout
    assert "| model | Average | ARC (0-shot)" in stdout and "| trained |" in stdout
    tail = stdout[stdout.index(report.rstrip()) + len(report.rstrip()):]
    for line in (f"report: {run_dir / 'eval' / 'report.md'}", f"samples: {run_dir / 'eval' / 'samples.jsonl'}",
                 f"benchmark plot: {run_dir / 'eval' / 'benchmarks.png'}"):
        assert line in tail
    assert f"wandb sync {run_dir / 'eval' / 'wandb' / 'offline-run-'}" in tail


def test_eval_results_are_a_wandb_table_in_the_train_runs_group(crashed_run):
    eval_dir = crashed_run["run_dir"] / "eval"
    (offline_run,) = (eval_dir / "wandb").glob("offline-run-*")
    record = wandb_run_record(offline_run)
    eval_id = (eval_dir / "wandb_run_id").read_text().strip()
    assert (record.run_id, record.run_group, record.job_type, record.display_name) == (
        eval_id, "run", "eval", "run-eval")
    assert eval_id != crashed_run["wandb_id_at_kill"]
    assert json.loads((eval_dir / "manifest.json").read_text())["wandb_run_id"] == eval_id
    (table_file,) = (offline_run / "files" / "media" / "table" / "eval").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    report = json.loads((eval_dir / "report.json").read_text())
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]}
    assert sorted(rows) == ["base", "surgery", "trained"]
    for label in rows:
        assert rows[label]["verdict"] == report["verdicts"][label]
        assert rows[label]["arc_challenge"] == report["benchmarks"]["scores"][label]["arc_challenge"]["value"]
    assert rows["trained"]["bits_per_byte"] == report["perplexity"]["trained"]["bits_per_byte"]
    assert list((offline_run / "files" / "media" / "table" / "eval").glob("samples_*.table.json"))


def test_a_finished_run_is_skipped_whole(crashed_run):
    run_dir = crashed_run["run_dir"]
    before = {stage: manifest_stamp(run_dir / stage) for stage in STAGES}
    result = run_pipeline(crashed_run["config"])
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES:
        assert f"{stage}: complete for this config, skipping" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("[frankenllama]") and "running" in line]
    assert {stage: manifest_stamp(run_dir / stage) for stage in STAGES} == before


def test_a_changed_train_section_reruns_train_and_eval_but_not_surgery_and_keeps_fitting_checkpoints(
        crashed_run):
    run_dir, config = crashed_run["run_dir"], crashed_run["config"]
    surgery_before = manifest_stamp(run_dir / "surgery")
    eval_before = manifest_stamp(run_dir / "eval")
    states, _ = status(config, "train.max_steps=4")
    assert states == {"surgery": "complete", "train": "stale", "eval": "stale"}

    result = run_pipeline(config, "train.max_steps=4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "surgery: complete for this config, skipping" in result.stdout
    assert "train: stale, running (resuming its checkpoints if they fit this config" in result.stdout
    assert f"checkpoint-{MAX_STEPS}) is past train.max_steps=4" in result.stderr  # a shorter run starts over
    assert "eval: complete for this config" not in result.stdout
    for stage in ("train", "eval"):
        assert re.search(rf"\[frankenllama\] {stage}: complete in \d+ s", result.stdout)
    assert manifest_stamp(run_dir / "surgery") == surgery_before
    assert manifest_stamp(run_dir / "eval") != eval_before
    assert json.loads((run_dir / "train" / "manifest.json").read_text())["steps"] == 4
    assert status(config, "train.max_steps=4")[0] == dict.fromkeys(STAGES, "complete")
    assert status(config)[0] == {"surgery": "complete", "train": "stale", "eval": "stale"}

    # Training longer continues from the newest checkpoint instead of starting over.
    longer = run_pipeline(config, "train.max_steps=6")
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert f"resuming from {run_dir / 'train' / 'checkpoint-4'}" in longer.stderr
    assert "starting over" not in longer.stderr
    logged = [e["step"] for e in json.loads((run_dir / "train" / "log_history.json").read_text()) if "loss" in e]
    assert logged == list(range(1, 7))
    assert status(config, "train.max_steps=6")[0] == dict.fromkeys(STAGES, "complete")


def test_a_stage_older_than_its_rebuilt_input_is_stale(tmp_path, base_model):
    """Same config, but surgery was redone (by hand, with --force) after training: the adapter was trained on a
    model that no longer exists there, so train and eval are stale, not complete."""
    config = load_config(None, [f"run_dir={tmp_path / 'run'}", f"surgery.base={base_model}"])
    for stage, finished_at in (("surgery", "2026-01-01T10:00:00+0000"), ("train", "2026-01-01T10:59:59+0000"),
                               ("eval", "2026-01-01T12:00:00+0000")):
        config.stage_dir(stage).mkdir(parents=True)
        write_manifest(config.stage_dir(stage), stage, fingerprint=stage_fingerprint(config, stage),
                       finished_at=finished_at)
    assert {stage: stage_state(config, stage) for stage in STAGES} == dict.fromkeys(STAGES, "complete")
    write_manifest(config.stage_dir("surgery"), "surgery", fingerprint=stage_fingerprint(config, "surgery"),
                   finished_at="2026-01-01T12:00:00+0100")  # 11:00:00 UTC, after train's 10:59:59
    assert {stage: stage_state(config, stage) for stage in STAGES} == {
        "surgery": "complete", "train": "stale", "eval": "stale"}


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_full_disk_during_surgery_fails_with_one_line_and_touches_nothing(tmp_path, base_model):
    """The disk fills while the shards are written: a file-size limit makes write() fail with EFBIG, as a full
    disk makes it fail with ENOSPC, without needing a small file system (no mount privileges)."""
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(run_dir, base_model)))
    inputs_before = file_hashes(base_model), config.read_bytes()
    limit = 4 * 2**20  # the free-space check passes; the first 16 MB shard does not fit

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_pipeline(config, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "ran out of disk space writing" in errors[0] and "free some space" in errors[0]
    assert "Traceback" not in result.stderr
    assert "[frankenllama] surgery failed (exit 2)" in result.stdout
    assert not list(run_dir.glob("surgery*")), "no output and no temporary folder may be left"
    assert (file_hashes(base_model), config.read_bytes()) == inputs_before
    assert status(config)[0]["surgery"] == "missing"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.max_steps=ten", "train.max_steps"),
        ("surgery.base=/nonexistent/model-folder", "/nonexistent/model-folder"),
    ],
)
def test_bad_config_fails_before_any_work_with_one_line(tmp_path, base_model, override, fragment):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(run_dir, base_model)))
    result = run_pipeline(config, override)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not list(run_dir.glob("surgery*"))
