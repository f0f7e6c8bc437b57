"""`drprune eval`: per-domain perplexity of a model on MDS eval shards, with 95% bootstrap intervals."""
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
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the copy probe's spans")
    p.add_argument("--copy-probe", action="store_true",
                   help="also score in-context copying (a random span repeated; loss on the second copy)")
    p.add_argument("--copy-span", type=int, default=64,
                   help="copy probe span length (capped to half the model's max_seq_len)")
    p.add_argument("--copy-rows", type=int, default=64, help="copy probe rows")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=run)


def _check_flags(args: argparse.Namespace) -> None:
    """Fail on bad numbers before the (slow) model load."""
    from drprune.errors import UserError

    minimum = {"max_rows": 1, "batch_size": 1, "bootstrap": 1, "copy_rows": 1, "copy_span": 2, "seed": 0}
    for key, low in minimum.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise UserError(f"--{key.replace('_', '-')}={value} must be >= {low}")


def run(args: argparse.Namespace) -> None:
    from drprune.convert.checkpoint import load_any_decoder
    from drprune.errors import UserError
    from drprune.eval.perplexity import domain_rows, evaluate_domains

    _check_flags(args)
    split_dir = Path(args.data) / args.split
    domains = args.domains
    if not domains:
        if not split_dir.is_dir():
            raise UserError(f"{split_dir} does not exist: is --data an MDS folder from `drprune data prepare`?")
        domains = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name != "eval_merge")
    if not domains:
        raise UserError(f"no domain folders under {split_dir}")
    decoder = load_any_decoder(args.model)
    result = evaluate_domains(decoder, args.data, domains, split=args.split, max_rows=args.max_rows,
                              batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed)
    copy = None
    if args.copy_probe:
        import numpy as np

        from drprune.eval.copying import copy_probe, token_pool_of

        span = min(args.copy_span, decoder.cfg.max_seq_len // 2)
        if span != args.copy_span:
            print(f"copy probe span capped to {span} (model max_seq_len {decoder.cfg.max_seq_len})")
        rows = [domain_rows(decoder, args.data, d, split=args.split, max_rows=args.max_rows) for d in domains]
        pool = token_pool_of(np.concatenate([r.ravel() for r in rows]))
        copy = copy_probe(decoder, pool, rows=args.copy_rows, span=span, seed=args.seed,
                          batch_size=args.batch_size, n_boot=args.bootstrap)

    labels = list(result.domains) + ["geomean"] + (["copy probe"] if copy is not None else [])
    width = max(len(label) for label in labels + ["domain"])
    print(f"{'domain':<{width}}  {'perplexity':>10}  {'95% interval':>21}  {'rows':>6}")
    scores = [*result.domains.values(), result.geomean] + ([copy] if copy is not None else [])
    for label, s in zip(labels, scores):
        interval = f"[{s.lo:.3f}, {s.hi:.3f}]"
        print(f"{label:<{width}}  {s.ppl:10.3f}  {interval:>21}  {s.rows:6d}")
    if args.json:
        out = result.to_dict()
        if copy is not None:
            out["copy"] = copy.to_dict()
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
