"""`drprune eval`: per-domain perplexity of a model on MDS eval shards."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="per-domain perplexity of a HF folder or checkpoint")
    p.add_argument("model", help="HF model folder or drprune/Composer checkpoint")
    p.add_argument("--data", required=True, help="MDS data folder (with eval/<domain>/)")
    p.add_argument("--domains", nargs="*", help="domains to evaluate (default: every folder under eval/)")
    p.add_argument("--split", default="eval")
    p.add_argument("--max-rows", type=int, help="evaluate at most this many sequences per domain")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from drprune.convert.checkpoint import load_any_decoder
    from drprune.errors import UserError
    from drprune.eval.perplexity import domain_perplexity

    split_dir = Path(args.data) / args.split
    domains = args.domains
    if not domains:
        if not split_dir.is_dir():
            raise UserError(f"{split_dir} does not exist: is --data an MDS folder from `drprune data prepare`?")
        domains = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name != "eval_merge")
    if not domains:
        raise UserError(f"no domain folders under {split_dir}")
    decoder = load_any_decoder(args.model)
    result = domain_perplexity(decoder, args.data, domains, split=args.split, max_rows=args.max_rows,
                               batch_size=args.batch_size)
    width = max(len(d) for d in result)
    print(f"{'domain':<{width}}  perplexity")
    for domain, ppl in result.items():
        print(f"{domain:<{width}}  {ppl:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
