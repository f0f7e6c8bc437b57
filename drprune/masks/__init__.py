"""Mask generators behind one interface, built by name from the run config."""
from __future__ import annotations

from typing import Any, Mapping

import drprune.masks.hypernetwork  # noqa: F401 - registers "hypernetwork"
import drprune.masks.l0  # noqa: F401 - registers "l0"
from drprune.errors import UserError
from drprune.masks.base import MaskGenerator, MaskSet
from drprune.models.config import ModelConfig
from drprune.registry import MASK_GENERATORS


def build_mask_generator(cfg: ModelConfig, node: Mapping[str, Any] | None,
                         prefix: str = "model.mask_generator") -> MaskGenerator | None:
    """From a mask generator node (`name`: l0 | hypernetwork | ..., default l0, plus the generator's keys),
    as `drprune.run_config.ModelSection` reads it from `model.mask_generator` or Sheared's `model.l0_module`
    (whose key `prefix` names in messages). None without a node."""
    if node is None:
        return None
    params = dict(node)
    name = params.pop("name", "l0")
    return MASK_GENERATORS.get(name, key=f"{prefix}.name")(cfg, params, prefix)


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
    generator = build_mask_generator(cfg, {"name": extra["name"], **extra.get("params", {})})
    assert generator is not None  # a mask_generator node was given
    try:
        generator.load_state_dict(own, strict=True)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"the checkpoint's mask generator does not match its model: {err}") from err
    return generator.eval()


__all__ = ["MaskGenerator", "MaskSet", "MASK_GENERATORS", "build_mask_generator", "mask_generator_from_state"]
