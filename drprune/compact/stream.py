"""`drprune compact` on a checkpoint: masks folded tensor by tensor, through `fold_state`.

A checkpoint file is memory-mapped and each source tensor's pages are given back once its compact tensor
exists, so peak memory is about one copy of the output model plus the tensor in flight, never the
whole input (a pruning checkpoint also holds optimizer state, which is never read). A sharded
checkpoint folder is assembled in memory from its shards, model state only (`convert.sharded`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor

from drprune.compact.fold import fold_state, plan_compaction
from drprune.convert.checkpoint import (config_of_state, decoder_keys, decoder_state, load_model_state,
                                        mapped_releaser, save_checkpoint)
from drprune.convert.hf import check_state_keys
from drprune.convert.sharded import looks_sharded
from drprune.convert.model_card import CARD_KEY, ModelCard
from drprune.errors import UserError
from drprune.masks import mask_generator_from_state
from drprune.models.shapes import config_params
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.progress import track

log = logging.getLogger(__name__)


def default_output(ckpt: Path) -> Path:
    """`pruned-<name>` beside the input, as the seed's prune_and_save_model wrote it (a file: `.pt` added to
    the name of a sharded checkpoint folder)."""
    suffix = ".pt" if looks_sharded(ckpt) and ckpt.suffix != ".pt" else ""
    return ckpt.with_name(f"pruned-{ckpt.name}{suffix}")


def compact_checkpoint(ckpt: str | Path, out: str | Path, overwrite: bool = False,
                       trust_pickle: bool = False) -> ModelConfig:
    """Fold a pruning checkpoint's deterministic target-size masks into a compact checkpoint at `out`."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists: remove it, choose another --out, or pass --overwrite")
    state = load_model_state(ckpt, trust_pickle)
    cfg = config_of_state(state)
    masks = mask_generator_from_state(cfg, state).hard_masks()
    plan = plan_compaction(cfg, masks)
    source = decoder_state(state)
    check_state_keys(decoder_keys(cfg), set(source), str(ckpt), "is the checkpoint from a different model config?")

    release = mapped_releaser(state)
    read: list[Tensor] = []

    def get(key: str) -> Tensor:
        read.append(source[key])
        return source[key]

    compact: dict[str, object] = {}
    for key, tensor in track(fold_state(plan, get), f"compact {ckpt.name}", total=len(decoder_keys(plan.target)),
                             unit="tensors"):
        compact[f"model.{key}"] = tensor
        for t in read:
            release(t)
        read.clear()
    compact["model._extra_state"] = {**PrunableDecoder.extra_state_for(plan.target),
                                     CARD_KEY: compaction_card(ckpt, cfg, state, plan.kept_layers).to_dict()}
    save_checkpoint(compact, out, overwrite=overwrite)
    t = plan.target
    log.info("compacted %s -> %s: %d -> %d parameters; d_model=%d layers=%d (kept source layers %s)%s",
             ckpt, out, config_params(cfg), config_params(t), t.d_model, t.n_layers, plan.kept_layers,
             f" heads={t.n_heads}/{t.n_kv_heads} intermediate={t.intermediate_size}" if t.is_uniform
             else " (layers differ in shape)")
    return t


def compaction_card(ckpt: Path, cfg: ModelConfig, state: dict, kept_layers: list[int]) -> ModelCard:
    """Provenance of a compacted checkpoint, kept in it so its HF export can describe it."""
    generator = state.get("mask_generator._extra_state") or {}
    params = dict(generator.get("params", {}))
    return ModelCard(source=str(ckpt), method=generator.get("name"), target=params.pop("target_model", {}),
                     options={**params, "kept_layers": kept_layers}, source_config=cfg.to_dict())
