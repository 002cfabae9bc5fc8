#!/usr/bin/env bash
# The test suite: bootstraps .venv/ then runs ruff and pytest (CPU, offline). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$REPO_ROOT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
ruff check .
python -m pytest "$@"
