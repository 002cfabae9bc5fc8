"""The rehearsal's parts that can be checked in seconds: its benchmark files (lm-eval reads them, at the real
lengths) and its meter (caps what a stage sees, records what it used). The whole rehearsal runs as
`python scripts/rehearse.py CONFIG --quick` (minutes on 2 cores: too slow for the suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))


def test_benchmark_files_load_in_lm_eval_with_contexts_of_the_real_length(tmp_path):
    from rehearsal.benchmark_data import fewshot_context_tokens, write_benchmarks
    from rehearsal.tokenizer import build_tokenizer, corpus_texts

    from eval.benchmarks import count_items, plan_tasks, write_task_yamls
    from pipeline.config import BenchmarksConfig

    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)  # Llama's ids
    assert len(tokenizer) <= 32000
    write_benchmarks(tmp_path / "bench", tokenizer, corpus_texts(), items=3)

    leaves, skipped = plan_tasks(BenchmarksConfig(data_dir=tmp_path / "bench"))
    assert not skipped
    write_task_yamls(leaves, tmp_path / "tasks")
    counts = count_items(tmp_path / "tasks", leaves)
    assert counts == {leaf.name: 3 for leaf in leaves}
    contexts = fewshot_context_tokens(tmp_path / "bench", tokenizer, {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5})
    assert 1100 <= contexts["arc_challenge"] <= 1500  # the real 25-shot ARC context is ~1.3k Llama tokens
    assert 600 <= contexts["hellaswag"] <= 1100
    assert contexts["mmlu (professional_law)"] >= 1500


def test_meter_caps_the_ram_a_process_sees_and_records_its_peak(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS / "rehearsal" / "meter"), str(REPO)]),
           "REHEARSE_METER_DIR": str(tmp_path), "REHEARSE_RAM_CAP_GIB": "2", "REHEARSE_GPU_CAP_GIB": "23"}
    code = "import psutil\nblock = bytearray(300 * 2**20)\nprint(psutil.virtual_memory().available)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) <= 2 * 2**30 - 300 * 2**20  # the cap, less what the process itself holds
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert record["final"] and record["rss_peak"] >= 300 * 2**20
    assert record["end"] >= record["start"]
