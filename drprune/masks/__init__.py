"""Mask generators behind one interface, built by name from the run config."""
from __future__ import annotations

from typing import Any, Mapping

import drprune.masks.hypernetwork  # noqa: F401 - registers "hypernetwork"
import drprune.masks.l0  # noqa: F401 - registers "l0"
from drprune.errors import ConfigError, UserError
from drprune.masks.base import MaskGenerator, MaskSet
from drprune.models.config import ModelConfig
from drprune.registry import MASK_GENERATORS


def build_mask_generator(cfg: ModelConfig, model_node: Mapping[str, Any]) -> MaskGenerator | None:
    """From `model.mask_generator` (name: l0 | hypernetwork | ...) or Sheared's `model.l0_module`."""
    if model_node.get("mask_generator") is not None and model_node.get("l0_module") is not None:
        raise ConfigError("set either model.mask_generator or model.l0_module, not both")
    if model_node.get("l0_module") is not None:
        return MASK_GENERATORS.get("l0", key="model.l0_module")(cfg, dict(model_node["l0_module"]), "model.l0_module")
    node = model_node.get("mask_generator")
    if node is None:
        return None
    params = dict(node)
    name = params.pop("name", "l0")
    return MASK_GENERATORS.get(name, key="model.mask_generator.name")(cfg, params, "model.mask_generator")


def mask_generator_from_state(cfg: ModelConfig, state: Mapping[str, Any]) -> MaskGenerator:
    """Rebuild a checkpoint's mask generator (in eval mode) from the config it recorded.

    `state` is a model state dict holding `mask_generator.*` entries, as the Composer Trainer saves it.
    """
    prefix = "mask_generator."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise UserError("the checkpoint holds no mask generator (no mask_generator.* entries): it is not a "
                        "pruning checkpoint, so there are no masks to fold")
    extra = own.get("_extra_state")
    if not isinstance(extra, dict) or "name" not in extra:
        raise UserError("the checkpoint's mask generator does not record its config (_extra_state with a name): "
                        "it was written by an older drprune; re-save it from a current pruning run")
    generator = build_mask_generator(cfg, {"mask_generator": {"name": extra["name"], **extra.get("params", {})}})
    assert generator is not None  # a mask_generator node was given
    try:
        generator.load_state_dict(own, strict=True)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"the checkpoint's mask generator does not match its model: {err}") from err
    return generator.eval()


__all__ = ["MaskGenerator", "MaskSet", "MASK_GENERATORS", "build_mask_generator", "mask_generator_from_state"]
