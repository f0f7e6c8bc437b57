"""Name -> object registries: every pluggable kind of thing drprune builds from a config name or CLI flag.

A new mask generator, importance scorer, layer metric, mixture rule, callback, logger or scheduler
is one decorated class or function, e.g.::

    @IMPORTANCE.register("mine")
    def mine(decoder): ...

Lookups go through `Registry.get`, whose ConfigError names the config key, the unknown name and the
nearest registered one, so every kind fails the same way. A registry holds whatever its kind's
users call; what that is (factory, class, scorer) is documented at the instance below.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from drprune.errors import ConfigError, nearest

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one kind by name; names are unique, so a second registration is a mistake."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

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
        if name in self._entries:
            return self._entries[name]
        near = nearest(str(name), self.names(), cutoff=0.0)
        given, hint = (f"{key}.{name}", f"{key}.{near}") if nested else (f"{key}={name!r}", repr(near))
        raise ConfigError(f"{given} is unknown: did you mean {hint}? valid {self.kind}s: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


# factory(cfg: ModelConfig, params: dict, config_prefix: str) -> MaskGenerator (drprune.masks)
MASK_GENERATORS: Registry = Registry("mask generator")
# scorer(decoder, [rows], [seed], [taylor_mode], [batch_size]) -> Scores (drprune.oneshot.importance)
IMPORTANCE: Registry = Registry("importance")
# LayerMetric subclass (drprune.oneshot.layers)
LAYER_METRICS: Registry = Registry("layer metric")
# MixtureRule subclass (drprune.mixture.rules)
MIXTURE_RULES: Registry = Registry("update rule")
# factory(section, save_folder, model, train_loader) -> Callback | None (drprune.callbacks); section is
# callbacks.data_loading typed (drprune.run_config.DataLoading) or a Composer callback's options dict
CALLBACKS: Registry = Registry("callback")
# a composer.loggers LoggerDestination class (drprune.callbacks)
LOGGERS: Registry = Registry("logger")
# a composer.optim ComposerScheduler class (drprune.train)
SCHEDULERS: Registry = Registry("scheduler")
