#!/usr/bin/env bash
# The main job: `frankenllama doctor` first (stops on a failed check), then surgery -> train -> eval for one run
# config (default: the embedded CPU smoke run), or for each of several seeds.
#   scripts/run_all.sh [CONFIG] [--from STAGE] [--only STAGE] [--num-gpus N] [--seeds 0,1,2] [--set dotted.key=value ...]
#                      [--skip-doctor]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$REPO_ROOT"
CONFIG="configs/smoke.yaml"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then CONFIG="$1"; shift; fi
ARGS=()
DOCTOR=1
for arg in "$@"; do
  if [ "$arg" = "--skip-doctor" ]; then DOCTOR=0; else ARGS+=("$arg"); fi
done
if [ "$DOCTOR" = 1 ] && ! python -m pipeline doctor "$CONFIG" ${ARGS[@]+"${ARGS[@]}"}; then
  echo "[frankenllama] doctor: a check failed (above); fix it and rerun, or pass --skip-doctor to run anyway" >&2
  exit 1
fi
exec python -m pipeline run "$CONFIG" ${ARGS[@]+"${ARGS[@]}"}
