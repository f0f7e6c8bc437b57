"""`drprune compact CKPT [--out OUT] [--hf DIR]`: pruning checkpoint -> compact Composer checkpoint (+ HF folder)."""
from __future__ import annotations

import argparse
from pathlib import Path

from drprune.cli_options import add_export_options, add_trust_pickle


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `drprune compact` to the sub-commands."""
    p = subparsers.add_parser(
        "compact", help="fold a pruning checkpoint's masks into a smaller model (drop pruned structure)",
        description="Rebuild the mask generator stored in the checkpoint, take its deterministic "
                    "target-size masks, fold them into the weights and write an ordinary checkpoint of the "
                    "smaller model (continued pretraining and `drprune convert composer-to-hf` read it). "
                    "The checkpoint records where it came from, so its HF export gets a model card.",
    )
    p.add_argument("ckpt", help="pruning checkpoint written by a pruning run: a .pt file, or a sharded checkpoint "
                                "folder (fsdp_config.state_dict_type: sharded) or the latest-rank0.pt link to one")
    p.add_argument("--out", help="output checkpoint (default: pruned-<name> beside the input)")
    p.add_argument("--hf", metavar="DIR", help="also export the compact model as a HF folder (with README.md)")
    p.add_argument("--tokenizer", help="with --hf: folder whose tokenizer files are copied into it")
    p.add_argument("--base-model", metavar="HF_DIR_OR_ID",
                   help="with --hf: the source model (hub id or HF folder), named in the card with its license")
    add_export_options(p, "with --hf: ")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --hf) if it exists")
    add_trust_pickle(p)
    p.set_defaults(func=compact)


def compact(args: argparse.Namespace) -> None:
    """`drprune compact`: every flag and output path is checked before the (large) checkpoint is read."""
    from drprune.compact.export import export_checkpoint
    from drprune.atomic import check_output
    from drprune.compact.stream import compact_checkpoint, default_output
    from drprune.errors import UserError

    if args.hf is None and (args.tokenizer or args.base_model or args.dtype or args.context_length is not None):
        raise UserError("--tokenizer, --base-model, --dtype and --context-length describe the HF folder: add --hf DIR")
    if args.context_length is not None and args.context_length < 1:
        raise UserError(f"--context-length={args.context_length} must be >= 1 (the model's context, e.g. 8192)")
    if args.hf is not None and Path(args.hf).exists() and not args.overwrite:
        raise UserError(f"--hf {args.hf} already exists: remove it, choose another folder, or pass --overwrite")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise UserError(f"--tokenizer {args.tokenizer} is not a folder: give the source model's HF folder")
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else default_output(ckpt)
    if out.resolve() == ckpt.resolve():
        raise UserError(f"--out {out} is the input checkpoint: choose another path (the pruning checkpoint is "
                        "needed to compact again)")
    check_output(out, args.overwrite)
    if args.hf is not None:
        check_output(args.hf, args.overwrite, folder=True, what="--hf")
    compact_checkpoint(ckpt, out, overwrite=args.overwrite, trust_pickle=args.trust_pickle)
    if args.hf is not None:
        export_checkpoint(out, args.hf, tokenizer_dir=args.tokenizer, overwrite=args.overwrite,
                          base_model=args.base_model, dtype=args.dtype, context_length=args.context_length)
