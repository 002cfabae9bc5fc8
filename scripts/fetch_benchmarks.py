"""Fill a benchmark data folder for offline evaluation (run it on a machine with internet).

    python scripts/fetch_benchmarks.py DIR [--benchmarks arc_challenge,mmlu] [--force]

Writes DIR/<benchmark>/<split>.jsonl (MMLU: DIR/mmlu/<subject>/<split>.jsonl), each row in its hub dataset's
own schema, which is what eval/tasks/*.yaml read when `eval.benchmarks.data_dir` points at DIR. The hub
dataset ids and configs come from those task YAMLs, so the folder always matches what the eval reads
online. Each benchmark folder appears atomically; an existing one is kept unless --force.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from eval.benchmarks import BENCHMARKS, Benchmark, hub_dataset, mmlu_subjects
from pipeline.errors import UserError, error_reason, run_cli
from pipeline.hub import hub_reachable
from pipeline.runs import atomic_output_dir

log = logging.getLogger("fetch_benchmarks")


def fetch_splits(path: str, name: str | None, benchmark: Benchmark, folder: Path) -> None:
    """Download every split the benchmark's task knows and write each as jsonl into `folder`."""
    import datasets

    for split in benchmark.splits:
        try:
            data = datasets.load_dataset(path, name, split=split.name)
        except Exception as err:
            raise UserError(f"cannot download {path} ({name or 'default'}) split {split.name}: "
                            f"{error_reason(err)}") from None
        data.to_json(folder / f"{split.name}.jsonl", lines=True, force_ascii=False)
        log.info("%s/%s.jsonl: %d rows", folder.name, split.name, len(data))


def fetch(benchmark: Benchmark, out: Path, force: bool) -> None:
    target = out / benchmark.name
    if target.exists() and not force:
        log.info("%s exists, keeping it (--force to replace)", target)
        return
    path, name = hub_dataset(benchmark)
    with atomic_output_dir(target, force=force) as tmp:
        if benchmark.name != "mmlu":
            fetch_splits(path, name, benchmark, tmp)
            return
        for subject in mmlu_subjects():
            (tmp / subject).mkdir()
            fetch_splits(path, subject, benchmark, tmp / subject)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to fill (then set eval.benchmarks.data_dir to it)")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--force", action="store_true", help="replace benchmark folders that already exist")
    args = parser.parse_args(argv)

    def body() -> int:
        chosen = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
        unknown = [b for b in chosen if b not in BENCHMARKS]
        if unknown:
            raise UserError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
        if not hub_reachable():
            raise UserError("the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set); run this on a machine "
                            "with internet and copy the folder over")
        args.out.mkdir(parents=True, exist_ok=True)
        for name in chosen:
            fetch(BENCHMARKS[name], args.out, args.force)
        print(f"benchmark data in {args.out}; set eval.benchmarks.data_dir={args.out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[fetch] %(message)s")
    sys.exit(main())
