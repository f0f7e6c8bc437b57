"""`drprune data prepare` and `drprune data merge`."""
from __future__ import annotations

import argparse
from pathlib import Path

from drprune.errors import UserError


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UserError(f"{flag} {item!r} is not NAME=VALUE")
        if name in out:
            raise UserError(f"{flag} {name} given twice")
        out[name] = value
    return out


def _prepare(args: argparse.Namespace) -> int:
    from drprune.data.prepare import prepare, summary_table

    stats = prepare(_pairs(args.domain, "--domain"), args.tokenizer, args.max_seq_len, Path(args.out),
                    eval_fraction=args.eval_fraction, eval_sources=_pairs(args.eval_domain, "--eval-domain"),
                    max_tokens=args.max_tokens, seed=args.seed, text_field=args.text_field,
                    token_width=args.token_width, overwrite=args.overwrite,
                    eval_only=_pairs(args.eval_only_domain, "--eval-only-domain"),
                    repeats_from=args.repeats_from, repeats_name=args.repeats_name)
    print(summary_table(stats))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from drprune.data.prepare import merge

    n = merge(Path(args.input_dir), Path(args.output_dir), args.output_split, args.split_names, args.overwrite)
    print(f"wrote {n} samples to {Path(args.output_dir) / args.output_split}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `drprune data` (prepare, merge) to the sub-commands."""
    parser = subparsers.add_parser("data", help="prepare MDS training data")
    sub = parser.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("prepare", help="tokenize raw text per domain into packed MDS shards")
    p.add_argument("--domain", action="append", metavar="NAME=PATH",
                   help="a training domain (repeatable; at least one): a folder of .txt files, a .txt/.jsonl/.json "
                        "file or a saved HF dataset")
    p.add_argument("--eval-only-domain", action="append", metavar="NAME=PATH",
                   help="a held-out domain (repeatable), same source kinds: all of its text goes to DIR/eval/NAME "
                        "only, never to train/ nor eval/eval_merge; DIR/domains.json lists it under eval_only")
    p.add_argument("--repeats-from", action="append", metavar="DOMAIN",
                   help="also build a synthetic training domain from DOMAIN's train text (repeatable): spans of "
                        "it repeated at a distance within each row, to teach copying; written to DIR/train only")
    p.add_argument("--repeats-name", default="repeats", help="name of that domain (default: repeats)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder or SentencePiece .model")
    p.add_argument("--max-seq-len", type=int, required=True)
    p.add_argument("--out", required=True,
                   help="output folder (DIR/train/NAME, DIR/eval/NAME, DIR/eval/eval_merge, DIR/domains.json)")
    p.add_argument("--eval-fraction", type=float, default=0.01, help="documents held out for eval (default 0.01)")
    p.add_argument("--eval-domain", action="append", metavar="NAME=PATH",
                   help="take NAME's eval data from PATH instead of holding out")
    p.add_argument("--max-tokens", type=int, default=None, help="train-token budget per domain")
    p.add_argument("--seed", type=int, default=0, help="seed of the eval holdout and of the repeats domain")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.json/HF dataset rows")
    p.add_argument("--token-width", choices=("auto", "uint16", "uint32"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_prepare)

    m = sub.add_parser("merge", help="concatenate MDS splits into one (e.g. eval_merge)")
    m.add_argument("--input-dir", required=True)
    m.add_argument("--output-dir", required=True)
    m.add_argument("--output-split", required=True)
    m.add_argument("--split-names", nargs="+", required=True)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=_merge)
