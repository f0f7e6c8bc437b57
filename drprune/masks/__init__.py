"""Mask generators behind one interface, built by name from the run config."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from drprune.errors import ConfigError
from drprune.masks.base import MaskGenerator, MaskSet
from drprune.models.config import ModelConfig

Factory = Callable[[ModelConfig, dict[str, Any], str], MaskGenerator]
MASK_GENERATORS: dict[str, Factory] = {}


def register_mask_generator(name: str) -> Callable[[Factory], Factory]:
    def wrap(factory: Factory) -> Factory:
        MASK_GENERATORS[name] = factory
        return factory

    return wrap


@register_mask_generator("l0")
def _build_l0(cfg: ModelConfig, params: dict[str, Any], prefix: str) -> MaskGenerator:
    from drprune.masks.l0 import L0MaskGenerator

    params = dict(params)
    params.setdefault("pruning_modules", ["head", "intermediate", "layer", "hidden"])
    if "target_model" not in params:
        raise ConfigError(f"{prefix}.target_model is required: the shape to prune to (d_model, n_heads, ...)")
    params["lagrangian_warmup_steps"] = _batches(params.get("lagrangian_warmup_steps", 0), prefix)
    try:
        return L0MaskGenerator(cfg, config_prefix=prefix, **params)
    except TypeError as err:
        raise ConfigError(f"{prefix}: {err}") from err


@register_mask_generator("hypernetwork")
def _build_hypernetwork(cfg: ModelConfig, params: dict[str, Any], prefix: str) -> MaskGenerator:
    from drprune.masks.hypernetwork import build_hypernetwork

    return build_hypernetwork(cfg, params, prefix)


def _batches(value: Any, prefix: str) -> int:
    """'320ba' or 320 -> 320."""
    text = str(value)
    digits = text[:-2] if text.endswith("ba") else text
    if not digits.isdigit():
        raise ConfigError(f"{prefix}.lagrangian_warmup_steps={value!r} must be a number of batches like 320ba")
    return int(digits)


def build_mask_generator(cfg: ModelConfig, model_node: Mapping[str, Any]) -> MaskGenerator | None:
    """From `model.mask_generator` (name: l0 | hypernetwork | ...) or Sheared's `model.l0_module`."""
    if model_node.get("mask_generator") is not None and model_node.get("l0_module") is not None:
        raise ConfigError("set either model.mask_generator or model.l0_module, not both")
    if model_node.get("l0_module") is not None:
        return _build_l0(cfg, dict(model_node["l0_module"]), "model.l0_module")
    node = model_node.get("mask_generator")
    if node is None:
        return None
    params = dict(node)
    name = params.pop("name", "l0")
    if name not in MASK_GENERATORS:
        raise ConfigError(f"model.mask_generator.name={name!r} is unknown; valid: {sorted(MASK_GENERATORS)}")
    return MASK_GENERATORS[name](cfg, params, "model.mask_generator")


__all__ = ["MaskGenerator", "MaskSet", "MASK_GENERATORS", "build_mask_generator", "register_mask_generator"]
