"""HF export of any compact model: the stock class when one fits, else a remote-code folder.

Layers of different shapes (a sub-layer removed from some layers, per-layer widths, residual
selections) have no stock transformers class, so the folder ships `configuration_drprune.py` and
`modeling_drprune.py` (torch + transformers only) and names them in config.json's `auto_map`; it
loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from drprune.convert.checkpoint import (atomic_output, copy_tokenizer, write_hf_folder,
                                        write_safetensors_shards)
from drprune.convert.hf import remote_config_dict, stock_class_fits
from drprune.models.config import ModelConfig

log = logging.getLogger(__name__)

REMOTE_CODE_FILES = ("configuration_drprune.py", "modeling_drprune.py")
AUTO_MAP = {"AutoConfig": "configuration_drprune.DrpruneConfig",
            "AutoModelForCausalLM": "modeling_drprune.DrpruneForCausalLM"}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json of the remote-code folder."""
    return {**remote_config_dict(cfg), "auto_map": AUTO_MAP}


def export_hf(
    cfg: ModelConfig,
    tensors: dict[str, Tensor],
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    config_overrides: dict[str, Any] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    release: Callable[[Tensor], None] | None = None,
) -> Path:
    """Write `tensors` (decoder names, `transformer.*`) as a HF folder; returns the folder."""
    if stock_class_fits(cfg):
        return write_hf_folder(cfg, tensors, out_dir, tokenizer_dir=tokenizer_dir, config_overrides=config_overrides,
                               max_shard_bytes=max_shard_bytes, overwrite=overwrite, release=release)
    config = {**hf_config(cfg), **(config_overrides or {})}
    with atomic_output(out_dir, overwrite) as tmp:
        tmp.mkdir()
        write_safetensors_shards(iter(tensors.items()), tmp, max_shard_bytes, release)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in REMOTE_CODE_FILES:
            shutil.copy2(Path(__file__).with_name(name), tmp / name)
        copy_tokenizer(tokenizer_dir, tmp)
    log.info("wrote HF folder %s with remote code (layers differ in shape): load it with trust_remote_code=True",
             out_dir)
    return Path(out_dir)
