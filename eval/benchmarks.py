"""The old Open LLM Leaderboard's four columns through lm-evaluation-harness, on seeded item subsets.

Tasks are data: eval/tasks/*.yaml mirror lm-eval's official definitions (hub datasets). For a run, a small
wrapper YAML per leaf task is written into the report folder (`tasks/`): it includes the shipped definition
and sets the few-shot count and, for local data, `dataset_path: json` with the files of
`eval.benchmarks.data_dir` (laid out as scripts/fetch_benchmarks.py writes it, one folder per benchmark and
one jsonl per split, in each dataset's hub schema). The exact task files used thus travel with the report.

Subsets are seeded item indices per leaf task (`samples=` in lm-eval), chosen once and used for every
model, so differences between models are paired item by item.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from eval.stats import Estimate, combine_equal_weight, grouped_estimate, grouped_paired_difference
from pipeline.config import BenchmarksConfig, BenchmarkSubset
from pipeline.errors import UserError
from pipeline.hub import hub_reachable

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("tasks")
FIXTURES_DIR = Path(__file__).with_name("fixtures") / "benchmarks"


@dataclass(frozen=True)
class Split:
    """A split a task knows: the jsonl file stem (= the hub split name), its YAML key, and its role.

    `eval` is scored, `fewshot` supplies the examples (needed only with num_fewshot > 0), `fallback` is a
    split lm-eval would only read if the others were missing (ARC's validation: it scores test, draws from
    train).
    """

    name: str
    key: str
    role: Literal["eval", "fewshot", "fallback"]


@dataclass(frozen=True)
class Benchmark:
    """One leaderboard column: its lm-eval task, the metric the 2023 table reported, and its splits."""

    name: str
    column: str
    metric: str
    template: str
    splits: tuple[Split, ...]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("arc_challenge", "ARC", "acc_norm", "arc_challenge.yaml",
                  (Split("train", "training_split", "fewshot"), Split("validation", "validation_split", "fallback"),
                   Split("test", "test_split", "eval"))),
        Benchmark("hellaswag", "HellaSwag", "acc_norm", "hellaswag.yaml",
                  (Split("train", "training_split", "fewshot"), Split("validation", "validation_split", "eval"))),
        Benchmark("mmlu", "MMLU", "acc", "mmlu_subject.yaml",
                  (Split("dev", "fewshot_split", "fewshot"), Split("test", "test_split", "eval"))),
        Benchmark("truthfulqa_mc2", "TruthfulQA", "acc", "truthfulqa_mc2.yaml",
                  (Split("validation", "validation_split", "eval"),)),
    )
}


def mmlu_subjects() -> list[str]:
    return yaml.safe_load((TASKS_DIR / "mmlu_subjects.yaml").read_text())["subjects"]


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs as data: `!function` tags stay strings."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def hub_dataset(benchmark: Benchmark) -> tuple[str, str | None]:
    """The hub dataset id and config of a benchmark, as its shipped task YAML names them."""
    task = yaml.load((TASKS_DIR / benchmark.template).read_text(), Loader=_TaskYamlLoader)
    return task["dataset_path"], task.get("dataset_name")


@dataclass(frozen=True)
class LeafTask:
    """One lm-eval task to run (MMLU has one per subject) and the wrapper YAML that defines it."""

    benchmark: str
    name: str
    group: str  # MMLU: the subject; others: the task name
    wrapper: dict


def _wrapper(benchmark: Benchmark, task: str, subset: BenchmarkSubset, folder: Path | None) -> dict:
    wrapper: dict = {"include": str(TASKS_DIR / benchmark.template), "task": task, "num_fewshot": subset.num_fewshot}
    if folder is None:
        return wrapper
    data_files = {}
    for split in benchmark.splits:
        path = folder / f"{split.name}.jsonl"
        needed = split.role == "eval" or (split.role == "fewshot" and subset.num_fewshot > 0)
        if path.is_file():
            data_files[split.name] = str(path.resolve())
        elif needed:
            raise UserError(f"benchmark data {path} is missing; refill eval.benchmarks.data_dir with "
                            "scripts/fetch_benchmarks.py")
        else:
            wrapper[split.key] = None  # absent locally and not read with these settings
    wrapper.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": data_files})
    return wrapper


def plan_tasks(config: BenchmarksConfig) -> tuple[list[LeafTask], dict[str, str]]:
    """The leaf tasks to run, and the benchmarks skipped with the reason.

    Raises a UserError, before any model loads, when the hub is needed but unreachable.
    """
    data_dir = config.data_dir
    if data_dir is None and not hub_reachable():
        raise UserError(
            "benchmarks need data: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) and "
            "eval.benchmarks.data_dir is not set; run `python scripts/fetch_benchmarks.py DIR` on a machine with "
            "internet and set eval.benchmarks.data_dir=DIR, or set eval.benchmarks.enabled=false"
        )
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"eval.benchmarks.data_dir {data_dir} is not a folder; fill one with "
                        "scripts/fetch_benchmarks.py (or point it at eval/fixtures/benchmarks)")
    leaves: list[LeafTask] = []
    skipped: dict[str, str] = {}
    for benchmark in BENCHMARKS.values():
        subset: BenchmarkSubset = getattr(config, benchmark.name)
        folder = Path(data_dir) / benchmark.name if data_dir is not None else None
        if folder is not None and not folder.is_dir():
            skipped[benchmark.name] = f"no {benchmark.name}/ folder in {data_dir}"
            log.warning("benchmark %s skipped: %s", benchmark.name, skipped[benchmark.name])
            continue
        if benchmark.name != "mmlu":
            leaves.append(LeafTask(benchmark.name, benchmark.name, benchmark.name,
                                   _wrapper(benchmark, benchmark.name, subset, folder)))
            continue
        official = mmlu_subjects()
        if folder is None:
            subjects = official
        else:
            subjects = sorted(p.name for p in folder.iterdir() if p.is_dir())
            unknown = [s for s in subjects if s not in official]
            if unknown:
                raise UserError(f"{folder / unknown[0]} is not an MMLU subject; subject folders are named like "
                                "cais/mmlu's configs (astronomy, high_school_geography, ...)")
        for subject in subjects:
            wrapper = _wrapper(benchmark, f"mmlu_{subject}", subset, folder / subject if folder else None)
            if folder is None:
                wrapper["dataset_name"] = subject
            wrapper["description"] = (
                f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            )
            leaves.append(LeafTask("mmlu", f"mmlu_{subject}", subject, wrapper))
    return leaves, skipped


def write_task_yamls(leaves: list[LeafTask], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for leaf in leaves:
        (folder / f"{leaf.name}.yaml").write_text(yaml.safe_dump(leaf.wrapper, sort_keys=False))


def task_manager(folder: Path):
    """A TaskManager that knows only the rendered tasks (indexing lm-eval's thousands of YAMLs takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def count_items(folder: Path, leaves: list[LeafTask]) -> dict[str, int]:
    """Number of evaluation docs per leaf task (loads each dataset once)."""
    loaded = task_manager(folder).load([leaf.name for leaf in leaves])["tasks"]
    return {name: len(list(task.eval_docs)) for name, task in loaded.items()}


def choose_items(counts: Mapping[str, int], leaves: list[LeafTask], config: BenchmarksConfig) -> dict[str, list[int]]:
    """Seeded item indices per leaf task, the same for every model (a string seed hashes stably)."""
    items = {}
    for leaf in leaves:
        total = counts[leaf.name]
        n = getattr(config, leaf.benchmark).n
        rng = random.Random(f"{config.subset_seed}:{leaf.name}")
        items[leaf.name] = list(range(total)) if n is None or n >= total else sorted(rng.sample(range(total), n))
    return items


def score_items(
    model, tokenizer, folder: Path, leaves: list[LeafTask], items: dict[str, list[int]], batch_size: int
) -> dict[str, dict[int, float]]:
    """Per-item scores (doc index -> the benchmark's metric) for every leaf task, through lm_eval."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[leaf.name for leaf in leaves],
        task_manager=task_manager(folder),
        samples=items,
        log_samples=True,
        bootstrap_iters=0,  # standard errors come from the per-item scores (eval/stats.py)
    )
    scores: dict[str, dict[int, float]] = {}
    for leaf in leaves:
        metric = BENCHMARKS[leaf.benchmark].metric
        scores[leaf.name] = {int(s["doc_id"]): float(s[metric]) for s in results["samples"][leaf.name]}
    return scores


def benchmark_estimates(scores: Mapping[str, Mapping[int, float]], leaves: list[LeafTask]) -> dict[str, Estimate]:
    """Each benchmark's score: the item mean, or for MMLU the plain mean over the subjects present."""
    estimates = {}
    for name in BENCHMARKS:
        groups = {leaf.group: list(scores[leaf.name].values()) for leaf in leaves
                  if leaf.benchmark == name and leaf.name in scores}
        if groups:
            estimates[name] = grouped_estimate(groups)
    return estimates


def paired_estimates(
    scores: Mapping[str, Mapping[int, float]], base_scores: Mapping[str, Mapping[int, float]], leaves: list[LeafTask]
) -> dict[str, Estimate]:
    """Each benchmark's paired difference to the base over the same items (MMLU: per subject, then averaged)."""
    estimates = {}
    for name in BENCHMARKS:
        groups = {leaf.group: scores[leaf.name] for leaf in leaves if leaf.benchmark == name and leaf.name in scores}
        base_groups = {leaf.group: base_scores[leaf.name] for leaf in leaves
                       if leaf.benchmark == name and leaf.name in base_scores}
        if groups and base_groups:
            estimates[name] = grouped_paired_difference(groups, base_groups)
    return estimates


def leaderboard_average(estimates: Mapping[str, Estimate]) -> Estimate | None:
    """The 2023 table's Average: equal weight on the four columns, only when all four were run."""
    if any(name not in estimates for name in BENCHMARKS):
        return None
    return combine_equal_weight([estimates[name] for name in BENCHMARKS])
