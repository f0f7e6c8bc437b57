#!/usr/bin/env bash
# Install (if needed) and run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh dev
.venv/bin/python -m pytest -q "$@"
