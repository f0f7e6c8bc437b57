"""`drprune oneshot layers|width|vocab`: prune without training and write a compact model.

Every command reads MODEL (HF folder or Composer checkpoint) and a little calibration data (MDS
folder or text files), writes OUT/model.pt (Composer checkpoint), OUT/hf/ and OUT/removed.json
(plus OUT/eval.json when --eval-data is given), all under a temporary name renamed at the end.
A YAML/JSON --config with the same keys (flag names with underscores) stands in for flags; flags
given on the command line win. PruneGPT's key names (model_name, save_directory, angular_distance,
cosine_similarity) and Pruning-LLMs' *_remain keys are accepted too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from drprune.cli_options import add_compute_options, add_registry_option, add_trust_pickle
from drprune.errors import UserError, nearest
from drprune.oneshot.options import OneshotOptions
from drprune.registry import IMPORTANCE, LAYER_METRICS

log = logging.getLogger(__name__)

# defaults live in OneshotOptions; these differ by command (Taylor needs >= 64 rows, LLM-Pruner)
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"width": {"max_rows": 64}}
# integer options and their smallest valid value (checked before the model is read)
POSITIVE = {"seq_len": 2, "max_rows": 1, "batch_size": 1, "eval_max_rows": 1, "keep": 1, "hidden_size": 1,
            "num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 1, "protect_copy_heads": 0,
            "protect_copy_layers": 0}
KEY_ALIASES = {"model_name": "model", "save_directory": "out", "hidden_size_remain": "hidden_size",
               "num_attention_heads_remain": "num_attention_heads", "ffn_hidden_size_remain": "intermediate_size",
               "intermediate_size_remain": "intermediate_size", "pruner_type": "importance"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `drprune oneshot layers|width|vocab`; flags default to None so --config values can fill them."""
    top = subparsers.add_parser("oneshot", help="one-shot pruning without training: layers, width, vocabulary")
    sub = top.add_subparsers(dest="oneshot", required=True)

    layers = _common(sub.add_parser("layers", help="remove blocks by angular distance or cosine (ShortGPT)"))
    layers.add_argument("--num-blocks-to-prune", type=int)
    add_registry_option(layers, "--pruning-method", LAYER_METRICS,
                        "block metric (angular removes a window of consecutive blocks, cosine single blocks)")
    layers.add_argument("--pruning-token", choices=("all", "last"), help="tokens the scores average over")
    layers.add_argument("--skip-blocks", type=int, nargs="*", help="blocks never removed (negative = from the end)")
    layers.add_argument("--protect-copy-layers", type=int, metavar="K",
                        help="never remove the K blocks whose removal hurts copying most (scored on --calib text "
                             "with repeated spans)")

    width = _common(sub.add_parser("width", help="prune heads / channels / hidden dims to a shape or a ratio"))
    add_registry_option(width, "--importance", IMPORTANCE, "importance scorer")
    width.add_argument("--taylor", help="element (sum |w g|) | vector (sum over rows of |sum_row w g|)")
    width.add_argument("--seed", type=int, help="seed of the random importance and of the copy-scoring text")
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        width.add_argument("--" + key.replace("_", "-"), type=int, help="target shape")
    width.add_argument("--drop-layers", type=int, nargs="*", help="blocks removed outright")
    width.add_argument("--protect-copy-heads", type=int, metavar="K",
                       help="keep the K KV groups whose removal hurts copying most, whatever --importance says "
                            "(scored on --calib text with repeated spans)")
    width.add_argument("--copy-score", choices=("induction", "ablation"),
                       help="how --protect-copy-heads ranks KV groups: induction (attention to the token after an "
                            "earlier occurrence; one pass; default) or ablation (loss increase when masked)")
    width.add_argument("--pruning-ratio", type=float, help="LLM-Pruner style: fraction of groups/channels removed")
    for key in ("block_attention_layer_start", "block_attention_layer_end", "block_mlp_layer_start",
                "block_mlp_layer_end"):
        width.add_argument("--" + key.replace("_", "-"), type=int, help="layer range of --pruning-ratio")

    vocab = _common(sub.add_parser("vocab", help="keep the N most frequent tokens of --calib (+ special/byte)"))
    vocab.add_argument("--keep", type=int, help="frequent tokens kept (special and byte tokens come on top)")


def _common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", nargs="?", help="HF model folder (or hub:NAME) or drprune/Composer checkpoint")
    p.add_argument("--config", help="YAML/JSON file with the same keys as the flags")
    p.add_argument("--calib", help="calibration data: an MDS folder (or prepared root) or text files")
    p.add_argument("--tokenizer", help="tokenizer for text data and the output (default: MODEL's)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration row for text data")
    p.add_argument("--max-rows", type=int, help="calibration rows used for scoring (width: 64, else 32)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-data", help="MDS data folder with eval/<domain>/: perplexity before and after")
    p.add_argument("--eval-max-rows", type=int, help="eval rows per domain")
    p.add_argument("--out", help="output folder (model.pt, hf/, removed.json)")
    p.add_argument("--overwrite", action="store_true", default=None)
    add_compute_options(p, default=None)
    add_trust_pickle(p, default=None)
    p.set_defaults(func=run)
    return p


def resolve_options(args: argparse.Namespace) -> OneshotOptions:
    """Flags over config-file values over defaults; unknown config keys are an error."""
    command = args.oneshot
    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command", "oneshot", "config", "verbose")}
    if args.config:
        for key, value in read_config(Path(args.config)).items():
            key = KEY_ALIASES.get(key, key)
            if key not in opts:
                near = nearest(key, opts)
                raise UserError(f"{args.config}: unknown key {key!r} for `oneshot {command}`: " +
                                (f"did you mean {near!r}?" if near else f"valid keys are {sorted(opts)}"))
            if opts[key] is None:
                opts[key] = value
    opts = {**COMMAND_DEFAULTS.get(command, {}), **{k: v for k, v in opts.items() if v is not None}}
    for key in ("model", "out"):
        if not opts.get(key):
            raise UserError(f"`oneshot {command}` needs {key.upper() if key == 'model' else '--out'} "
                            "(on the command line or in --config)")
    for key, low in POSITIVE.items():
        value = opts.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise UserError(f"--{key.replace('_', '-')}={value!r} must be an integer >= {low}")
    return OneshotOptions(command=command, **opts)


def read_config(path: Path) -> dict[str, Any]:
    """The mapping in a --config file (JSON by its .json suffix, else YAML); anything else is a UserError."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    import yaml

    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"cannot parse {path}: {' '.join(str(err).split())}; fix the file") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option names to values")
    return data


def run(args: argparse.Namespace) -> None:
    """`drprune oneshot ...`: OUT is checked and a hub:NAME model fetched once before the runner starts."""
    from drprune.atomic import check_output
    from drprune.convert.checkpoint import HUB_PREFIX, resolve_hf_dir
    from drprune.oneshot import runner

    opts = resolve_options(args)
    check_output(opts.out, opts.overwrite, folder=True)
    if str(opts.model).startswith(HUB_PREFIX):  # downloaded once; everything after reads the folder
        opts = dataclasses.replace(opts, model=str(resolve_hf_dir(str(opts.model))))
    for line in getattr(runner, f"run_{args.oneshot}")(opts):
        print(line)
