"""Model-shape math of structural pruning: mask kinds, the compact config hard masks leave, parameter counts.

Parameter counting is one formula used three ways: differentiable on soft masks (budget losses),
exact on hard masks (predicted size of the compact model) and on a compact config (its real size).
Masks here are plain name -> tensor mappings; `drprune.masks.MaskSet` is the type generators return.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor

from drprune.errors import ConfigError
from drprune.models.config import LayerSpec, ModelConfig

# name -> shape in terms of the source config (L layers, H_kv KV groups, I intermediate, d hidden)
MASK_DIMS: dict[str, tuple[str, ...]] = {
    "head": ("L", "H_kv"),
    "head_layer": ("L",),
    "mlp": ("L",),
    "layer": ("L",),
    "intermediate": ("L", "I"),
    "hidden": ("d",),
    "attn_in": ("L", "d"),
    "attn_out": ("L", "d"),
    "mlp_in": ("L", "d"),
    "mlp_out": ("L", "d"),
}
RESIDUAL_SELECTIONS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def mask_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The tensor shape of mask `name` on the source config `cfg` (MASK_DIMS resolved)."""
    sizes = {"L": cfg.n_layers, "H_kv": cfg.n_kv_heads, "I": cfg.intermediate_size, "d": cfg.d_model}
    return tuple(sizes[d] for d in MASK_DIMS[name])


def validate_masks(masks: Mapping[str, Tensor], cfg: ModelConfig) -> None:
    """ConfigError unless every mask is known, has the shape `cfg` needs, and they combine."""
    if not cfg.is_uniform:
        raise ConfigError("masks apply to a full (uniform) model, not to an already compacted one")
    for name, value in masks.items():
        if name not in MASK_DIMS:
            raise ConfigError(f"unknown mask {name!r}; valid masks are {sorted(MASK_DIMS)}")
        if tuple(value.shape) != mask_shape(name, cfg):
            raise ConfigError(
                f"mask {name!r} has shape {tuple(value.shape)} but the model needs {mask_shape(name, cfg)}"
            )
    if "hidden" in masks and any(n in masks for n in RESIDUAL_SELECTIONS):
        raise ConfigError("a global `hidden` mask cannot be combined with per-layer residual selections")


# ------------------------------------------------------------------ shapes from hard masks

def _kept(mask: Tensor | None) -> list[int] | None:
    return None if mask is None else torch.nonzero(mask != 0).flatten().tolist()


def compact_config(cfg: ModelConfig, masks: Mapping[str, Tensor]) -> tuple[ModelConfig, list[int]]:
    """The config of the model left after removing what hard `masks` zero, and the kept layer ids."""
    validate_masks(masks, cfg)
    hidden = _kept(masks.get("hidden"))
    d_model = cfg.d_model if hidden is None else len(hidden)
    specs, kept_layers = [], []
    for i in range(cfg.n_layers):
        if "layer" in masks and masks["layer"][i] == 0:
            continue
        n_kv = cfg.n_kv_heads if "head" not in masks else int((masks["head"][i] != 0).sum())
        if "head_layer" in masks and masks["head_layer"][i] == 0:
            n_kv = 0
        inter = cfg.intermediate_size if "intermediate" not in masks else int((masks["intermediate"][i] != 0).sum())
        if "mlp" in masks and masks["mlp"][i] == 0:
            inter = 0
        sel = {n: _kept(masks[n][i]) if n in masks else None for n in RESIDUAL_SELECTIONS}
        if n_kv == 0:
            sel["attn_in"] = sel["attn_out"] = None
        if inter == 0:
            sel["mlp_in"] = sel["mlp_out"] = None
        if n_kv == 0 and inter == 0:
            continue
        specs.append(LayerSpec(n_kv * cfg.group_size, n_kv, inter, **sel))
        kept_layers.append(i)
    if not specs:
        raise ConfigError("the masks remove every layer (every head and every MLP channel): nothing is left")
    first = specs[0]
    uniform = all(
        s == first and s.has_attn and s.has_mlp and all(getattr(s, n) is None for n in RESIDUAL_SELECTIONS)
        for s in specs
    )
    new = replace(
        cfg, d_model=d_model, n_layers=len(specs),
        n_heads=first.n_heads if uniform else cfg.n_heads,
        n_kv_heads=first.n_kv_heads if uniform else cfg.n_kv_heads,
        intermediate_size=first.intermediate_size if uniform else cfg.intermediate_size,
        layers=None if uniform else specs,
    )
    return new, kept_layers


