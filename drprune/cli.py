"""drprune: prune a pretrained LLM into a smaller one that is still good.

The `drprune` command. Each feature area owns its sub-commands in a small `cli` module exposing `register(subparsers)`;
heavy imports happen inside the command functions so `drprune --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from drprune.errors import UserError
from drprune.registry import Registry

# Modules that add sub-commands; order is the order in `drprune --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "drprune.convert.cli",
    "drprune.compact.cli",
    "drprune.data.cli",
    "drprune.eval.cli",
    "drprune.oneshot.cli",
    "drprune.demo.cli",
)


def add_trust_pickle(parser: argparse.ArgumentParser, default: bool | None = False) -> None:
    """The one switch that lets a command fully unpickle a checkpoint (drprune.convert.integrity)."""
    parser.add_argument("--trust-pickle", action="store_true", default=default,
                        help="fully unpickle checkpoints that hold more than tensors and plain values; unpickling "
                             "can run arbitrary code, so only for files from a source you trust")


def add_registry_option(parser: argparse.ArgumentParser, flag: str, registry: Registry, module: str,
                        text: str) -> None:
    """A `flag` whose help lists `registry`'s names (`text: a | b | c`); `module`, which registers the
    built-in ones, is imported only when the help is shown, so every other --help stays fast."""
    parser.add_argument(flag, action=_RegistryOption, registry=registry, module=module, text=text)


class _RegistryOption(argparse.Action):
    """Stores its value like a plain option; its help is read from the registry when printed."""

    def __init__(self, option_strings: list[str], dest: str, *, registry: Registry, module: str, text: str,
                 **kwargs: object) -> None:
        self._registry, self._module, self._text = registry, module, text
        super().__init__(option_strings, dest, **kwargs)

    @property
    def help(self) -> str:
        importlib.import_module(self._module)
        return f"{self._text}: {' | '.join(self._registry.names())}"

    @help.setter
    def help(self, _value: object) -> None:
        """argparse assigns help=None; the text comes from the registry instead."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other error: one `drprune: error:` line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"drprune: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="drprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except UserError as err:
        print(f"drprune: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
