#!/usr/bin/env bash
# Continued pretraining of a compact model (the seed's continue_pretrain.sh), then HF export:
# the same train.py with a config without masks; the shape is read from the compact checkpoint.
# Usage: scripts/continue_pretrain.sh COMPACT_CKPT DATA_DIR SET_NAMES SAVE_DIR [key=value ...]
#   e.g. scripts/continue_pretrain.sh runs/tiny/pruned-latest-rank0.pt data/mds '[a,b]' runs/tiny-cont
# Env: CONFIG (default configs/tiny/continue_pretrain.yaml), NPROC (default 1), PYTHON, TOKENIZER (folder).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 4 ]; then sed -n 2,7p "$0"; exit 2; fi
ckpt=$1 data_dir=$2 set_names=$3 save_dir=$4
shift 4
config=${CONFIG:-configs/tiny/continue_pretrain.yaml}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nproc=${NPROC:-1}
args=("$config" "model.path=$ckpt" "data_local=$data_dir" "callbacks.data_loading.set_names=$set_names"
      "save_folder=$save_dir" "$@")
if [ "$nproc" -gt 1 ]; then
  "$(dirname "$python")/composer" -n "$nproc" drprune/train.py "${args[@]}"
else
  "$python" -m drprune.train "${args[@]}"
fi
"$python" -m drprune.cli convert composer-to-hf "$save_dir/latest-rank0.pt" "$save_dir/hf" \
  ${TOKENIZER:+--tokenizer "$TOKENIZER"}
echo "HF model: $save_dir/hf"
