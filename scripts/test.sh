#!/usr/bin/env bash
# The test suite: bootstraps .venv/ then runs ruff and pytest (CPU, offline). Extra args go to pytest (after ours,
# so `-n 0` runs it in one process).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$REPO_ROOT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
ruff check .
# One worker per core, at most 4 (each worker peaks at a few GB of RAM); a test file stays on one worker, so its
# module fixtures (the end-to-end runs the tests then read) are built once. Two workers: 7.8 min on 2 cores, 14 serial.
WORKERS=$(( $(nproc) < 4 ? $(nproc) : 4 ))
python -m pytest -n "$WORKERS" --dist loadfile "$@"
