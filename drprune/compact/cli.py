"""`drprune compact CKPT [--out OUT]`: pruning checkpoint -> compact Composer checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compact", help="fold a pruning checkpoint's masks into a smaller model (drop pruned structure)",
        description="Rebuild the mask generator stored in the checkpoint, take its deterministic "
                    "target-size masks, fold them into the weights and write an ordinary checkpoint of the "
                    "smaller model (continued pretraining and `drprune convert composer-to-hf` read it).",
    )
    p.add_argument("ckpt", help="pruning checkpoint (.pt) written by a pruning run")
    p.add_argument("--out", help="output checkpoint (default: pruned-<name> beside the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=compact)


def compact(args: argparse.Namespace) -> None:
    from drprune.compact.stream import compact_checkpoint, default_output

    ckpt = Path(args.ckpt)
    compact_checkpoint(ckpt, Path(args.out) if args.out else default_output(ckpt), overwrite=args.overwrite)
