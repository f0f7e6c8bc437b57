"""Command-line options shared by the sub-command modules (`drprune.<area>.cli`)."""
from __future__ import annotations

import argparse

from drprune.registry import Registry


def add_trust_pickle(parser: argparse.ArgumentParser, default: bool | None = False) -> None:
    """The one switch that lets a command fully unpickle a checkpoint (drprune.convert.integrity)."""
    parser.add_argument("--trust-pickle", action="store_true", default=default,
                        help="fully unpickle checkpoints that hold more than tensors and plain values; unpickling "
                             "can run arbitrary code, so only for files from a source you trust")


def add_registry_option(parser: argparse.ArgumentParser, flag: str, registry: Registry, text: str) -> None:
    """A `flag` whose help lists `registry`'s names (`text: a | b | c`); the registry discovers its entries
    only when the help is shown, so every other --help stays fast."""
    parser.add_argument(flag, action=_RegistryOption, registry=registry, text=text)


class _RegistryOption(argparse.Action):
    """Stores its value like a plain option; its help is read from the registry when printed."""

    def __init__(self, option_strings: list[str], dest: str, *, registry: Registry, text: str,
                 **kwargs: object) -> None:
        self._registry, self._text = registry, text
        super().__init__(option_strings, dest, **kwargs)

    @property
    def help(self) -> str:
        return f"{self._text}: {' | '.join(self._registry.names())}"

    @help.setter
    def help(self, _value: object) -> None:
        """argparse assigns help=None; the text comes from the registry instead."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
