"""What the eval stage measures, as plain data: one model's results, and the benchmark plan all models share.

Their own module so that the stage (which fills them) and the report (which renders them) both import them
from here instead of from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.benchmarks import LeafTask
from eval.models import ModelEntry
from eval.perplexity import Perplexity
from eval.placement import Place
from eval.probe import ProbeResult
from pipeline.logits import LogitAgreement


@dataclass
class ModelResults:
    """Everything measured on one model; absent parts carry the reason they were skipped."""

    entry: ModelEntry
    dtype: str  # what it was scored in (the run's precision)
    stored_dtype: str  # what its checkpoint holds
    probe: ProbeResult
    placement: dict[str, Place] = field(default_factory=dict)  # where the scoring load's weights went
    perplexity: Perplexity | None = None
    preservation: LogitAgreement | None = None
    benchmark_scores: dict[str, dict[int, float]] | None = None
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class BenchmarkRun:
    """The benchmark plan shared by all models: leaf tasks, chosen items, where the task files are."""

    leaves: list[LeafTask]
    skipped: dict[str, str]
    items: dict[str, list[int]]
    task_dir: Path
    source: str
