"""The same-shape baseline: one-shot structured pruning to the demo's target shape, no learned masks.

Layers come from `drprune.oneshot.layers` (the contiguous window with the smallest angular distance,
PruneGPT-style) and width from `drprune.oneshot.width` (Taylor importance, LLM-Pruner-style), both
scored on a little calibration data. Where those modules are missing, units are dropped at random
(seeded). The result is a hard MaskSet that goes through the same compaction as the L0 masks.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from drprune.masks.base import MaskSet
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot.layers import select_blocks
from drprune.oneshot.width import width_prune

log = logging.getLogger(__name__)

WIDTH_IMPORTANCE = "activation"  # best of taylor/l2/activation/random on SmolLM2 (bench_oneshot_quality)
LAYER_METHOD = "angular"


def _random_keep(n: int, keep: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(n)
    mask[torch.randperm(n, generator=gen)[:keep]] = 1.0
    return mask


def random_masks(decoder: PrunableDecoder, target: dict[str, int], seed: int = 0) -> MaskSet:
    """Random layers, KV groups per layer and MLP channels per layer, of exactly the target shape."""
    cfg = decoder.cfg
    gen = torch.Generator().manual_seed(seed)
    masks = MaskSet(
        layer=_random_keep(cfg.n_layers, target["n_layers"], gen),
        head=torch.stack([_random_keep(cfg.n_kv_heads, target["n_kv_heads"], gen) for _ in range(cfg.n_layers)]),
        intermediate=torch.stack([_random_keep(cfg.intermediate_size, target["intermediate_size"], gen)
                                  for _ in range(cfg.n_layers)]),
    )
    return masks.validate(cfg)


def baseline_masks(decoder: PrunableDecoder, calib_rows: np.ndarray, target: dict[str, int],
                   seed: int = 0) -> tuple[MaskSet, dict[str, str]]:
    """(hard masks of the target shape, {"layers": how, "width": how}) for the report."""
    masks = random_masks(decoder, target, seed)
    method = {"layers": "random", "width": "random"}
    drop = decoder.cfg.n_layers - target["n_layers"]
    if drop > 0:
        blocks = select_blocks(decoder, calib_rows, num_blocks=drop, method=LAYER_METHOD).blocks
        masks["layer"] = torch.ones(decoder.cfg.n_layers)
        masks["layer"][list(blocks)] = 0.0
    method["layers"] = f"{LAYER_METHOD} distance (drprune.oneshot.layers)"
    width = width_prune(decoder, calib_rows, importance=WIDTH_IMPORTANCE, seed=seed, target={
        "num_key_value_heads": target["n_kv_heads"], "intermediate_size": target["intermediate_size"]})
    for name in ("head", "intermediate"):  # absent = nothing of that kind removed
        masks[name] = width[name] if name in width else torch.ones_like(masks[name])
    method["width"] = f"{WIDTH_IMPORTANCE} importance (drprune.oneshot.width)"
    return masks.validate(decoder.cfg), method
