"""A run repeated with other seeds: which folder each seed's run lives in, and what it overrides.

The seed a config names keeps the config's own `run_dir`, so a run made before `--seeds` was asked for counts as
that seed; every other seed N runs in `<run_dir>-seed<N>` with `seed=N`. The run seed changes the LoRA
initialisation, dropout and the order the blocks are drawn in; `train.data.seed` stays, so every seed trains on the
same tokens and is scored on the same held-out documents. A run that widens its base builds the widened model once,
in the config's own folder, and the other seeds train that one (`train.model`): surgery does not depend on the run
seed, and at the 22b shape each copy would cost 44 GB.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.config import RunConfig, load_config
from pipeline.errors import UserError

SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; a malformed or repeated seed is a one-line error."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, for example --seeds 0,1,2") from None
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct non-negative integers, for example --seeds 0,1,2")
    return seeds


def seed_run_dir(config: RunConfig, seed: int) -> Path:
    """The config's run_dir for its own seed, `<run_dir>-seed<N>` for another."""
    if seed == config.seed:
        return config.run_dir
    return config.run_dir.with_name(f"{config.run_dir.name}-seed{seed}")


def shares_surgery(config: RunConfig) -> bool:
    """True when the other seeds train the widened model built in the config's own folder."""
    return config.surgery is not None and not config.is_control and config.train.model is None


def seed_overrides(config: RunConfig, seed: int) -> list[str]:
    """The `--set` assignments that turn the config's run into the run of `seed` (none for the config's own)."""
    if seed == config.seed:
        return []
    # JSON text is YAML, so a folder named like a number or `on` stays a string.
    overrides = [f"seed={seed}", f"run_dir={json.dumps(str(seed_run_dir(config, seed)))}"]
    if shares_surgery(config):
        overrides.append(f"train.model={json.dumps(str(config.stage_dir('surgery')))}")
    return overrides


def arm_name(run_name: str) -> str:
    """The name shared by a run and its repeats with other seeds: the folder name without `-seed<N>`."""
    return SEED_SUFFIX.sub("", run_name)


def seed_configs(config_path: str, overrides: list[str], seeds: list[int]) -> list[tuple[int, RunConfig]]:
    """Each seed with the config its run uses (the file, `overrides`, then the seed's own assignments)."""
    config = load_config(config_path, overrides)
    return [(seed, load_config(config_path, [*overrides, *seed_overrides(config, seed)])) for seed in seeds]


def run_seeds(config_path: str, overrides: list[str], seeds: list[int], start: str | None, only: str | None,
              force: bool) -> int:
    """The pipeline once per seed, the config's own seed first (its widened model is the one the others train)."""
    from pipeline.orchestrate import run_pipeline

    config = load_config(config_path, overrides)
    trains = only == "train" or (only is None and start != "eval")
    if trains and shares_surgery(config) and config.seed not in seeds:
        print(f"[frankenllama] seeds: every seed trains the widened model of {config.stage_dir('surgery')}; "
              "building it first if needed", flush=True)
        code = run_pipeline(config_path, overrides, None, "surgery", False)
        if code:
            return code
    ordered = sorted(seeds, key=lambda seed: seed != config.seed)
    for number, seed in enumerate(ordered, 1):
        print(f"[frankenllama] seed {seed} ({number} of {len(ordered)}): {seed_run_dir(config, seed)}", flush=True)
        code = run_pipeline(config_path, [*overrides, *seed_overrides(config, seed)], start, only, force)
        if code:
            return code
    listed = ",".join(map(str, seeds))
    print(f"[frankenllama] compare the seeds with: frankenllama compare {config_path} --seeds {listed} "
          f"--out {config.run_dir.with_name(config.run_dir.name + '-compare')}")
    return 0


def print_seed_status(config_path: str, overrides: list[str], seeds: list[int]) -> None:
    from pipeline.orchestrate import print_status

    for seed, config in seed_configs(config_path, overrides, seeds):
        print(f"== seed {seed}: {config.run_dir}")
        print_status(config)
