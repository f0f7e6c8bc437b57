#!/usr/bin/env bash
# Prune, then compact (the seed's prune.sh + post_pruning_processing): the pruning run writes full
# weights + masks; `drprune compact` folds the masks into SAVE_DIR/pruned-latest-rank0.pt.
# Usage: scripts/prune.sh DATA_DIR SET_NAMES SAVE_DIR [key=value ...]
#   e.g. scripts/prune.sh data/mds '[a,b]' runs/tiny max_duration=20ba       (CPU, tiny config)
# Env: CONFIG (default configs/tiny/prune.yaml), NPROC (processes, default 1), PYTHON; FSDP_VERSION=2
# for a config with fsdp_config on CPU. latest-rank0.pt is the last checkpoint: a file, or with
# fsdp_config.state_dict_type: sharded (configs/base) a link to its folder; compact reads either.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then sed -n 2,9p "$0"; exit 2; fi
data_dir=$1 set_names=$2 save_dir=$3
shift 3
config=${CONFIG:-configs/tiny/prune.yaml}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nproc=${NPROC:-1}
args=("$config" "data_local=$data_dir" "callbacks.data_loading.set_names=$set_names" "save_folder=$save_dir" "$@")
if [ "$nproc" -gt 1 ]; then
  "$(dirname "$python")/composer" -n "$nproc" drprune/train.py "${args[@]}"
else
  "$python" -m drprune.train "${args[@]}"
fi
"$python" -m drprune.cli compact "$save_dir/latest-rank0.pt" --out "$save_dir/pruned-latest-rank0.pt"
echo "compact model: $save_dir/pruned-latest-rank0.pt (continue with scripts/continue_pretrain.sh)"
