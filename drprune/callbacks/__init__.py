"""Callbacks and loggers built by name from the run config (`callbacks:` and `loggers:` nodes)."""
from __future__ import annotations

from typing import Any

import composer.callbacks as cc
import composer.loggers as cl
from composer.core import Callback, Time, TimeUnit
from composer.utils import MissingConditionalImportError

import drprune.callbacks.data_loading  # noqa: F401 - registers "data_loading"
from drprune.callbacks.pruning import PruningCallback
from drprune.errors import ConfigError
from drprune.registry import CALLBACKS, LOGGERS, check_options
from drprune.run_config import Callbacks


def _composer_callback(cls: type[Callback]) -> Any:
    """A CALLBACKS factory that builds Composer's `cls` from the node's options."""
    def factory(params: dict[str, Any], save_folder: str | None, model: Any, loader: Any,
                log_interval: int = 1) -> Callback:
        return cls(**params)

    factory.options_of = cls  # check_callbacks binds the options to this signature before anything is built
    return factory


# Composer has no registry of its own: its callbacks and loggers under the names llm-foundry uses
for _name, _cls in (("speed_monitor", cc.SpeedMonitor), ("lr_monitor", cc.LRMonitor),
                    ("memory_monitor", cc.MemoryMonitor), ("runtime_estimator", cc.RuntimeEstimator),
                    ("optimizer_monitor", cc.OptimizerMonitor)):
    CALLBACKS.register(_name)(_composer_callback(_cls))
for _name, _cls in (("tensorboard", cl.TensorboardLogger), ("wandb", cl.WandBLogger), ("mlflow", cl.MLFlowLogger),
                    ("file", cl.FileLogger), ("inmemory", cl.InMemoryLogger), ("in_memory_logger", cl.InMemoryLogger)):
    LOGGERS.register(_name)(_cls)
# the pip package each logger needs beyond Composer
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_callbacks(callbacks: Callbacks) -> None:
    """Every `callbacks.<name>` registered and its options taken by the class it builds, before the model."""
    for name, params in callbacks.others.items():
        factory = CALLBACKS.get(name, key="callbacks", nested=True)
        cls = getattr(factory, "options_of", None)
        if cls is not None:
            check_options(cls, params, f"callbacks.{name}")


def build_callbacks(callbacks: Callbacks, save_folder: str | None, model: Any, train_loader: Any,
                    log_interval: int | str = 1) -> list[Callback]:
    """The configured callbacks (data_loading with its typed section), plus pruning's when the model has masks.

    `log_interval` (batches, or Composer's `5ba`): how often per-step statistics are read and logged.
    """
    out: list[Callback] = []
    for name, params in {"data_loading": callbacks.data_loading, **callbacks.others}.items():
        cb = CALLBACKS.get(name, key="callbacks", nested=True)(params, save_folder, model, train_loader,
                                                               batches(log_interval))
        if cb is not None:
            out.append(cb)
    if getattr(model, "mask_generator", None) is not None:
        out.append(PruningCallback(save_folder, batches(log_interval)))
    return out


def batches(interval: int | str) -> int:
    """A batch count from `5`, `"5ba"` (Composer's units); other units (epochs, tokens) log every batch."""
    if isinstance(interval, int):
        return interval
    time = Time.from_timestring(str(interval))
    return int(time.value) if time.unit == TimeUnit.BATCH else 1


def build_loggers(loggers: dict[str, Any]) -> list[Any]:
    """Composer loggers from the `loggers:` node, each `name: {kwargs}`.

    Built before the model (constructing one starts nothing: runs open at the trainer's INIT event),
    so an unknown name, a bad option or a missing package stops the run before any heavy work.
    """
    out = []
    for name, params in loggers.items():
        cls = LOGGERS.get(name, key="loggers", nested=True)
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"loggers.{name} must be a mapping of options (e.g. loggers.{name}={{}}), "
                              f"got {params!r}")
        check_options(cls, params or {}, f"loggers.{name}")
        try:
            out.append(cls(**(params or {})))
        except MissingConditionalImportError as err:
            package = LOGGER_PACKAGES.get(name, name)
            raise ConfigError(f"loggers.{name} needs the `{package}` package: pip install {package}") from err
    return out
