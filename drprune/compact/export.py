"""HF export of any compact model: the stock class when one fits, else a remote-code folder.

Layers of different shapes (a sub-layer removed from some layers, per-layer widths, residual
selections) have no stock transformers class, so the folder ships `configuration_drprune.py` and
`modeling_drprune.py` (torch + transformers only) and names them in config.json's `auto_map`; it
loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from drprune.errors import UserError
from drprune.dtypes import DTYPES
from drprune.models.config import ModelConfig, with_context_length
from drprune.convert.checkpoint import (config_of_state, decoder_state, load_model_state,
                                        mapped_releaser, write_hf_folder)
from drprune.convert.hf import hf_config_dict, remote_config_dict, stock_class_fits
from drprune.convert.model_card import ModelCard, card_of_state

log = logging.getLogger(__name__)

REMOTE_CODE_FILES = ("configuration_drprune.py", "modeling_drprune.py")
AUTO_MAP = {"AutoConfig": "configuration_drprune.DrpruneConfig",
            "AutoModelForCausalLM": "modeling_drprune.DrpruneForCausalLM"}


def hf_config(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """config.json of the remote-code folder, its tensors in `dtype` (default: the source's)."""
    return {**remote_config_dict(cfg, dtype), "auto_map": AUTO_MAP}


def runs_only_drprune_code(folder: Path) -> bool:
    """Whether loading `folder` with trust_remote_code can run nothing but this drprune's own modeling files:
    config.json's auto_map is ours, no tokenizer code is named, and every .py file is byte for byte ours.
    `model_type: drprune` alone proves nothing: anyone can write it beside their own code."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        tok_file = folder / "tokenizer_config.json"
        tok_config = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("auto_map") != AUTO_MAP or "auto_map" in tok_config:
        return False
    if sorted(p.name for p in folder.rglob("*.py")) != sorted(REMOTE_CODE_FILES):
        return False
    return all((folder / n).read_bytes() == Path(__file__).with_name(n).read_bytes() for n in REMOTE_CODE_FILES)


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
    remote_code: bool = False,
    card: ModelCard | None = None,
    dtype: str | None = None,
) -> Path:
    """Write `tensors` (decoder names, `transformer.*`) as a HF folder with its README.md from `card`, floating
    tensors in `dtype` (default: the dtype the source came in); returns the folder.

    `remote_code=True` ships the remote-code model even when a stock class fits (to compare the two).
    """
    remote = None
    if remote_code or not stock_class_fits(cfg):
        remote = (hf_config(cfg, dtype), [Path(__file__).with_name(name) for name in REMOTE_CODE_FILES])
    return write_hf_folder(cfg, tensors, out_dir, tokenizer_dir=tokenizer_dir, config_overrides=config_overrides,
                           max_shard_bytes=max_shard_bytes, overwrite=overwrite, release=release, card=card,
                           remote_code=remote, dtype=dtype)


def export_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    config_overrides: dict[str, Any] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    base_model: str | None = None,
    trust_pickle: bool = False,
    dtype: str | None = None,
    context_length: int | None = None,
) -> Path:
    """A compact Composer checkpoint as a HF folder, its card from the checkpoint (`drprune compact`
    stores one) and from `base_model` (the source's hub id or HF folder: its license).

    Tensors are written in `dtype` (default: the dtype the source came in); config.json says the model's
    context length (the source's max_position_embeddings) unless `context_length` overrides it. The
    overrides `max_position_embeddings=N` and `torch_dtype=D` are those two settings by their HF names.
    """
    overrides = dict(config_overrides or {})
    context_length = _named_twice(overrides, "max_position_embeddings", context_length, "--context-length")
    dtype = _named_twice(overrides, "torch_dtype", dtype, "--dtype")
    if context_length is not None and (isinstance(context_length, bool) or not isinstance(context_length, int)
                                       or context_length < 1):
        raise UserError(f"context length {context_length!r} must be a positive integer (the model's "
                        "max_position_embeddings, e.g. 8192)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    state = load_model_state(ckpt, trust_pickle)
    if any(k.startswith("mask_generator.") for k in state):
        raise UserError(
            f"{ckpt} is a pruning checkpoint with masks: run `drprune compact {ckpt}` first and convert its output"
        )
    cfg = config_of_state(state)
    if context_length is not None and context_length != cfg.context_length:
        log.info("context length %d (the checkpoint's is %d) by request", context_length, cfg.context_length)
        cfg = with_context_length(cfg, context_length)
    derived = hf_config_dict(cfg, dtype) if stock_class_fits(cfg) else hf_config(cfg, dtype)
    conflicts = {k: (v, derived[k]) for k, v in overrides.items() if k in derived and derived[k] != v}
    if conflicts:
        raise UserError(
            "overrides contradict the checkpoint's shape (drop them; the shape is read from the "
            f"checkpoint): {', '.join(f'{k}={v!r} but checkpoint has {d!r}' for k, (v, d) in conflicts.items())}"
        )
    card = card_of_state(state) or ModelCard(source=str(ckpt))
    if base_model is not None:
        card = card.with_source_facts(base_model)
    return export_hf(cfg, decoder_state(state), out_dir, tokenizer_dir=tokenizer_dir, config_overrides=overrides,
                     max_shard_bytes=max_shard_bytes, overwrite=overwrite, release=mapped_releaser(state), card=card,
                     dtype=dtype)


def _named_twice(overrides: dict[str, Any], key: str, value: Any, flag: str) -> Any:
    """`value`, or the config.json override `key` that names the same setting (popped); both given must agree."""
    if key not in overrides:
        return value
    named = overrides.pop(key)
    if value is not None and value != named:
        raise UserError(f"the override {key}={named!r} and {flag} {value} disagree: give one of them")
    return named
