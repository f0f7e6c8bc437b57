#!/usr/bin/env bash
# A non-editable install works from outside the checkout: build the wheel, install it (without
# dependencies: .venv has them) into a temp folder that shadows the editable install, then run the
# CLI and load a shipped config from /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip wheel --quiet --no-deps . -w "$work/wheel" 2>/dev/null
.venv/bin/python -m pip install --quiet --no-deps --target "$work/site" "$work"/wheel/*.whl 2>/dev/null
cd "$work"
PYTHONPATH="$work/site" "$repo/.venv/bin/python" - <<'PY'
import subprocess, sys
from pathlib import Path

import drprune
from drprune.train import load_config

assert Path(drprune.__file__).is_relative_to(Path.cwd()), f"imported the checkout: {drprune.__file__}"
cfg = load_config("configs/tiny/prune.yaml", ["data_local=/nowhere"])
assert cfg.model.d_model > 0
subprocess.run([sys.executable, "-m", "drprune.cli", "demo", "--help"], check=True, stdout=subprocess.DEVNULL)
print(f"non-editable install OK: {drprune.__file__}")
PY
