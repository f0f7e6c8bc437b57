"""A parameter budget as an engine-friendly L0 target shape (the way ModelOpt takes a `params` constraint).

Inference engines want widths in multiples of 64 and whole KV groups, so the shape keeps them: d_model
and the MLP width are multiples of 64, n_heads a whole number of KV groups of the source's group size
(head_dim unchanged, as head pruning leaves it). Width goes first (Minitron found width pruning keeps
more quality than depth at equal size): every prunable width shrinks by one factor, found by bisection,
then the MLP width, the finest step, is set to land closest to the budget. Layers go only when a fixed
`n_layers` is asked for, or when the narrowest widths are still over budget.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from drprune.errors import ConfigError
from drprune.models.config import ModelConfig
from drprune.models.shapes import config_params

STEP = 64  # width granularity engines run fastest at
BISECTIONS = 40


@dataclass(frozen=True)
class TargetShape:
    """The target shape and its exact size (parameters counted as the compact model will have them)."""

    config: ModelConfig
    budget: int

    @property
    def params(self) -> int:
        return config_params(self.config)

    @property
    def non_embedding_params(self) -> int:
        return config_params(self.config, embeddings=False)

    @property
    def error(self) -> float:
        """Relative distance from the budget (+0.01: 1% over)."""
        return self.params / self.budget - 1

    def target_model(self) -> dict[str, int]:
        """The L0 generator's `target_model` node."""
        c = self.config
        return {"d_model": c.d_model, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "n_layers": c.n_layers,
                "intermediate_size": c.intermediate_size}

    def overrides(self, prefix: str = "model.mask_generator") -> list[str]:
        """Command-line overrides that set this target (shell-safe: no braces or spaces)."""
        return [f"{prefix}.target_model.{k}={v}" for k, v in self.target_model().items()]


def _round_width(value: float, full: int) -> int:
    """The multiple of STEP nearest `value`, at least STEP, at most the source's width."""
    return min(full, max(STEP, STEP * round(value / STEP)))


def _shape(source: ModelConfig, modules: set[str], scale: float, n_layers: int,
           intermediate: int | None = None) -> ModelConfig:
    d_model = _round_width(scale * source.d_model, source.d_model) if "hidden" in modules else source.d_model
    kv = min(source.n_kv_heads, max(1, round(scale * source.n_kv_heads))) if "head" in modules else source.n_kv_heads
    if intermediate is None:
        intermediate = (_round_width(scale * source.intermediate_size, source.intermediate_size)
                        if "intermediate" in modules else source.intermediate_size)
    return dataclasses.replace(source, d_model=d_model, n_heads=kv * source.group_size, n_kv_heads=kv,
                               head_dim=source.head_dim, n_layers=n_layers, intermediate_size=intermediate,
                               layers=None)


def _widest_under(source: ModelConfig, modules: set[str], budget: int, n_layers: int) -> ModelConfig:
    """The largest common width factor whose shape is within the budget (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(BISECTIONS):
        mid = (low + high) / 2
        if config_params(_shape(source, modules, mid, n_layers)) <= budget:
            low = mid
        else:
            high = mid
    return _shape(source, modules, low, n_layers)


def _tune_intermediate(source: ModelConfig, modules: set[str], shape: ModelConfig, budget: int) -> ModelConfig:
    """The MLP width (a multiple of STEP) that brings the count closest to the budget."""
    if "intermediate" not in modules:
        return shape
    base = config_params(dataclasses.replace(shape, intermediate_size=STEP))
    per_step = config_params(dataclasses.replace(shape, intermediate_size=2 * STEP)) - base
    steps = round((budget - base) / per_step) + 1
    width = min(source.intermediate_size, max(STEP, STEP * steps))
    return dataclasses.replace(shape, intermediate_size=width)


def shape_for_budget(source: ModelConfig, budget: float, modules: Sequence[str],
                     n_layers: int | None = None) -> TargetShape:
    """The engine-friendly shape of about `budget` parameters (embeddings included) pruned from `source`.

    `modules` are the L0 pruning modules (hidden, head, intermediate, layer); a ConfigError names what to
    change when the budget is out of reach.
    """
    budget, prunable = int(budget), set(modules)
    full = config_params(source)
    if not 0 < budget < full:
        raise ConfigError(f"target of {budget:,} parameters must be positive and below the source's {full:,}")
    if n_layers is not None:
        if not 1 <= n_layers <= source.n_layers:
            raise ConfigError(f"--target-layers {n_layers} must be between 1 and the source's {source.n_layers}")
        if n_layers != source.n_layers and not prunable & {"layer", "head_layer", "mlp"}:
            raise ConfigError(f"--target-layers {n_layers} removes layers, but the pruning modules {sorted(prunable)} "
                              "do not include layer: add it to model.mask_generator.pruning_modules")
    layer_options = ([n_layers] if n_layers is not None
                     else range(source.n_layers, 0, -1) if "layer" in prunable else [source.n_layers])
    for layers in layer_options:
        if config_params(_shape(source, prunable, 0.0, layers)) > budget:
            continue  # even the narrowest widths are over budget with this many layers
        shape = _tune_intermediate(source, prunable, _widest_under(source, prunable, budget, layers), budget)
        return TargetShape(shape, budget)
    smallest = config_params(_shape(source, prunable, 0.0, min(layer_options)))
    raise ConfigError(f"target of {budget:,} parameters is below {smallest:,}, the smallest shape pruning "
                      f"{sorted(prunable)} reaches with widths of {STEP}: raise the target, or prune more modules "
                      "(model.mask_generator.pruning_modules: hidden, head, intermediate, layer)")
