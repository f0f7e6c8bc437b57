"""Command-line options shared by the sub-command modules (`drprune.<area>.cli`)."""
from __future__ import annotations

import argparse

from drprune.dtypes import DTYPES
from drprune.registry import Registry


def add_trust_pickle(parser: argparse.ArgumentParser, default: bool | None = False) -> None:
    """The one switch that lets a command fully unpickle a checkpoint (drprune.convert.integrity)."""
    parser.add_argument("--trust-pickle", action="store_true", default=default,
                        help="fully unpickle checkpoints that hold more than tensors and plain values; unpickling "
                             "can run arbitrary code, so only for files from a source you trust")


def add_export_options(parser: argparse.ArgumentParser, when: str = "") -> None:
    """--dtype and --context-length of a HF export (`when`: the flag they need, for the help)."""
    parser.add_argument("--dtype", choices=DTYPES,
                        help=f"{when}dtype of the exported tensors and config.json's torch_dtype (default: the dtype "
                             "the source model came in, recorded at `convert hf-to-composer`; float32 when unknown)")
    parser.add_argument("--context-length", type=int, metavar="N",
                        help=f"{when}the context length config.json states (max_position_embeddings; default: the "
                             "source model's, whatever length training used)")


def add_compute_options(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--device and --dtype of a command that runs a model (resolved by drprune.compute)."""
    parser.add_argument("--device", default=default,
                        help="auto (CUDA when present, else CPU; the default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=default, choices=("auto", *DTYPES),
                        help="dtype of the model's weights while it runs (auto: bfloat16 on a GPU, float32 on CPU)")


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
