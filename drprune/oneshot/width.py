"""Width pruning to a target: a shape (Pruning-LLMs) or a ratio per layer range (LLM-Pruner).

The target is met exactly by keeping the highest-scoring structures (see `importance`):
  shape  hidden_size (one set of residual dims for every layer), num_attention_heads and/or
         num_key_value_heads (whole KV groups with their query heads, so the GQA ratio stays),
         intermediate_size (per layer), drop_layers (whole blocks, negative indices allowed)
  ratio  pruning_ratio R of the KV groups in layers [block_attention_layer_start, _end) and of the
         MLP channels in [block_mlp_layer_start, _end) (defaults: every layer); hidden dims are
         kept, as in LLM-Pruner's block-wise mode. Layers outside the ranges keep their width, so
         the result has per-layer shapes. With taylor importance the ranges default to LLM-Pruner's
         block-wise ones: the first 4 and the last 2 blocks keep their width.
The output is a hard MaskSet (1 = keep unscaled, 0 = drop) for the shared compaction path.
`protect` (layer, KV group) pairs, e.g. the best copy-scoring ones (`copy_importance.top_copy_groups`),
are kept before any other group of their layer, whatever the importance says.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from drprune.errors import UserError
from drprune.masks.base import MaskSet
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot.importance import Scores, importance_scores
from drprune.oneshot.layers import normalize_skip

log = logging.getLogger(__name__)

SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
RATIO_KEYS = ("pruning_ratio", "block_attention_layer_start", "block_attention_layer_end",
              "block_mlp_layer_start", "block_mlp_layer_end")
TARGET_KEYS = (*SHAPE_KEYS, *RATIO_KEYS, "drop_layers")
TAYLOR_KEEP_FIRST, TAYLOR_KEEP_LAST = 4, 2  # LLM-Pruner: --block_*_layer_start 4 --block_*_layer_end n-2


@dataclass
class WidthPlan:
    """How many of each structure every layer keeps."""

    kv_groups: list[int]
    intermediate: list[int]
    hidden: int
    drop_layers: list[int]


def plan_target(cfg: ModelConfig, target: Mapping[str, Any]) -> WidthPlan:
    """Validate `target` against the source config and turn it into per-layer kept counts."""
    if not cfg.is_uniform:
        raise UserError("width pruning applies to a full model, not an already compacted one")
    target = {k: v for k, v in target.items() if v is not None}
    unknown = sorted(set(target) - set(TARGET_KEYS))
    if unknown:
        raise UserError(f"unknown width target keys {unknown}; valid keys are {list(TARGET_KEYS)}")
    shape = {k: int(target[k]) for k in SHAPE_KEYS if k in target}
    ratio = {k: target[k] for k in RATIO_KEYS if k in target}
    if shape and ratio:
        raise UserError(f"give either a target shape {sorted(shape)} or a pruning_ratio {sorted(ratio)}, not both")
    drop = sorted(normalize_skip([int(b) for b in target.get("drop_layers", [])], cfg.n_layers, "drop_layers"))
    if len(drop) >= cfg.n_layers:
        raise UserError(f"drop_layers {drop} removes every one of the {cfg.n_layers} layers")
    if ratio:
        return _ratio_plan(cfg, ratio, drop)
    if not shape and not drop:
        raise UserError(f"no width target: give some of {list(SHAPE_KEYS)}, drop_layers or pruning_ratio")
    kv = _kv_target(cfg, shape)
    inter = _bounded("intermediate_size", shape.get("intermediate_size", cfg.intermediate_size), cfg.intermediate_size)
    hidden = _bounded("hidden_size", shape.get("hidden_size", cfg.d_model), cfg.d_model)
    return WidthPlan([kv] * cfg.n_layers, [inter] * cfg.n_layers, hidden, drop)


def taylor_ratio_defaults(cfg: ModelConfig, target: Mapping[str, Any]) -> dict[str, Any]:
    """`target` with LLM-Pruner's layer ranges filled in for a taylor pruning_ratio (given ranges win).

    Gradients of the first and last blocks are the least reliable guide (one KV group there can
    carry the model), so those blocks keep their width. Models too shallow for the range keep all.
    """
    target = dict(target)
    if target.get("pruning_ratio") is None:
        return target
    start, end = TAYLOR_KEEP_FIRST, cfg.n_layers - TAYLOR_KEEP_LAST
    if start >= end:
        log.info("taylor: %d layers are too few to keep the first %d and last %d blocks; every layer is pruned",
                 cfg.n_layers, TAYLOR_KEEP_FIRST, TAYLOR_KEEP_LAST)
        return target
    for kind in ("attention", "mlp"):
        target.setdefault(f"block_{kind}_layer_start", start)
        target.setdefault(f"block_{kind}_layer_end", end)
    log.info("taylor: pruning_ratio applies to attention layers [%d, %d) and MLP layers [%d, %d)",
             target["block_attention_layer_start"], target["block_attention_layer_end"],
             target["block_mlp_layer_start"], target["block_mlp_layer_end"])
    return target


def _bounded(key: str, value: int, source: int) -> int:
    if value > source:
        raise UserError(f"target {key}={value} is larger than the source model's {source}: pick a smaller target")
    if value < 1:
        raise UserError(f"target {key}={value} must be at least 1")
    return value


def _kv_target(cfg: ModelConfig, shape: dict[str, int]) -> int:
    """Kept KV groups; query heads follow their group, so heads must be a multiple of the group size."""
    kv = cfg.n_kv_heads
    if "num_key_value_heads" in shape:
        kv = _bounded("num_key_value_heads", shape["num_key_value_heads"], cfg.n_kv_heads)
    if "num_attention_heads" in shape:
        heads = _bounded("num_attention_heads", shape["num_attention_heads"], cfg.n_heads)
        if heads % cfg.group_size:
            raise UserError(f"num_attention_heads={heads} is not a multiple of the {cfg.group_size} query heads "
                            f"per KV group: KV groups are pruned whole, pick a multiple of {cfg.group_size}")
        if "num_key_value_heads" in shape and heads // cfg.group_size != kv:
            raise UserError(f"num_attention_heads={heads} with num_key_value_heads={kv} changes the "
                            f"{cfg.group_size}:1 GQA ratio; give one of them (whole groups are pruned)")
        kv = heads // cfg.group_size
    return kv


def _ratio_plan(cfg: ModelConfig, ratio: dict[str, Any], drop: list[int]) -> WidthPlan:
    if "pruning_ratio" not in ratio:
        raise UserError("layer ranges (block_*_layer_start/end) need a pruning_ratio")
    r = float(ratio["pruning_ratio"])
    if not 0.0 < r < 1.0:
        raise UserError(f"pruning_ratio={r} must be strictly between 0 and 1")
    n = cfg.n_layers

    def span(kind: str) -> range:
        start = int(ratio.get(f"block_{kind}_layer_start", 0))
        end = int(ratio.get(f"block_{kind}_layer_end", n))
        if not 0 <= start < end <= n:
            raise UserError(f"block_{kind}_layer_start/end = {start}/{end} must satisfy 0 <= start < end <= {n}")
        return range(start, end)

    def kept(full: int) -> int:
        return max(1, full - int(round(full * r)))

    attn, mlp = span("attention"), span("mlp")
    kv = [kept(cfg.n_kv_heads) if i in attn else cfg.n_kv_heads for i in range(n)]
    inter = [kept(cfg.intermediate_size) if i in mlp else cfg.intermediate_size for i in range(n)]
    return WidthPlan(kv, inter, cfg.d_model, drop)


def _top(scores: Tensor, k: int) -> Tensor:
    """0/1 mask keeping the k highest scores (ties broken by lower index)."""
    keep = torch.zeros(scores.shape[-1])
    keep[torch.argsort(scores, descending=True, stable=True)[:k]] = 1.0
    return keep


def protected_head_scores(head: Tensor, protect: Sequence[tuple[int, int]], plan: WidthPlan) -> Tensor:
    """`head` [L, H_kv] with the `protect` pairs (best first) raised above every score, in their order, so
    they are kept first; a layer that keeps fewer groups than it has protected keeps the best-ranked ones."""
    out = head.clone().double()
    if not protect:
        return out
    above = float(out.max()) + 1.0
    for rank, (layer, group) in enumerate(protect):
        out[layer, group] = above + len(protect) - rank
    for layer in sorted({layer for layer, _ in protect}):
        wanted = sum(1 for lay, _ in protect if lay == layer)
        if layer in plan.drop_layers:
            log.warning("layer %d holds %d protected KV group(s) but drop_layers removes it", layer, wanted)
        elif wanted > plan.kv_groups[layer]:
            log.warning("layer %d holds %d protected KV groups but keeps %d: the best-ranked ones stay", layer,
                        wanted, plan.kv_groups[layer])
    return out


def masks_from_scores(cfg: ModelConfig, scores: Scores, plan: WidthPlan,
                      protect: Sequence[tuple[int, int]] = ()) -> MaskSet:
    """Hard masks meeting `plan` exactly, `protect` groups first; only structures that lose something get a mask."""
    masks = MaskSet()
    if any(k < cfg.n_kv_heads for k in plan.kv_groups):
        head = protected_head_scores(scores.head, protect, plan)
        masks["head"] = torch.stack([_top(head[i], k) for i, k in enumerate(plan.kv_groups)])
    if any(k < cfg.intermediate_size for k in plan.intermediate):
        masks["intermediate"] = torch.stack([_top(scores.intermediate[i], k) for i, k in enumerate(plan.intermediate)])
    if plan.hidden < cfg.d_model:
        masks["hidden"] = _top(scores.hidden, plan.hidden)
    if plan.drop_layers:
        layer = torch.ones(cfg.n_layers)
        layer[plan.drop_layers] = 0.0
        masks["layer"] = layer
    return masks.validate(cfg)


def width_prune(decoder: PrunableDecoder, calib_rows: np.ndarray | None, *, importance: str,
                target: Mapping[str, Any], seed: int = 0, taylor_mode: str = "element",
                batch_size: int = 4, protect: Sequence[tuple[int, int]] = ()) -> MaskSet:
    """Hard masks pruning `decoder` to `target` by `importance` (a name in drprune.registry.IMPORTANCE),
    keeping the `protect` (layer, KV group) pairs first."""
    if importance == "taylor":
        target = taylor_ratio_defaults(decoder.cfg, target)
    plan = plan_target(decoder.cfg, target)
    scores = importance_scores(decoder, calib_rows, importance, seed=seed, taylor_mode=taylor_mode,
                               batch_size=batch_size)
    return masks_from_scores(decoder.cfg, scores, plan, protect)


def removed_structures(cfg: ModelConfig, masks: MaskSet) -> dict[str, Any]:
    """What the masks remove, by index: the body of removed.json."""
    def zeros(t: Tensor) -> list[int]:
        return torch.nonzero(t == 0).flatten().tolist()

    out: dict[str, Any] = {}
    if "layer" in masks:
        out["layers"] = zeros(masks["layer"])
    if "head" in masks:
        out["kv_groups"] = {str(i): zeros(row) for i, row in enumerate(masks["head"]) if zeros(row)}
        out["query_heads_per_kv_group"] = cfg.group_size
    if "intermediate" in masks:
        out["intermediate_channels"] = {str(i): zeros(row) for i, row in enumerate(masks["intermediate"]) if zeros(row)}
    if "hidden" in masks:
        out["hidden_dims"] = zeros(masks["hidden"])
    return out
