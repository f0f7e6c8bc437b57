"""Checks of a run config's top-level keys and plain values, made before anything is built.

A misspelt top-level key (`max_duraton`) would otherwise be ignored and the run would silently use
the default; values that Composer parses late (`max_duration=abc`, `precision=fp13`, a batch size
of 0) would fail with a traceback after the model and data are built. Both are ConfigErrors here,
naming the key and the fix.
"""
from __future__ import annotations

import difflib
import zipfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from drprune.errors import ConfigError, UserError

# Every top-level key a run config may hold (`base:` is consumed when the file is read).
DRPRUNE_KEYS = ("model", "data_local", "max_seq_len", "tokenizer", "data_verify_hashes", "train_loader",
                "eval_loader", "callbacks", "loggers", "optimizer", "scheduler", "algorithms", "distillation",
                "trust_pickle", "allow_config_change", "global_train_batch_size", "device_eval_batch_size")
# Passed through to Composer's Trainer by drprune.train.build_trainer.
COMPOSER_KEYS = ("run_name", "seed", "max_duration", "eval_interval", "eval_subset_num_batches", "progress_bar",
                 "log_to_console", "console_log_interval", "precision", "device_train_microbatch_size",
                 "fsdp_config", "save_folder", "save_interval", "save_num_checkpoints_to_keep", "save_overwrite",
                 "load_path", "autoresume", "python_log_level", "dist_timeout")
TOP_LEVEL_KEYS = frozenset(DRPRUNE_KEYS + COMPOSER_KEYS)
DURATION_KEYS = ("max_duration", "eval_interval", "save_interval", "console_log_interval")


def check_top_level_keys(cfg: DictConfig) -> None:
    """Refuse an unknown top-level key, naming the nearest valid one."""
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL_KEYS)
    if not unknown:
        return
    key = unknown[0]
    near = difflib.get_close_matches(key, sorted(TOP_LEVEL_KEYS), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(sorted(TOP_LEVEL_KEYS))}"
    raise ConfigError(f"unknown top-level config key {key!r} (it would be ignored): {hint} Fix or remove it")


def _duration(key: str, value: Any) -> None:
    from composer.core import Time

    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return
    try:
        ok = isinstance(value, str) and Time.from_timestring(value).value > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{key}={value!r} is not a positive duration: use e.g. 20ba (batches), 1ep (epochs) "
                          "or 100000tok (tokens)")


def _int(key: str, value: Any, low: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}{extra}")


def check_run_values(cfg: DictConfig) -> None:
    """Durations, batch sizes, seed, precision, loader workers and load_path, before any heavy work."""
    from composer.core import Precision

    for key in DURATION_KEYS:
        if cfg.get(key) is not None:
            _duration(key, cfg.get(key))
    for key in ("global_train_batch_size", "device_eval_batch_size"):
        if cfg.get(key) is not None:
            _int(key, cfg.get(key), 1, " (a positive batch size)")
    micro = cfg.get("device_train_microbatch_size")
    if micro is not None and micro != "auto":
        _int("device_train_microbatch_size", micro, 1, " or auto")
    _int("seed", cfg.get("seed", 17), 0)
    for loader in ("train_loader", "eval_loader"):
        node = cfg.get(loader) or {}
        _int(f"{loader}.num_workers", node.get("num_workers", 0), 0, " (0: load in the main process)")
    precisions = [p.value for p in Precision]
    if cfg.get("precision", "fp32") not in precisions:
        raise ConfigError(f"precision={cfg.get('precision')!r} is unknown; use one of {', '.join(precisions)} "
                          "(amp_bf16 on a GPU; a CPU runs fp32)")
    _check_load_path(cfg.get("load_path"))


def _check_load_path(load_path: Any) -> None:
    """A local load_path must be a complete checkpoint (torch.save writes a zip archive, its directory last)."""
    if load_path is None or "://" in str(load_path):
        return
    path = Path(str(load_path))
    if not path.is_file():
        raise UserError(f"load_path={path} does not exist (or is not a file): give a checkpoint written by a run, "
                        "e.g. save_folder/latest-rank0.pt, or drop load_path")
    if not zipfile.is_zipfile(path):
        raise UserError(f"load_path={path} is not a complete checkpoint (truncated, or another kind of file): "
                        "give another checkpoint of the run")


def check_model_fits_data(cfg: DictConfig, model_max_seq_len: int) -> None:
    """The model must take sequences as long as the data's (its positions stop at model.max_seq_len)."""
    data_len = cfg.get("max_seq_len")
    if isinstance(data_len, int) and model_max_seq_len < data_len:
        raise ConfigError(f"model.max_seq_len={model_max_seq_len} is shorter than the data's max_seq_len={data_len}: "
                          f"set model.max_seq_len={data_len} (or use shorter sequences)")
