"""Callbacks and loggers built by name from the run config (`callbacks:` and `loggers:` nodes)."""
from __future__ import annotations

from typing import Any, Callable

from composer.core import Callback
from omegaconf import DictConfig, OmegaConf

from drprune.errors import ConfigError

# name -> factory(params, cfg, model, train_loader) -> Callback | None
CallbackFactory = Callable[[dict[str, Any], DictConfig, Any, Any], "Callback | None"]
CALLBACKS: dict[str, CallbackFactory] = {}


def register_callback(name: str) -> Callable[[CallbackFactory], CallbackFactory]:
    def wrap(factory: CallbackFactory) -> CallbackFactory:
        CALLBACKS[name] = factory
        return factory

    return wrap


def _composer_callback(cls_name: str) -> CallbackFactory:
    def factory(params: dict[str, Any], cfg: DictConfig, model: Any, loader: Any) -> Callback:
        import composer.callbacks as cc

        return getattr(cc, cls_name)(**params)

    return factory


for _name, _cls in (("speed_monitor", "SpeedMonitor"), ("lr_monitor", "LRMonitor"),
                    ("memory_monitor", "MemoryMonitor"), ("runtime_estimator", "RuntimeEstimator"),
                    ("optimizer_monitor", "OptimizerMonitor")):
    register_callback(_name)(_composer_callback(_cls))


@register_callback("data_loading")
def _data_loading(params: dict[str, Any], cfg: DictConfig, model: Any, loader: Any) -> Callback | None:
    from drprune.callbacks.data_loading import build_data_loading_callback

    return build_data_loading_callback(params, cfg, model, loader)


def _container(cfg: DictConfig, key: str) -> dict[str, Any]:
    node = cfg.get(key)
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


def build_callbacks(cfg: DictConfig, model: Any, train_loader: Any) -> list[Callback]:
    from drprune.callbacks.pruning import PruningCallback

    out: list[Callback] = []
    node = _container(cfg, "callbacks")
    for name, params in node.items():
        if name not in CALLBACKS:
            raise ConfigError(f"callbacks.{name} is unknown; valid: {sorted(CALLBACKS)}")
        cb = CALLBACKS[name](dict(params or {}), cfg, model, train_loader)
        if cb is not None:
            out.append(cb)
    if getattr(model, "mask_generator", None) is not None:
        out.append(PruningCallback(cfg.get("save_folder")))
    return out


def build_loggers(cfg: DictConfig) -> list[Any]:
    import composer.loggers as cl

    table = {"wandb": "WandBLogger", "tensorboard": "TensorboardLogger", "file": "FileLogger",
             "mlflow": "MLFlowLogger", "inmemory": "InMemoryLogger"}
    out = []
    for name, params in _container(cfg, "loggers").items():
        if name not in table:
            raise ConfigError(f"loggers.{name} is unknown; valid: {sorted(table)}")
        out.append(getattr(cl, table[name])(**(params or {})))
    return out
