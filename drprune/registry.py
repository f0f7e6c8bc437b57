"""Name -> object registries: every pluggable kind of thing drprune builds from a config name or CLI flag.

A new mask generator, importance scorer, layer metric, mixture rule, callback, logger or scheduler
is one decorated class or function in its own file under the registry's package (drprune/masks,
drprune/oneshot, drprune/mixture, drprune/callbacks), e.g. drprune/oneshot/mine.py::

    @IMPORTANCE.register("mine")
    def mine(decoder): ...

Nothing else is edited: every module of those packages is imported before a registry's first lookup,
and the CLI's help lists the registry's contents.

Lookups go through `Registry.get`, whose ConfigError names the config key, the unknown name and the
nearest registered one, so every kind fails the same way. A registry holds whatever its kind's
users call; what that is (factory, class, scorer) is documented at the instance below.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable, Generic, Mapping, TypeVar

from drprune.errors import ConfigError, nearest

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one kind by name; names are unique, so a second registration is a mistake."""

    def __init__(self, kind: str, discover: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._discover = discover  # packages (or modules) whose every module is imported before a lookup
        self._discovered = not discover

    def _load(self) -> None:
        """Import every module of the discovery packages once, so a new entry in its own file registers
        itself without being imported anywhere else."""
        if self._discovered:
            return
        self._discovered = True
        for name in self._discover:
            package = importlib.import_module(name)
            for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
                importlib.import_module(f"{name}.{info.name}")

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator (classes or functions) that files the object under `name` and returns it unchanged."""
        def wrap(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return wrap

    def get(self, name: str, key: str, *, nested: bool = False) -> T:
        """The object named `name`, read from config key `key`.

        `nested` says the name is itself a key under `key` (`callbacks.<name>`) rather than its value
        (`scheduler.name=<name>`); it only changes how the error spells the key.
        """
        self._load()
        if name in self._entries:
            return self._entries[name]
        near = nearest(str(name), self.names(), cutoff=0.0)
        given, hint = (f"{key}.{name}", f"{key}.{near}") if nested else (f"{key}={name!r}", repr(near))
        raise ConfigError(f"{given} is unknown: did you mean {hint}? valid {self.kind}s: {', '.join(self.names())}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


def check_options(cls: type, options: Mapping[str, Any], key: str) -> None:
    """Refuse options the constructor of `cls` (a class a registry names) does not take, before anything is
    built; the error names the config key and where the class's options are documented."""
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise ConfigError(f"{key}: {err}; see the options of {cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}") \
            from err


# factory(cfg: ModelConfig, params: dict, config_prefix: str) -> MaskGenerator (drprune.masks)
MASK_GENERATORS: Registry = Registry("mask generator", ("drprune.masks",))
# scorer(decoder, [rows], [seed], [taylor_mode], [batch_size]) -> Scores (drprune.oneshot.importance)
IMPORTANCE: Registry = Registry("importance", ("drprune.oneshot",))
# LayerMetric subclass (drprune.oneshot.layers)
LAYER_METRICS: Registry = Registry("layer metric", ("drprune.oneshot",))
# MixtureRule subclass (drprune.mixture.rules)
MIXTURE_RULES: Registry = Registry("update rule", ("drprune.mixture",))
# factory(section, save_folder, model, train_loader) -> Callback | None (drprune.callbacks); section is
# callbacks.data_loading typed (drprune.run_config.DataLoading) or a Composer callback's options dict
CALLBACKS: Registry = Registry("callback", ("drprune.callbacks",))
# a composer.loggers LoggerDestination class (drprune.callbacks)
LOGGERS: Registry = Registry("logger", ("drprune.callbacks",))
# a composer.optim ComposerScheduler class (drprune.train)
SCHEDULERS: Registry = Registry("scheduler", ("drprune.train",))
