#!/usr/bin/env bash
# The main job: surgery -> train -> eval for one run config (default: the embedded CPU smoke run).
#   scripts/run_all.sh [CONFIG] [--from STAGE] [--only STAGE] [--num-gpus N] [--seeds 0,1,2] [--set dotted.key=value ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$REPO_ROOT"
CONFIG="configs/smoke.yaml"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then CONFIG="$1"; shift; fi
exec python -m pipeline run "$CONFIG" "$@"
