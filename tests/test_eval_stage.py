"""The eval stage end to end on tiny random Llamas that use SmolLM2's real tokenizer (fast, offline, CPU).

One stage run (module fixture) is checked from several sides: the report folder's files, benchmark numbers
against a direct log-likelihood computation, perplexity against a direct computation, preservation of an
identical copy. Separate runs check the DEGENERATE exit path and the offline error.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from eval.benchmarks import FIXTURES_DIR, TASKS_DIR, choose_items, plan_tasks
from eval.cli import main as eval_main
from pipeline.config import BenchmarksConfig, load_config
from pipeline.runs import read_manifest, stage_fingerprint, write_manifest

LEADERBOARD_HEADER = "| model | Average | ARC (0-shot) | HellaSwag (0-shot) | MMLU (5-shot) | TruthfulQA (0-shot) |"
HELDOUT = [
    "The harbour was busy before dawn, with fishing boats unloading their catch under yellow lamps.",
    "Insulation slows the flow of heat, so a well-insulated house stays warm with less fuel.",
    "She tuned the violin, checked the bow, and began the slow movement from memory.",
]
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."
)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def write_tiny_smol(folder: Path, tokenizer_dir: Path, seed: int, zero_writers: bool = False) -> Path:
    """A 2-layer, 16-wide random Llama with SmolLM2's vocabulary and tokenizer files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, num_hidden_layers=2,
        vocab_size=49152, head_dim=8, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
            if zero_writers and name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def write_config(path: Path, run_dir: Path, models: list[Path], **eval_overrides) -> Path:
    settings = {
        "models": [str(m) for m in models],
        "probe": {"prompts": 4, "max_new_tokens": 16, "batch_size": 4},
        "preservation": {"texts": 3, "max_tokens": 32},
        "benchmarks": {
            "data_dir": str(FIXTURES_DIR),
            "batch_size": 16,
            "arc_challenge": {"n": 4, "num_fewshot": 0},
            "hellaswag": {"n": 4, "num_fewshot": 0},
            "mmlu": {"n": None, "num_fewshot": 5},
            "truthfulqa_mc2": {"n": 3, "num_fewshot": 0},
        },
    }
    for key, value in eval_overrides.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir), "eval": settings}))
    return path


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory, smollm2_dir):
    """base, an identical copy of it, and another random model standing in as the run's trained model (merged
    export plus a train manifest saying how it was merged); the whole stage, run once."""
    root = tmp_path_factory.mktemp("eval_stage")
    base = write_tiny_smol(root / "base", smollm2_dir, seed=0)
    copy = write_tiny_smol(root / "copy", smollm2_dir, seed=0)
    run_dir = root / "run"
    trained = write_tiny_smol(run_dir / "train" / "merged", smollm2_dir, seed=1)
    write_manifest(run_dir / "train", "train", merge={"into": "dequantized_nf4"})
    (run_dir / "train" / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HELDOUT))
    history = [{"step": s, "loss": 4.0 / s, "learning_rate": 1e-4} for s in range(1, 6)] + [{"train_runtime": 3.0}]
    (run_dir / "train" / "log_history.json").write_text(json.dumps(history))
    # Random tiny models loop under greedy decoding; this run is about everything after the probe.
    config_path = write_config(root / "eval.yaml", run_dir, [base, copy, trained],
                               probe={"fail_on_degenerate": False, "skip_benchmarks_on_degenerate": False})
    code = eval_main(["--config", str(config_path)])
    out = run_dir / "eval"
    return {"code": code, "out": out, "config": load_config(config_path), "models": {"base": base, "trained": trained},
            "report": json.loads((out / "report.json").read_text())}


