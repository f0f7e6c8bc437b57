"""`drprune eval`: per-domain perplexity of a model on MDS eval shards, with 95% bootstrap intervals."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from drprune.cli_options import add_compute_options, add_trust_pickle

if TYPE_CHECKING:
    from drprune.compute import Compute


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `drprune eval` to the sub-commands."""
    p = subparsers.add_parser("eval", help="per-domain perplexity of a HF folder or checkpoint; lm-eval tasks")
    p.add_argument("model", help="HF model folder or drprune/Composer checkpoint")
    p.add_argument("--data", help="MDS data folder (with eval/<domain>/); with --tasks, the held-out text the "
                                  "local tasks are built from (an MDS folder or a folder of .txt files)")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks instead of perplexity, comma-separated: the local "
                                   "pack (drprune_copy, drprune_cloze; from --data, offline) or standard tasks "
                                   "(arc_easy, hellaswag, ...; their datasets are downloaded)")
    p.add_argument("--tokenizer", help="with --tasks: tokenizer folder (needed for a checkpoint)")
    p.add_argument("--task-rows", type=int, default=200, help="with --tasks: items built per local task")
    p.add_argument("--limit", type=int, help="with --tasks: score at most this many items per task")
    p.add_argument("--domains", nargs="*", help="domains to evaluate (default: every folder under eval/)")
    p.add_argument("--split", default="eval")
    p.add_argument("--max-rows", type=int, help="evaluate at most this many sequences per domain")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the copy probe's spans")
    p.add_argument("--copy-probe", action="store_true",
                   help="also score in-context copying (a random span repeated; loss on the second copy)")
    p.add_argument("--copy-span", type=int, default=64,
                   help="copy probe span length (capped to half the model's context length)")
    p.add_argument("--copy-rows", type=int, default=64, help="copy probe rows")
    p.add_argument("--json", help="also write the results to this JSON file (with --tasks: the harness's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_compute_options(p)
    add_trust_pickle(p)
    p.set_defaults(func=run)


def _check_flags(args: argparse.Namespace) -> None:
    """Fail on bad numbers before the (slow) model load."""
    from drprune.errors import UserError

    minimum = {"max_rows": 1, "batch_size": 1, "bootstrap": 1, "copy_rows": 1, "copy_span": 2, "seed": 0,
               "task_rows": 1, "limit": 1}
    for key, low in minimum.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise UserError(f"--{key.replace('_', '-')}={value} must be >= {low}")


def run(args: argparse.Namespace) -> None:
    """`drprune eval`: flags, output path and the data's tokenizer are checked before the (slow) model load."""
    from drprune.atomic import check_output, visible, write_json
    from drprune.compute import resolve_compute
    from drprune.convert.checkpoint import load_any_decoder
    from drprune.data.identity import check_data_tokenizer, model_tokenizer
    from drprune.errors import UserError
    from drprune.eval.perplexity import domain_rows, evaluate_domains

    _check_flags(args)
    compute = resolve_compute(args.device, args.dtype)
    if args.json is not None:
        check_output(args.json, args.overwrite, what="--json")
    if args.tasks is not None:
        return run_harness(args, compute)
    if args.data is None:
        raise UserError("--data is required for perplexity (an MDS folder from `drprune data prepare`)")
    if Path(args.data).is_file():
        raise UserError(f"--data {args.data} is a file: give the folder written by `drprune data prepare`")
    split_dir = Path(args.data) / args.split
    domains = args.domains
    if not domains:
        if not split_dir.is_dir():
            raise UserError(f"{split_dir} does not exist: is --data an MDS folder from `drprune data prepare`?")
        domains = [p.name for p in visible(split_dir) if p.is_dir() and p.name != "eval_merge"]
    if not domains:
        raise UserError(f"no domain folders under {split_dir}")
    check_data_tokenizer(args.data, tokenizer=model_tokenizer(args.model))  # before the (slow) model load
    decoder = compute.place(load_any_decoder(args.model, args.trust_pickle))
    check_data_tokenizer(args.data, vocab_size=decoder.cfg.vocab_size)
    result = evaluate_domains(decoder, args.data, domains, split=args.split, max_rows=args.max_rows,
                              batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed)
    copy = None
    if args.copy_probe:
        import numpy as np

        from drprune.eval.copying import copy_probe, token_pool_of

        span = min(args.copy_span, decoder.cfg.context_length // 2)
        if span != args.copy_span:
            print(f"copy probe span capped to {span} (model context length {decoder.cfg.context_length})")
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
        write_json(args.json, out)


def run_harness(args: argparse.Namespace, compute: Compute) -> None:
    """`--tasks`: the lm-evaluation-harness path (drprune/eval/harness.py); prints the harness's table."""
    from drprune.eval.harness import markdown_tables, parse_tasks, run_tasks, write_results

    results = run_tasks(args.model, parse_tasks(args.tasks), data=args.data, tokenizer=args.tokenizer,
                        rows=args.task_rows, limit=args.limit, batch_size=args.batch_size, bootstrap=args.bootstrap,
                        seed=args.seed, trust_pickle=args.trust_pickle, compute=compute)
    print(markdown_tables(results))
    if args.json:
        write_results(results, args.json)
