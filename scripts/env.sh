# Sourced by demo.sh and test.sh: create .venv (once) and install graphopt with an extra.
# Usage: . scripts/env.sh EXTRA
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRAPHOPT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned, so that no other requirement can pull a different (CUDA) build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[$1]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
