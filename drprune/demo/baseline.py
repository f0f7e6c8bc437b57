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
from drprune.oneshot.copy_importance import top_copy_groups, top_copy_layers
from drprune.errors import UserError
from drprune.oneshot.layers import check_request, select_blocks
from drprune.oneshot.width import width_prune

log = logging.getLogger(__name__)

WIDTH_IMPORTANCE = "activation"  # best of taylor/l2/activation/random on SmolLM2 (bench_oneshot_quality)
LAYER_METHOD = "angular"
COPY_GROUPS = 10  # of SmolLM2-135M's 90: copy probe 93,704 -> 38.9 and better in-domain (docs/copying.md)
COPY_LAYERS = 12  # blocks never removed under selection="copy": those whose removal costs copied tokens most


def _random_keep(n: int, keep: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(n)
    mask[torch.randperm(n, generator=gen)[:keep]] = 1.0
    return mask


def random_masks(decoder: PrunableDecoder, target: dict[str, int], seed: int = 0) -> MaskSet:
    """Random layers, KV groups per layer, MLP channels per layer (and hidden dims when the target names
    d_model), of exactly the target shape."""
    cfg = decoder.cfg
    gen = torch.Generator().manual_seed(seed)
    masks = MaskSet(
        layer=_random_keep(cfg.n_layers, target["n_layers"], gen),
        head=torch.stack([_random_keep(cfg.n_kv_heads, target["n_kv_heads"], gen) for _ in range(cfg.n_layers)]),
        intermediate=torch.stack([_random_keep(cfg.intermediate_size, target["intermediate_size"], gen)
                                  for _ in range(cfg.n_layers)]),
    )
    if "d_model" in target:
        masks["hidden"] = _random_keep(cfg.d_model, target["d_model"], gen)
    return masks.validate(cfg)


def _windowed(protect: list[int], n_layers: int, drop: int) -> list[int]:
    """The best-ranked prefix of `protect` that still leaves `drop` consecutive blocks to remove (the
    angular distance removes a window)."""
    for k in range(len(protect), -1, -1):
        try:
            check_request(n_layers, drop, LAYER_METHOD, "all", protect[:k])
        except UserError:
            continue
        if k < len(protect):
            log.info("copy protection: %d of the %d best copying blocks kept, so that %d consecutive blocks "
                     "remain removable", k, len(protect), drop)
        return protect[:k]
    return []


def baseline_masks(decoder: PrunableDecoder, calib_rows: np.ndarray, target: dict[str, int],
                   seed: int = 0, selection: str = "activation") -> tuple[MaskSet, dict[str, str]]:
    """(hard masks of the target shape, {"layers": how, "width": how}) for the report.

    `selection="copy"` first protects what the model copies from its context with
    (drprune.oneshot.copy_importance): the COPY_GROUPS KV groups with the highest induction score are
    kept whatever activation importance says, and no block among the COPY_LAYERS whose removal costs
    copied tokens most is removed. `selection="copy-heads"` protects the KV groups only."""
    masks = random_masks(decoder, target, seed)
    method = {"layers": "random", "width": "random"}
    n_layers = decoder.cfg.n_layers
    drop = n_layers - target["n_layers"]
    copy = selection in ("copy", "copy-heads")
    skip: list[int] = []
    if drop > 0:
        if selection == "copy":
            skip = _windowed(top_copy_layers(decoder, calib_rows, min(COPY_LAYERS, n_layers - drop), seed=seed),
                             n_layers, drop)
        blocks = select_blocks(decoder, calib_rows, num_blocks=drop, method=LAYER_METHOD, skip_blocks=skip).blocks
        masks["layer"] = torch.ones(n_layers)
        masks["layer"][list(blocks)] = 0.0
    method["layers"] = f"{LAYER_METHOD} distance (drprune.oneshot.layers)" + (
        f", the {len(skip)} blocks copying needs most kept" if skip else "")
    protect = top_copy_groups(decoder, calib_rows, min(COPY_GROUPS, n_layers * decoder.cfg.n_kv_heads),
                              seed=seed) if copy else []
    width = width_prune(decoder, calib_rows, importance=WIDTH_IMPORTANCE, seed=seed, protect=protect, target={
        "num_key_value_heads": target["n_kv_heads"], "intermediate_size": target["intermediate_size"],
        "hidden_size": target.get("d_model")})
    for name in ("head", "intermediate", "hidden"):  # absent = nothing of that kind removed
        if name in masks:
            masks[name] = width[name] if name in width else torch.ones_like(masks[name])
    method["width"] = f"{WIDTH_IMPORTANCE} importance (drprune.oneshot.width)" + (
        f", the {COPY_GROUPS} KV groups of highest induction score kept" if copy else "")
    return masks.validate(decoder.cfg), method
