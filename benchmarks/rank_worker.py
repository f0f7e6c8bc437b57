"""What the memory benchmarks share: a small run config, every case measured in fresh processes (one per
rank under `composer -n N`), and the /proc numbers each process reads about itself.

A benchmark script is both the driver and the worker: the driver calls `run_ranks`, which starts the same
script with `--case NAME --work DIR --json FILE`; the worker measures in its own process and hands its
numbers back with `write_rank_result`. Fresh processes keep one case's heap out of the next one's peak.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_config(run_name: str, *, seq_len: int, steps: int, global_batch: int, microbatch: int,
               mask_generator: dict[str, Any], lr: float, precision: str = "fp32") -> dict[str, Any]:
    """A pruning run of `steps` batches on the synthetic two-domain data ('a', 'b'); `data_local` and
    `model.path` are left for the overrides."""
    return {
        "run_name": run_name, "seed": 17, "data_local": "???", "max_seq_len": seq_len,
        "model": {"mask_generator": mask_generator},
        "train_loader": {"num_workers": 0, "drop_last": True, "dataset": {"split": "train", "shuffle": True}},
        "optimizer": {"name": "decoupled_adamw", "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                      "lag_lr": 0.1},
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "0ba"},
        "algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}},
        "max_duration": f"{steps}ba", "global_train_batch_size": global_batch,
        "device_train_microbatch_size": microbatch, "precision": precision, "progress_bar": False,
        "log_to_console": False,
        "callbacks": {"data_loading": {"dynamic": True, "set_names": ["a", "b"], "update_type": "constant"}},
    }


def proc_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def run_ranks(script: str, case: str, work: Path, ranks: int, mmap_threshold: int) -> list[dict[str, Any]]:
    """Measure `case` in fresh processes: `ranks` of them under `composer -n` (FSDP2, the 2 cores split
    between them), else one plain interpreter; every rank's result, in rank order.

    glibc serves blocks of `mmap_threshold` bytes or more from their own mappings and MKL keeps no cache,
    so a freed tensor goes back to the kernel and a resident peak is the live peak."""
    out = work / f"{case}.json"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(mmap_threshold), "MKL_DISABLE_FAST_MM": "1",
           "OMP_NUM_THREADS": str(max(1, 2 // ranks)), "FSDP_VERSION": "2"}
    launcher = [str(Path(sys.executable).parent / "composer"), "-n", str(ranks), "--stdout", f"{out}-out{{rank}}",
                "--stderr", f"{out}-err{{rank}}"] if ranks > 1 else [sys.executable]
    subprocess.run([*launcher, script, "--case", case, "--work", str(work), "--json", str(out)], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    return [json.loads(out.with_suffix(f".rank{r}").read_text()) for r in range(ranks)]


def write_rank_result(json_path: Path, result: dict[str, Any]) -> None:
    """The worker side of `run_ranks`: this rank's numbers, where the driver reads them."""
    json_path.with_suffix(f".rank{os.environ.get('RANK', '0')}").write_text(json.dumps(result))
