#!/usr/bin/env bash
# Sets up everything rlnf needs on a fresh machine, idempotently (sourced by test.sh and demo.sh):
#   - Debian packages for offline speech synthesis (flite, espeak-ng, sox) when running as root;
#   - a virtual environment in .venv with the CPU build of torch and the pinned stack (constraints.txt).
# Re-running is fast: the pip step is skipped while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${RLNF_VENV:-$ROOT/.venv}"

missing=()
for tool in flite espeak-ng sox; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing ${missing[*]} with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq flite espeak-ng sox >/dev/null
  else
    echo "[setup] WARNING: ${missing[*]} not found and not root: install them with" >&2
    echo "[setup]   sudo apt-get install flite espeak-ng sox" >&2
    echo "[setup] (needed for speech synthesis in the demo and tests)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.rlnf-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing Python packages (CPU torch first, then the pinned stack; a few minutes on a fresh machine)"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # The CPU build of torch first, so that nothing pulls a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==$(grep -E '^torch==' constraints.txt | cut -d= -f3)" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import rlnf, torch, nemo, transformers" || { echo "[setup] installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
