#!/usr/bin/env bash
# Create .venv (if missing) and install drprune with the tested stack: pyproject.toml's ranges, held to
# the exact versions of constraints.txt. Usage: scripts/setup_venv.sh [EXTRAS]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python_bin="$(command -v python3.11 || command -v python3)"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
