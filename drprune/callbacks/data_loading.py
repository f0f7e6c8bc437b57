"""Dynamic data loading callback (placeholder until the rules land: only `constant` is accepted)."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from drprune.errors import ConfigError


def build_data_loading_callback(params: dict[str, Any], cfg: DictConfig, model: Any, loader: Any) -> None:
    update_type = params.get("update_type", "constant")
    if update_type != "constant":
        raise ConfigError(f"callbacks.data_loading.update_type={update_type!r} is not available yet")
    return None
