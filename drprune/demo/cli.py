"""`drprune demo`: one command, sensible defaults; see drprune/demo/pipeline.py for the chain."""
from __future__ import annotations

import argparse
from pathlib import Path

from drprune.errors import UserError


def parse_target(text: str) -> dict[str, int]:
    """'n_layers=24,n_kv_heads=2' -> {"n_layers": 24, "n_kv_heads": 2}."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--target item {item!r} is not key=integer")
        out[key.strip()] = int(value)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `drprune demo`; flag defaults come from DemoOptions so the CLI and the library agree."""
    from drprune.demo.options import DemoOptions
    from drprune.dtypes import DTYPES

    d = DemoOptions(out=Path("demo-out"))
    p = subparsers.add_parser(
        "demo", help="end-to-end demo: prune SmolLM2-135M, equal-budget comparison with held-out domains, on CPU",
        description="GGUF -> HF -> Composer; corpus -> MDS (training and held-out domains); a one-shot "
                    "selection; two candidates at the same token budget (the selection + continued "
                    "pretraining; L0 + DRO masks warm-started from it + continued pretraining), both "
                    "distilling from the source; in-domain, held-out and copying-probe perplexity with 95% "
                    "intervals, samples, speed; report in --out (report.md, summary.json, plots/, hf/).")
    p.add_argument("--out", type=Path, default=d.out, help="output folder; an earlier run's valid stages are reused")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="training budget of every candidate, in batches (the learned model's pruning steps count)")
    p.add_argument("--prune-steps", type=int,
                   help="steps of the budget the learned model spends on L0 masks (default: 2/3 of --steps)")
    p.add_argument("--kd", type=float, default=d.kd,
                   help="weight of distillation from the source model in every training run, in [0, 1] (0: none)")
    p.add_argument("--target", type=parse_target, default={},
                   help="target shape overrides, e.g. n_layers=24,n_heads=6,n_kv_heads=2,intermediate_size=1024 "
                        "(default: about half the non-embedding parameters, 90%% of layers, 2/3 of KV groups and "
                        "the MLP channels that fit: 27 layers, 2 KV groups, MLP 864 on SmolLM2-135M); "
                        "d_model=448 also prunes "
                        "hidden dims (width-first: n_layers=30,n_kv_heads=3,d_model=448,intermediate_size=896)")
    p.add_argument("--selection", choices=DemoOptions.SELECTIONS, default=d.selection,
                   help="one-shot selection both candidates start from: activation importance, copy (the KV "
                        "groups and blocks the model copies from its context with are protected first) or "
                        "copy-heads (the KV groups only)")
    p.add_argument("--mask-lr", type=float, default=d.mask_lr,
                   help="learning rate of the L0 mask logits and Lagrange multipliers in the learned model's "
                        "pruning phase (default: configs/demo/prune.yaml's lag_lr 0.1, at which the warm-started "
                        "masks keep the one-shot selection; the report counts the units that changed)")
    p.add_argument("--warm-logit", type=float, default=d.warm_logit,
                   help="logit magnitude the learned model's masks start from (kept units +v, dropped -v; default "
                        "4.6, which 24 steps at the default --mask-lr cannot move across; e.g. 2 lets them swap "
                        "units)")
    p.add_argument("--repeats", action=argparse.BooleanOptionalAction, default=d.repeats,
                   help="also train every candidate on a repeats domain (spans of the training text repeated "
                        "within a row, built by `data prepare --repeats-from`; never evaluated). On by default: "
                        "copying 839 -> 311 for +2.7%% in-domain perplexity (docs/quality.md)")
    p.add_argument("--gguf", type=Path, help="another llama-family GGUF model instead of SmolLM2-135M-Instruct")
    p.add_argument("--corpus", type=Path, default=d.corpus, help="corpus YAML (domains -> files/globs)")
    p.add_argument("--source-layers", type=int, help="keep only the first N layers of the source (quick looks, tests)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-rows", type=int, default=d.eval_rows,
                   help="eval sequences per domain (all of them when fewer)")
    p.add_argument("--copy-rows", type=int, default=d.copy_rows, help="rows of the in-context copying probe")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", choices=DTYPES,
                   help="dtype of the exported models (OUT/hf; default: the source's, float32 as de-quantized from "
                        "the GGUF; bfloat16 halves the folder)")
    p.add_argument("--tasks", help="also score every model on these lm-eval tasks, comma-separated (as `drprune eval "
                                   "--tasks`: drprune_copy, drprune_cloze, or standard tasks on a connected machine)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """`drprune demo`: run the pipeline, then print the comparison, sizes, costs and where the report is."""
    from drprune.demo.options import DemoOptions
    from drprune.demo.pipeline import run_demo
    from drprune.demo.report import comparison_table
    from drprune.eval.harness import parse_tasks

    if not args.corpus.is_file():
        raise UserError(f"corpus config {args.corpus} does not exist (pass --corpus FILE)")
    opts = DemoOptions(out=args.out, steps=args.steps, prune_steps=args.prune_steps, kd=args.kd,
                       target=args.target, source_layers=args.source_layers, gguf=args.gguf, corpus=args.corpus,
                       seq_len=args.seq_len, batch_size=args.batch_size, eval_rows=args.eval_rows,
                       copy_rows=args.copy_rows, seed=args.seed, dtype=args.dtype, selection=args.selection,
                       repeats=args.repeats, mask_lr=args.mask_lr, warm_logit=args.warm_logit,
                       tasks=tuple(parse_tasks(args.tasks)) if args.tasks is not None else ())
    s = run_demo(opts)
    print("\n" + comparison_table(s))
    params = s["parameters"]
    print(f"parameters: source {params['source']['total'] / 1e6:.1f}M -> pruned {params['pruned']['total'] / 1e6:.1f}M "
          f"(non-embedding {params['source']['non_embedding'] / 1e6:.1f}M -> "
          f"{params['pruned']['non_embedding'] / 1e6:.1f}M)")
    print(f"report: {args.out / 'report.md'}   model: {args.out / 'hf'}")
    print(f"total {s['total_seconds']:.0f}s wall ({s['cpu_seconds']:.0f}s CPU), "
          f"peak memory {s['peak_memory_gb']:.2f} GB")
