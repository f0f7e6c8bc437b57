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
from drprune.progress import bars_off_terminal

# Modules that add sub-commands; order is the order in `drprune --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "drprune.convert.cli",
    "drprune.compact.cli",
    "drprune.data.cli",
    "drprune.eval.cli",
    "drprune.oneshot.cli",
    "drprune.demo.cli",
    "drprune.plan.cli",
)


class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other error: one `drprune: error:` line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"drprune: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `drprune` parser; every module in COMMAND_MODULES adds its sub-commands to it."""
    parser = _Parser(prog="drprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `drprune` command; returns the exit code (2, with one `drprune: error:` line, for a UserError)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    bars_off_terminal()
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
