"""The finished runs a comparison reads: their folders, checked and loaded, grouped into arms by seed.

A comparison reads only what the stages left on disk (the eval report, the train manifest and log history), so it
never imports a stage's internals and works on run folders copied off a GPU box. A run still in progress, stale for
its config or never evaluated is refused with one line naming the stage; so is a set of runs whose benchmark items
or training data differ, since every difference the comparison reports is paired on identical items or documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, load_config
from pipeline.errors import UserError
from pipeline.orchestrate import stage_state
from pipeline.runs import MANIFEST, STAGE_ORDER, TMP_MARK, read_manifest
from pipeline.seeds import arm_name, seed_configs


@dataclass(frozen=True)
class RunRecord:
    """One finished run folder as the comparison sees it."""

    folder: Path
    report: dict[str, Any]  # <run>/eval/report.json
    train_manifest: dict[str, Any]
    history: list[dict]  # <run>/train/log_history.json

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def arm(self) -> str:
        """The runs of one config repeated with other seeds share it (pipeline/seeds.py names their folders)."""
        return arm_name(self.folder.name)

    @property
    def seed(self) -> int | None:
        return self.report.get("seed")

    @property
    def base(self) -> dict:
        return self.report["models"][0]

    @property
    def control(self) -> bool:
        """The train stage trained the base itself: a control run."""
        trained = self.train_manifest.get("model")
        return trained is not None and (trained == self.base["path"]
                                        or Path(trained).resolve() == Path(self.base["path"]).resolve())

    @property
    def labels(self) -> list[str]:
        return [model["label"] for model in self.report["models"]]

    @property
    def tokens_seen(self) -> int | None:
        seen = [e["tokens_seen"] for e in self.history if isinstance(e.get("tokens_seen"), (int, float))]
        return int(max(seen)) if seen else None

    @property
    def data_slice(self) -> str | None:
        return (self.train_manifest.get("data") or {}).get("key")


def _degenerate_report(folder: Path) -> bool:
    """An eval that finished by judging a model DEGENERATE: its report is written, its manifest deliberately not."""
    path = folder / "eval" / "report.json"
    try:
        return path.is_file() and json.loads(path.read_text()).get("exit_code", 0) != 0
    except json.JSONDecodeError:
        return False


def _refuse(folder: Path, stage: str, state: str) -> UserError:
    if state == "missing":
        return UserError(f"{folder}: {stage} has not run yet; finish the run (scripts/run_all.sh CONFIG) before "
                         "comparing it")
    if state == "stale":
        return UserError(f"{folder}: {stage} is stale for this config (the config changed since it ran); rerun "
                         "scripts/run_all.sh CONFIG, or pass the run folder itself to compare it as it is")
    return UserError(f"{folder}: {stage} is still in progress (or was interrupted: no finished {MANIFEST}); compare "
                     "reads finished runs only, so wait for it or rerun scripts/run_all.sh CONFIG")


def check_finished(folder: Path, config: RunConfig | None) -> None:
    """Refuse, naming the stage, a run that is not finished (for a config: not complete for that config)."""
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; run it first (scripts/run_all.sh CONFIG)")
    for stage in STAGE_ORDER:
        stage_dir = folder / stage
        if config is not None:
            state = stage_state(config, stage)
        elif list(folder.glob(f"{stage}{TMP_MARK}*")) or (stage_dir.exists() and read_manifest(stage_dir) is None):
            state = "partial"
        else:
            # Without the config a run with no surgery folder is one that had no surgery (a control, or a seed that
            # trained another folder's widened model).
            state = "complete" if stage_dir.exists() or stage == "surgery" else "missing"
        if state in ("complete", "skipped") or (stage == "eval" and _degenerate_report(folder)):
            continue
        raise _refuse(folder, stage, state)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}); the {what} is damaged: rerun that stage") from None


def load_run(folder: Path, config: RunConfig | None = None) -> RunRecord:
    check_finished(folder, config)
    report = _read_json(folder / "eval" / "report.json", "eval report")
    manifest = read_manifest(folder / "train") or {}
    history_path = folder / "train" / "log_history.json"
    history = _read_json(history_path, "train log history") if history_path.is_file() else []
    return RunRecord(folder, report, manifest, history if isinstance(history, list) else [])


def resolve_inputs(inputs: list[str], overrides: list[str], seeds: list[int] | None) -> list[RunRecord]:
    """Run folders as given; a config file stands for its run folder, or with `seeds` for each seed's folder."""
    if seeds is not None and not any(Path(item).is_file() for item in inputs):
        raise UserError("--seeds expands config files into their seed folders; with run folders, list the folders")
    found: list[tuple[Path, RunConfig | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            configs = ([config for _, config in seed_configs(item, overrides, seeds)] if seeds is not None
                       else [load_config(item, overrides)])
            found += [(config.run_dir, config) for config in configs]
        elif path.is_dir():
            found.append((path, None))
        else:
            raise UserError(f"{item} is neither a run folder nor a config file; pass run folders (runs/NAME) or the "
                            "configs they were run with")
    runs: list[RunRecord] = []
    for folder, config in found:
        if any(run.folder.resolve() == folder.resolve() for run in runs):
            continue
        if any(run.name == folder.name for run in runs):
            raise UserError(f"two runs are named {folder.name}; runs are told apart by their folder names, rename one")
        runs.append(load_run(folder, config))
    return runs


def choose_reference(runs: list[RunRecord], name: str | None) -> str:
    """The reference arm: the one named (an arm or one of its runs), else the first control, else the first run's."""
    if name is not None:
        for run in runs:
            if name in (run.name, run.arm):
                return run.arm
        known = ", ".join(dict.fromkeys(run.arm for run in runs))
        raise UserError(f"--reference {name}: no such run among the inputs ({known}); name one of them")
    controls = [run.arm for run in runs if run.control]
    return controls[0] if controls else runs[0].arm


def arms_of(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by arm, in input order, each arm's runs in seed order."""
    arms: dict[str, list[RunRecord]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    return {arm: sorted(members, key=lambda r: (r.seed is None, r.seed)) for arm, members in arms.items()}


def seed_pairs(arm: list[RunRecord], reference: list[RunRecord]) -> list[tuple[RunRecord, RunRecord]]:
    """(run, reference run) of equal seeds; with no seed in common, the runs in seed order."""
    by_seed = {run.seed: run for run in reference}
    pairs = [(run, by_seed[run.seed]) for run in arm if run.seed in by_seed]
    return pairs or list(zip(arm, reference, strict=False))


def compared_arms(arms: dict[str, list[RunRecord]],
                  reference: str) -> Iterator[tuple[str, list[tuple[RunRecord, RunRecord]]]]:
    """Every arm but the reference, with its runs paired seed by seed with the reference arm's (seed_pairs)."""
    for arm, runs in arms.items():
        if arm != reference:
            yield arm, seed_pairs(runs, arms[reference])


def check_comparable(runs: list[RunRecord], reference: RunRecord) -> None:
    """Refuse runs whose benchmark items, benchmark settings or training slice differ from the reference's."""
    ref_bench = reference.report.get("benchmarks")
    for run in runs:
        bench = run.report.get("benchmarks")
        if (bench is None) != (ref_bench is None):
            ran, did_not = (run, reference) if ref_bench is None else (reference, run)
            raise UserError(f"{ran.folder} ran the benchmarks and {did_not.folder} did not; paired differences need "
                            "both on the same items: run eval with the same eval.benchmarks settings")
        if bench is not None and ref_bench is not None:
            if bench["items"] != ref_bench["items"]:
                leaf = next(k for k in {*bench["items"], *ref_bench["items"]}
                            if bench["items"].get(k) != ref_bench["items"].get(k))
                raise UserError(
                    f"{run.folder} and {reference.folder} were scored on different benchmark items ({leaf}: "
                    f"{len(bench['items'].get(leaf, []))} vs {len(ref_bench['items'].get(leaf, []))} items, or other "
                    "ones); paired differences need identical items: evaluate both with the same eval.benchmarks "
                    "settings (n, subset_seed, data_dir)")
            if bench["settings"] != ref_bench["settings"] or bench["source"] != ref_bench["source"]:
                raise UserError(f"{run.folder} and {reference.folder} ran the benchmarks with other settings (few-shot "
                                "counts or data source); evaluate both with the same eval.benchmarks settings")
        if run.data_slice != reference.data_slice:
            raise UserError(f"{run.folder} and {reference.folder} trained on different data slices (keys "
                            f"{run.data_slice} vs {reference.data_slice}); a comparison at equal tokens needs the same "
                            "train.data and train.seq_len, so every run sees the same tokens and held-out documents")
