"""Quality per unit of compute: every candidate at the same token budget, in-domain and held out.

Runs the demo's candidates (source; one-shot selection + continued pretraining; L0 + DRO warm-started
from that selection + continued pretraining) on SmolLM2-135M and the demo corpus at each budget and
for each recipe, then prints one table with 95% bootstrap intervals, the budget of every model
(training tokens, wall and CPU seconds) and the verdicts (overlapping intervals are a tie).

With `--ablate` it also scores the parts of the last arm's one-shot selection one at a time on the
untrained source (layers only, KV groups only, MLP channels only, hidden dims only when the target
prunes them, all), which says what costs held-out text and in-context copying before any training
hides it.

Usage (after `DEMO_INSTALL_ONLY=1 bash scripts/demo.sh`):
    python benchmarks/bench_quality.py --out bench-quality --budgets 36 144 --kd 0 0.5 [--ablate]
Stages are cached in --out (source, data and the one-shot selection are shared by every run), so an
interrupted benchmark resumes where it stopped. `--json FILE` also writes every number; `--tasks
drprune_copy,drprune_cloze` adds lm-eval task scores of every candidate (a table of their own).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

from drprune.demo.cli import parse_target as parse_target_spec
from drprune.demo.compare import fmt, head_to_head
from drprune.demo.options import DemoOptions
from drprune.demo.pipeline import (data_stage, evaluate_model, import_composer_first, oneshot_stage, preflight,
                                   run_candidates, task_scores)
from drprune.demo.report import selection_line, task_rows
from drprune.eval.harness import parse_tasks

MODELS = ("source", "baseline", "pruned")
ABLATIONS = {"layers only": ("layer",), "KV groups only": ("head",), "MLP channels only": ("intermediate",),
             "hidden dims only": ("hidden",), "whole selection": ("layer", "head", "intermediate", "hidden")}


def parse_target(text: str) -> dict[str, int]:
    """'default' (the demo's target) or target overrides as `drprune demo --target` takes them."""
    return {} if text == "default" else parse_target_spec(text)


def ablate(opts: DemoOptions, shared: Path) -> list[list[str]]:
    """Each part of the last arm's one-shot selection (its selection and target) applied alone to the
    source, compacted, evaluated; parts the selection does not prune are skipped."""
    from drprune.compact.fold import compact_decoder
    from drprune.convert.checkpoint import decoder_checkpoint_state, load_decoder, save_checkpoint
    from drprune.masks.base import MaskSet

    data_info = json.loads((shared / data_stage(opts) / "data.json").read_text())
    source = load_decoder(shared / "source" / "model.pt")
    masks = MaskSet.load(shared / oneshot_stage(opts.selection) / "masks.safetensors", source.cfg)
    rows, ckpt = [], shared / "ablation.pt"
    for name, parts in ABLATIONS.items():
        if not any(p in masks for p in parts):
            continue
        part = MaskSet({k: v for k, v in masks.items() if k in parts}).validate(source.cfg)
        save_checkpoint(decoder_checkpoint_state(compact_decoder(source, part)), ckpt, overwrite=True)
        e = evaluate_model(ckpt, shared / data_stage(opts) / "mds", data_info, opts)
        rows.append([name, fmt(e["in_domain"]["geomean"]), fmt(e["held_out"]["geomean"]), fmt(e["copy"], 2)])
        print(" | ".join(rows[-1]), flush=True)
    ckpt.unlink()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-quality"))
    p.add_argument("--budgets", type=int, nargs="+", default=[36, 144], help="training steps per candidate")
    p.add_argument("--kd", type=float, nargs="+", default=[0.0, 0.5], help="distillation weights to compare")
    p.add_argument("--prune-fraction", type=float, default=2 / 3,
                   help="share of the budget the learned candidate spends on L0 masks")
    p.add_argument("--selection", nargs="+", default=["activation"], choices=DemoOptions.SELECTIONS,
                   help="one-shot selections to compare (copy: copy-reading KV groups and blocks protected)")
    p.add_argument("--repeats", type=int, nargs="+", default=[0], choices=[0, 1],
                   help="train without (0) / with (1) the repeats domain")
    p.add_argument("--target", nargs="+", default=["default"],
                   help="target shapes: 'default' (the demo's) or overrides such as "
                        "n_layers=30,n_heads=9,n_kv_heads=3,intermediate_size=576 (width-first)")
    p.add_argument("--mask-lr", type=float, help="the L0 phase's mask learning rate (default: the demo's)")
    p.add_argument("--warm-logit", type=float, help="the L0 warm start's logit magnitude (default: the demo's)")
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--untrained", action="store_true",
                   help="also score each arm's one-shot selection before any training (the compacted source)")
    p.add_argument("--ablate", action="store_true", help="also score each part of the one-shot selection alone")
    p.add_argument("--tasks", help="also score every candidate on these lm-eval tasks, comma-separated "
                                   "(e.g. drprune_copy,drprune_cloze; see `drprune eval --tasks`)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import_composer_first()

    tasks = tuple(parse_tasks(args.tasks)) if args.tasks is not None else ()
    rows, lines, results, task_table = [], [], [], []
    arms = itertools.product(args.budgets, args.kd, args.target, args.selection, args.repeats)
    for budget, kd, target, selection, repeats in arms:
        opts = DemoOptions(out=args.out, steps=budget, prune_steps=max(1, round(budget * args.prune_fraction)),
                           kd=kd, eval_rows=args.eval_rows, tasks=tasks, target=parse_target(target),
                           selection=selection, repeats=bool(repeats), mask_lr=args.mask_lr,
                           warm_logit=args.warm_logit)
        gguf = preflight(opts)
        start = time.perf_counter()
        name = f"budget{budget}-kd{kd:g}" + (f"-{target}" if target != "default" else "") + (
            f"-{selection}" if selection != "activation" else "") + ("-repeats" if repeats else "") + (
            f"-masklr{args.mask_lr:g}" if args.mask_lr is not None else "") + (
            f"-warm{args.warm_logit:g}" if args.warm_logit is not None else "")
        c = run_candidates(opts, gguf, args.out / name, {}, shared=args.out / "shared")
        print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)
        results.append({"budget": budget, "kd": kd, "target": c.target, "selection": selection,
                        "repeats": bool(repeats), "evals": c.evals,
                        "budgets": {m: vars(b) for m, b in c.budgets.items()}})
        shape = target
        for m in MODELS:
            b, e = c.budgets[m], c.evals[m]
            rows.append([str(budget), f"{kd:g}", shape, b.label, f"{b.tokens:,}", f"{b.wall_s:.0f}",
                         f"{b.cpu_s:.0f}", fmt(e["in_domain"]["geomean"]),
                         fmt(e["held_out"]["geomean"]) if e.get("held_out") else "n/a", fmt(e["copy"], 2)])
        if args.untrained:  # the shared selection stage holds this arm's selection until the next arm runs
            data = args.out / "shared" / data_stage(opts) / "mds"
            e = evaluate_model(c.baseline_selection.dir / "compact.pt", data, c.data_info, opts)
            results[-1]["evals"]["untrained"] = e
            rows.append([str(budget), f"{kd:g}", shape, "one-shot selection, no training", "0", "", "",
                         fmt(e["in_domain"]["geomean"]), fmt(e["held_out"]["geomean"]) if e.get("held_out") else "n/a",
                         fmt(e["copy"], 2)])
        changes = json.loads((c.pruned.dir / "history.json").read_text()).get("selection_changes", {})
        results[-1]["selection_changes"] = changes
        lines += [f"{name}:", *head_to_head(c.evals, "pruned", "baseline"), f"- {selection_line(changes)}"]
        if tasks:
            ckpts = {"source": c.source.dir / "model.pt", "baseline": c.baseline_continued.dir / "model.pt",
                     "pruned": c.pruned_continued.dir / "model.pt"}
            scores = task_scores(ckpts, opts, args.out / "shared" / data_stage(opts) / "mds", c.source.dir / "hf")
            results[-1]["tasks"] = scores
            task_table += [[str(budget), f"{kd:g}", *r] for r in task_rows(scores, list(MODELS))]
    if args.ablate:
        print("\n| selection applied to the source (no training) | in-domain ppl | held-out ppl | copying ppl |")
        print("|---|---|---|---|")
        print("\n".join("| " + " | ".join(r) + " |" for r in ablate(opts, args.out / "shared")))
    header = ["budget (steps)", "KD", "shape", "model", "training tokens", "wall s", "CPU s", "in-domain ppl [95% CI]",
              "held-out ppl [95% CI]", "copying ppl [95% CI]"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    print("\n" + "\n".join(lines))
    if task_table:
        header = ["budget (steps)", "KD", "task", "metric", *MODELS]
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        print("\n".join("| " + " | ".join(r) + " |" for r in task_table))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