def test_report_folder_is_complete_and_well_formed(stage_run):
    out, report = stage_run["out"], stage_run["report"]
    assert stage_run["code"] == 0
    for name in ("report.json", "report.md", "samples.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    for plot in ("training_loss.png", "benchmarks.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plot in report["plots"]
    assert sorted(p.name for p in (out / "tasks").glob("*.yaml")) == [
        "arc_challenge.yaml", "hellaswag.yaml", "mmlu_astronomy.yaml", "mmlu_high_school_geography.yaml",
        "mmlu_nutrition.yaml", "truthfulqa_mc2.yaml"]
    manifest = read_manifest(out)
    assert manifest["fingerprint"] == stage_fingerprint(stage_run["config"], "eval")
    assert manifest["verdicts"] == report["verdicts"]
    assert not list(out.parent.glob("eval.tmp-*"))

    assert [m["label"] for m in report["models"]] == ["base", "copy", "trained"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4
    assert {r["model"] for r in rows} == {"base", "copy", "trained"}
    assert all(set(r["signals"]) >= {"longest_run", "seq_rep_4", "zlib_ratio", "failure"} for r in rows)

    markdown = (out / "report.md").read_text()
    assert LEADERBOARD_HEADER in markdown
    for row_start in ("| base | ", "| copy | ", "| trained | ", "| Δ trained − base | ", "| Δ copy − base | "):
        assert row_start in markdown
    assert "(n=4)" in markdown and "±" in markdown
    assert "![training loss](training_loss.png)" in markdown

    # One precision for every model (fp32: they all fit), recorded in the report and the manifest.
    assert report["precision"]["compute"] == "float32" == manifest["precision"]["compute"]
    assert {m["dtype"] for m in report["models"]} == {"float32"} and manifest["exit_code"] == 0
    assert "Precision: float32 for every model" in markdown
    # Which weights the trained model's scores belong to, from the train manifest; no word for the others.
    trained = report["models"][2]
    assert trained["merge"] == {"into": "dequantized_nf4"}
    assert "**trained** (`" in markdown and "merged into the dequantized NF4 weights)" in markdown
    assert "merge" not in report["models"][0] and markdown.count("merged into") == 1


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split the way lm-eval splits: tokens of context+continuation past the
    context's own tokens."""
    context_ids = tokenizer(context).input_ids
    whole = tokenizer(context + continuation).input_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def direct_item_scores(model, tokenizer, items: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """Every chosen item scored from scratch: prompts built from the fixture files, metrics from log-likelihoods."""
    def ll(context, choices):
        return [loglikelihood(model, tokenizer, context, " " + c) for c in choices]

    def acc_norm(lls, choices, gold):
        return float(max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])) == gold)

    scores: dict[str, dict[int, float]] = {}
    arc = read_jsonl(FIXTURES_DIR / "arc_challenge" / "test.jsonl")
    scores["arc_challenge"] = {}
    for i in items["arc_challenge"]:
        doc = arc[i]
        choices = doc["choices"]["text"]
        lls = ll(f"Question: {doc['question']}\nAnswer:", choices)
        scores["arc_challenge"][i] = acc_norm(lls, choices, doc["choices"]["label"].index(doc["answerKey"]))
    hellaswag = read_jsonl(FIXTURES_DIR / "hellaswag" / "validation.jsonl")
    scores["hellaswag"] = {}
    for i in items["hellaswag"]:
        doc = hellaswag[i]
        context = hellaswag_text(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices = [hellaswag_text(e) for e in doc["endings"]]
        scores["hellaswag"][i] = acc_norm(ll(context, choices), choices, int(doc["label"]))
    for subject_dir in sorted((FIXTURES_DIR / "mmlu").iterdir()):
        def question(doc):
            options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", doc["choices"], strict=True))
            return f"{doc['question'].strip()}{options}\nAnswer:"

        shots = "".join(f"{question(d)} {'ABCD'[d['answer']]}\n\n" for d in read_jsonl(subject_dir / "dev.jsonl")[:5])
        description = f"The following are multiple choice questions (with answers) about " \
                      f"{subject_dir.name.replace('_', ' ')}.\n\n"
        test = read_jsonl(subject_dir / "test.jsonl")
        task = f"mmlu_{subject_dir.name}"
        scores[task] = {}
        for i in items[task]:
            lls = ll(description + shots + question(test[i]), list("ABCD"))
            scores[task][i] = float(max(range(4), key=lls.__getitem__) == test[i]["answer"])
    truthfulqa = read_jsonl(FIXTURES_DIR / "truthfulqa_mc2" / "validation.jsonl")
    scores["truthfulqa_mc2"] = {}
    for i in items["truthfulqa_mc2"]:
        doc = truthfulqa[i]
        probs = [math.exp(x) for x in ll(f"{TRUTHFULQA_PREAMBLE}\n\nQ: {doc['question']}\nA:",
                                          doc["mc2_targets"]["choices"])]
        true_mass = sum(p for p, label in zip(probs, doc["mc2_targets"]["labels"], strict=True) if label == 1)
        scores["truthfulqa_mc2"][i] = true_mass / sum(probs)
    return scores


def test_benchmark_numbers_match_a_direct_computation(stage_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    section = stage_run["report"]["benchmarks"]
    items = section["items"]
    assert len(items["arc_challenge"]) == 4 and len(items["truthfulqa_mc2"]) == 3
    assert [len(items[f"mmlu_{s}"]) for s in ("astronomy", "high_school_geography", "nutrition")] == [3, 4, 5]
    direct = {}
    for label in ("base", "trained"):
        folder = stage_run["models"][label]
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        direct[label] = direct_item_scores(model, AutoTokenizer.from_pretrained(folder), items)
        reported = {task: {int(k): v for k, v in scores.items()}
                    for task, scores in section["item_scores"][label].items()}
        assert reported.keys() == direct[label].keys()
        for task, scores in direct[label].items():
            assert reported[task] == pytest.approx(scores, rel=1e-4, abs=1e-6), task

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    base = direct["base"]
    scores = section["scores"]["base"]
    assert scores["arc_challenge"]["value"] == pytest.approx(mean(base["arc_challenge"].values()))
    assert scores["hellaswag"]["value"] == pytest.approx(mean(base["hellaswag"].values()))
    assert scores["truthfulqa_mc2"]["value"] == pytest.approx(mean(base["truthfulqa_mc2"].values()))
    subjects = [mean(v.values()) for task, v in base.items() if task.startswith("mmlu_")]
    assert scores["mmlu"]["value"] == pytest.approx(mean(subjects))  # macro: each subject weighs the same
    assert scores["mmlu"]["n"] == 12
    columns = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2")
    assert scores["average"]["value"] == pytest.approx(mean(scores[c]["value"] for c in columns))
    diff = section["paired_vs_base"]["trained"]["arc_challenge"]
    expected = mean(direct["trained"]["arc_challenge"][i] - base["arc_challenge"][i] for i in items["arc_challenge"])
    assert diff["value"] == pytest.approx(expected)
    assert section["paired_vs_base"]["copy"]["average"]["value"] == 0.0


def test_items_are_seeded_and_the_same_for_every_model(stage_run):
    section = stage_run["report"]["benchmarks"]
    for label, per_task in section["item_scores"].items():
        assert {task: sorted(int(k) for k in s) for task, s in per_task.items()} == section["items"], label
    config = stage_run["config"].eval.benchmarks
    leaves, _ = plan_tasks(config)
    counts = {"arc_challenge": 6, "hellaswag": 6, "mmlu_astronomy": 3, "mmlu_high_school_geography": 4,
              "mmlu_nutrition": 5, "truthfulqa_mc2": 5}
    assert choose_items(counts, leaves, config) == section["items"]
    reseeded = choose_items(counts, leaves, config.model_copy(update={"subset_seed": 1}))
    assert reseeded != section["items"]


def test_perplexity_matches_a_direct_computation(stage_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = stage_run["models"]["base"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    nll, tokens, n_bytes, document_nlls, document_bytes = 0.0, 0, 0, [], []
    for text in HELDOUT:
        ids = tokenizer(text).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        document_nlls.append(
            torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item())
        nll += document_nlls[-1]
        tokens += len(ids) - 1
        # SmolLM2's tokenizer adds no BOS, so the first token is never predicted and its bytes do not count.
        document_bytes.append(len(text.encode()) - len(tokenizer.decode(ids[:1]).encode()))
        n_bytes += document_bytes[-1]
    reported = stage_run["report"]["perplexity"]["base"]
    assert reported["predicted_tokens"] == tokens and reported["documents"] == 3
    # Per document too, in the held-out file's order, for comparisons paired over documents.
    assert reported["document_nll_nats"] == pytest.approx(document_nlls, rel=1e-5)
    assert reported["document_bytes"] == document_bytes
    assert reported["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert reported["token_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_preservation_is_exact_for_an_identical_copy_and_not_for_another_model(stage_run):
    preservation = stage_run["report"]["preservation"]
    copy, other = preservation["copy"], preservation["trained"]
    assert copy["max_abs_delta"] == 0.0
    assert copy["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert copy["top1_agreement"] == 1.0
    assert copy["positions"] > 30
    assert other["mean_kl"] > 0.1 and other["top1_agreement"] < 1.0


def test_a_degenerate_verdict_is_recorded_and_a_rerun_reports_it_at_once(tmp_path, smollm2_dir, capsys,
                                                                          monkeypatch):
    from transformers import AutoModelForCausalLM

    from pipeline.orchestrate import run_pipeline

    loads = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or load(*a, **k))
    base = write_tiny_smol(tmp_path / "base", smollm2_dir, seed=0)
    zeroed = write_tiny_smol(tmp_path / "zeroed", smollm2_dir, seed=0, zero_writers=True)
    one_item = {"n": 1, "num_fewshot": 0}
    config = write_config(tmp_path / "eval.yaml", tmp_path / "run", [base, zeroed], preservation={"enabled": False},
                          benchmarks={"arc_challenge": one_item, "hellaswag": one_item, "mmlu": one_item,
                                      "truthfulqa_mc2": one_item})
    assert eval_main(["--config", str(config)]) == 3
    out = tmp_path / "run" / "eval"
    report = json.loads((out / "report.json").read_text())
    assert report["exit_code"] == 3 and report["verdicts"]["zeroed"] == "DEGENERATE"
    assert "DEGENERATE" in report["benchmarks"]["not_run"]["zeroed"]
    assert "zeroed" not in report["benchmarks"]["item_scores"]
    assert "The stage failed (exit 3)" in (out / "report.md").read_text()
    assert "zeroed is DEGENERATE" in capsys.readouterr().out
    manifest = read_manifest(out)  # the outcome is recorded, so the next run need not repeat the work
    assert manifest["exit_code"] == 3 and manifest["verdicts"] == report["verdicts"]
    assert len(loads) == 2

    # The same inputs again: the recorded verdict, exit 3, and no model loaded.
    assert eval_main(["--config", str(config)]) == 3
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "zeroed DEGENERATE (exit 3" in printed[0] and "--force" in printed[0]
    # The orchestrator says the same instead of skipping the stage as complete.
    assert run_pipeline(str(config), [], None, "eval", False) == 3
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("[frankenllama] eval: zeroed DEGENERATE (exit 3")
    assert "--only eval --force" in printed[0]
    assert len(loads) == 2 and read_manifest(out) == manifest

    # --force evaluates again.
    assert eval_main(["--config", str(config), "--force"]) == 3
    assert len(loads) == 4 and read_manifest(out)["exit_code"] == 3


def test_offline_without_benchmark_data_is_one_clear_line(tmp_path, smollm2_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = write_tiny_smol(tmp_path / "base", smollm2_dir, seed=0)
    config = write_config(tmp_path / "eval.yaml", tmp_path / "run", [base], benchmarks={"data_dir": None})
    capsys.readouterr()  # the fixture model's save progress bars
    assert eval_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "eval.benchmarks.data_dir" in err[0]
    assert not (tmp_path / "run" / "eval").exists()


def test_bad_config_value_names_the_key(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "eval": {"probe": {"max_new_tokens": 4}}}))
    assert eval_main(["--config", str(config)]) == 2
    assert "eval.probe.max_new_tokens" in capsys.readouterr().err


def test_shipped_tasks_mirror_the_official_lm_eval_definitions():
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    official_dir = Path(lm_eval.__file__).parent / "tasks"
    pairs = {
        "arc_challenge.yaml": official_dir / "arc" / "arc_challenge.yaml",
        "hellaswag.yaml": official_dir / "hellaswag" / "hellaswag.yaml",
        "truthfulqa_mc2.yaml": official_dir / "truthfulqa" / "truthfulqa_mc2.yaml",
        "mmlu_subject.yaml": official_dir / "mmlu" / "default" / "_default_template_yaml",
    }
    keys = ("dataset_path", "dataset_name", "output_type", "training_split", "validation_split", "test_split",
            "fewshot_split", "fewshot_config", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list")
    for ours_name, official_path in pairs.items():
        ours, official = load_yaml(TASKS_DIR / ours_name), load_yaml(official_path)
        for key in keys:
            assert ours.get(key) == official.get(key), (ours_name, key)
        for key in ("process_docs", "process_results"):
            if key in official:
                assert (ours[key].__module__, ours[key].__name__) == (official[key].__module__, official[key].__name__)
    subjects = yaml.safe_load((TASKS_DIR / "mmlu_subjects.yaml").read_text())["subjects"]
    assert len(subjects) == 57
    leaves, _ = plan_tasks(BenchmarksConfig(data_dir=FIXTURES_DIR))
    assert {leaf.group for leaf in leaves if leaf.benchmark == "mmlu"} == {"astronomy", "high_school_geography",
                                                                           "nutrition"}


def test_fetch_benchmarks_offline_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch_benchmarks.py"
    spec = importlib.util.spec_from_file_location("fetch_benchmarks", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0]
    assert not (tmp_path / "data").exists()


def test_default_models_are_the_base_and_the_completed_stage_outputs(tmp_path, tiny_llama, caplog):
    from eval.models import models_to_evaluate
    from pipeline.runs import write_manifest

    base = tiny_llama("base")
    run_dir = tmp_path / "run"
    tiny_llama("run/surgery")
    write_manifest(run_dir / "surgery", "surgery")
    tiny_llama("run/train/merged")  # a train folder without a manifest: a crashed run, not a model to trust
    config = load_config(None, [f"run_dir={run_dir}", f"surgery.base={base}"])
    entries = models_to_evaluate(config)
    assert [(e.label, e.path) for e in entries] == [("base", base), ("surgery", run_dir / "surgery")]
    assert "no complete manifest" in caplog.text
    write_manifest(run_dir / "train", "train")
    entries = models_to_evaluate(config)
    assert [e.label for e in entries] == ["base", "surgery", "trained"]
    assert [e.merge for e in entries] == [None, None, None]  # a train manifest without a merge record says nothing
    write_manifest(run_dir / "train", "train", merge={"into": "base"})
    assert models_to_evaluate(config)[2].merge == {"into": "base"}
