"""Quality of the one-shot pruners: per-domain perplexity after layer removal and width pruning.

Usage (SmolLM2-135M and the demo corpus, after `drprune convert gguf-to-hf` and `drprune data prepare`):
    python benchmarks/bench_oneshot_quality.py --model smollm2-hf --data demo-mds [--json out.json]
Layer removal: 2, 4, 6 blocks by angular distance vs cosine (ShortGPT), each scoring the last token
(Gromov et al., PruneGPT) or every token (drprune's default). Width: the demo's target widths (KV
groups, MLP channels; layers kept) by taylor (element and vector) vs l2 vs activation vs random
importance; then an LLM-Pruner-style pruning_ratio by taylor with its default layer range (first 4
and last 2 blocks kept) and over every layer. Calibration rows come from the train split, dealt
round-robin across domains; perplexity from the eval split (every domain, held-out ones included),
with 95% bootstrap intervals over rows. Models that remove the same structures are scored once.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drprune.convert.checkpoint import load_any_decoder
from drprune.eval.perplexity import read_token_rows, row_losses
from drprune.eval.stats import bootstrap_geomean, bootstrap_ppl
from drprune.masks.base import MaskSet
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot.calib import load_rows
from drprune.oneshot.layers import layer_masks, select_blocks
from drprune.oneshot.runner import compact, eval_domains
from drprune.oneshot.width import width_prune

DEMO_TARGET = {"num_key_value_heads": 2, "intermediate_size": 1024}  # configs/smollm2/135m.yaml widths
RATIO = 1 / 3  # the same fraction of KV groups and channels as DEMO_TARGET, in the layers it covers


def score(model: PrunableDecoder, eval_rows: dict[str, np.ndarray], batch_size: int) -> dict[str, Any]:
    losses = {d: row_losses(model, rows, batch_size) for d, rows in eval_rows.items()}
    geo = bootstrap_geomean(losses)
    return {"params": model.num_params(), "domains": {d: bootstrap_ppl(*v).ppl for d, v in losses.items()},
            "geomean": [geo.ppl, geo.lo, geo.hi]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF folder or drprune/Composer checkpoint")
    p.add_argument("--data", required=True, help="MDS root from `drprune data prepare` (train/ and eval/)")
    p.add_argument("--calib-rows", type=int, default=64)
    p.add_argument("--eval-rows", type=int, default=64, help="eval rows per domain")
    p.add_argument("--blocks", type=int, nargs="*", default=[2, 4, 6])
    p.add_argument("--importances", nargs="*", default=["taylor", "taylor-vector", "activation", "l2", "random"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--resume", help="a --json file of an earlier cut-short run: its models are not scored again")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    decoder = load_any_decoder(args.model).eval()
    calib = load_rows(args.data, tokenizer=None, seq_len=128, max_rows=args.calib_rows)  # MDS: stored length
    eval_rows = {d: read_token_rows(Path(args.data) / "eval" / d, args.eval_rows) for d in eval_domains(args.data)}
    results: list[dict[str, Any]] = []
    earlier = {r["name"]: r for r in json.loads(Path(args.resume).read_text())} if args.resume else {}
    cache: dict[tuple, dict[str, Any]] = {}

    def record(name: str, masks: MaskSet | None, started: float) -> None:
        key = tuple(sorted((k, tuple(v.flatten().tolist())) for k, v in (masks or {}).items()))
        if name in earlier and key not in cache:
            cache[key] = {k: earlier[name][k] for k in ("params", "domains", "geomean")}
        if key not in cache:
            cache[key] = score(decoder if masks is None else compact(decoder, masks), eval_rows, args.batch_size)
        results.append({"name": name, **cache[key], "seconds": time.perf_counter() - started})
        print(f"done: {name}: geomean {results[-1]['geomean'][0]:.1f}", flush=True)
        if args.json:  # after every model, so a long run can be read (or resumed by hand) part way
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    record("source", None, time.perf_counter())
    n_layers = decoder.cfg.n_layers
    every_layer = {"block_attention_layer_start": 0, "block_attention_layer_end": n_layers,
                   "block_mlp_layer_start": 0, "block_mlp_layer_end": n_layers}

    def layers(n: int) -> None:
        for method in ("angular", "cosine"):
            for token in ("last", "all"):
                t0 = time.perf_counter()
                sel = select_blocks(decoder, calib, num_blocks=n, method=method, token=token,
                                    batch_size=args.batch_size)
                record(f"-{n} layers {method} {token} {sel.blocks}", layer_masks(n_layers, sel.blocks), t0)

    def width(importance: str) -> None:
        t0 = time.perf_counter()
        name, mode = importance.split("-") if "-" in importance else (importance, "element")
        masks = width_prune(decoder, calib, importance=name, target=DEMO_TARGET, taylor_mode=mode, batch_size=4)
        record(f"width {importance}", masks, t0)

    def ratio(label: str, target: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        record(label, width_prune(decoder, calib, importance="taylor", target=target, batch_size=4), t0)

    # Most informative first: the JSON is rewritten after every model, so a cut-short run still reports.
    blocks = list(args.blocks)
    layers(blocks[len(blocks) // 2])
    width(args.importances[0])
    ratio("taylor ratio, layers 4..n-2 (default)", {"pruning_ratio": RATIO})
    ratio("taylor ratio, every layer", {"pruning_ratio": RATIO, **every_layer})
    for importance in args.importances[1:]:
        width(importance)
    for n in blocks[:len(blocks) // 2] + blocks[len(blocks) // 2 + 1:]:
        layers(n)
    domains = list(eval_rows)
    target = ", ".join(f"{k}={v}" for k, v in DEMO_TARGET.items())
    print(f"\nSource {args.model}; calibration {len(calib)} rows x {calib.shape[1]} tokens (round-robin over "
          f"domains); eval {args.eval_rows} rows per domain; width target: {target}; ratio {RATIO:.3f}\n")
    print("| model | params | " + " | ".join(domains) + " | geomean [95% CI] | sec |")
    print("|---" * (len(domains) + 4) + "|")
    for r in results:
        g = r["geomean"]
        print(f"| {r['name']} | {r['params']:,} | " + " | ".join(f"{r['domains'][d]:.1f}" for d in domains)
              + f" | {g[0]:.1f} [{g[1]:.1f}, {g[2]:.1f}] | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
