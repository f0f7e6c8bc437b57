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


# `loggers:` names -> Composer logger classes (composer.loggers), llm-foundry's names; options are their kwargs
LOGGERS = {"tensorboard": "TensorboardLogger", "wandb": "WandBLogger", "mlflow": "MLFlowLogger",
           "file": "FileLogger", "inmemory": "InMemoryLogger", "in_memory_logger": "InMemoryLogger"}
# the pip package each logger needs beyond Composer
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Composer loggers from the `loggers:` node, each `name: {kwargs}`.

    Built before the model (constructing one starts nothing: runs open at the trainer's INIT event),
    so an unknown name, a bad option or a missing package stops the run before any heavy work.
    """
    import difflib
    import inspect

    import composer.loggers as cl
    from composer.utils import MissingConditionalImportError

    out = []
    for name, params in _container(cfg, "loggers").items():
        if name not in LOGGERS:
            near = difflib.get_close_matches(name, LOGGERS, n=1, cutoff=0.0)
            raise ConfigError(f"loggers.{name} is unknown: did you mean loggers.{near[0]}? "
                              f"valid: {', '.join(sorted(LOGGERS))}")
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"loggers.{name} must be a mapping of options (e.g. loggers.{name}={{}}), "
                              f"got {params!r}")
        cls = getattr(cl, LOGGERS[name])
        try:
            inspect.signature(cls).bind(**(params or {}))
        except TypeError as err:
            raise ConfigError(f"loggers.{name}: {err}; see the options of composer.loggers.{cls.__name__}") from err
        try:
            out.append(cls(**(params or {})))
        except MissingConditionalImportError as err:
            package = LOGGER_PACKAGES.get(name, name)
            raise ConfigError(f"loggers.{name} needs the `{package}` package: pip install {package}") from err
    return out