# ------------------------------------------------------------------ parameter counting

def _norm_params(cfg: ModelConfig, width: Any) -> Any:
    return width * (2 if cfg.norm == "layernorm" else 1)


def _attn_params(cfg: ModelConfig, n_kv: Any, d_in: Any, d_out: Any) -> Any:
    q_out = n_kv * cfg.group_size * cfg.head_dim
    qkv_out = q_out + 2 * n_kv * cfg.head_dim
    n = d_in * qkv_out + q_out * d_out + _norm_params(cfg, d_in)
    if cfg.qkv_bias:
        n = n + qkv_out
    if cfg.o_bias:
        n = n + d_out
    return n


def _mlp_params(cfg: ModelConfig, inter: Any, d_in: Any, d_out: Any) -> Any:
    n_in = 2 if cfg.mlp == "gated" else 1
    n = d_in * inter * n_in + inter * d_out + _norm_params(cfg, d_in)
    if cfg.mlp_bias:
        n = n + inter * n_in + d_out
    return n


def _embedding_params(cfg: ModelConfig, d: Any) -> Any:
    """Token embedding and output head; the final norm counts as a non-embedding parameter."""
    return cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)


def config_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Exact parameter count of a (possibly compact) model config."""
    def width(selection: list[int] | None) -> int:
        return cfg.d_model if selection is None else len(selection)

    total = _norm_params(cfg, cfg.d_model) + (_embedding_params(cfg, cfg.d_model) if embeddings else 0)
    for i in range(cfg.n_layers):
        s = cfg.layer_spec(i)
        if s.has_attn:
            total += _attn_params(cfg, s.n_kv_heads, width(s.attn_in), width(s.attn_out))
        if s.has_mlp:
            total += _mlp_params(cfg, s.intermediate_size, width(s.mlp_in), width(s.mlp_out))
    return int(total)


def expected_params(cfg: ModelConfig, masks: Mapping[str, Tensor], embeddings: bool = True) -> Tensor:
    """Differentiable parameter count for soft masks (values are keep probabilities or samples).

    With hard 0/1 masks it equals `config_params(compact_config(cfg, masks))`.
    """
    def total(name: str, i: int | None, full: int) -> Tensor | int:
        if name not in masks:
            return full
        m = masks[name] if i is None else masks[name][i]
        return m.sum()

    d = total("hidden", None, cfg.d_model)
    count = _norm_params(cfg, d) + (_embedding_params(cfg, d) if embeddings else 0)
    for i in range(cfg.n_layers):
        layer = masks["layer"][i] if "layer" in masks else 1.0
        n_kv = total("head", i, cfg.n_kv_heads)
        inter = total("intermediate", i, cfg.intermediate_size)
        attn_on = layer * (masks["head_layer"][i] if "head_layer" in masks else 1.0) * _nonzero(n_kv)
        mlp_on = layer * (masks["mlp"][i] if "mlp" in masks else 1.0) * _nonzero(inter)
        attn = _attn_params(cfg, n_kv, total("attn_in", i, d), total("attn_out", i, d))
        mlp = _mlp_params(cfg, inter, total("mlp_in", i, d), total("mlp_out", i, d))
        count = count + attn_on * attn + mlp_on * mlp
    return torch.as_tensor(count, dtype=torch.float32)


def _nonzero(x: Tensor | int) -> Tensor | float:
    """1 when any unit is kept: a sub-layer with no unit left is removed whole (norm included)."""
    if isinstance(x, Tensor):
        return (x > 0).to(x.dtype)
    return float(x > 0)
