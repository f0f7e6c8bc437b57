"""Quality of the one-shot pruners: per-domain perplexity after layer removal and width pruning.

Usage (SmolLM2-135M and the demo corpus, after `drprune convert gguf-to-hf` and `drprune data prepare`):
    python benchmarks/bench_oneshot_quality.py --model smollm2-hf --data demo-mds
Layer removal: 2, 4, 6 blocks by angular distance vs cosine (ShortGPT). Width: the demo's target
widths (KV groups, MLP channels; layers kept) by taylor vs l2 vs activation vs random importance.
Calibration rows come from the train split, perplexity from the eval split (every domain).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from drprune.convert.checkpoint import load_any_decoder
from drprune.eval.perplexity import perplexity, read_token_rows
from drprune.masks.base import MaskSet
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot.calib import load_rows
from drprune.oneshot.layers import layer_masks, select_blocks
from drprune.oneshot.runner import compact, eval_domains
from drprune.oneshot.width import width_prune

DEMO_TARGET = {"num_key_value_heads": 2, "intermediate_size": 1024}  # configs/smollm2/135m.yaml widths


def domain_ppl(decoder: PrunableDecoder, eval_rows: dict[str, np.ndarray], batch_size: int) -> dict[str, float]:
    return {d: perplexity(decoder, rows, batch_size) for d, rows in eval_rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF folder or drprune/Composer checkpoint")
    p.add_argument("--data", required=True, help="MDS root from `drprune data prepare` (train/ and eval/)")
    p.add_argument("--calib-rows", type=int, default=32)
    p.add_argument("--eval-rows", type=int, default=16, help="eval rows per domain")
    p.add_argument("--blocks", type=int, nargs="*", default=[2, 4, 6])
    p.add_argument("--importances", nargs="*", default=["taylor", "l2", "activation", "random"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    decoder = load_any_decoder(args.model).eval()
    calib = load_rows(args.data, tokenizer=None, seq_len=128, max_rows=args.calib_rows)  # MDS: stored length
    eval_rows = {d: read_token_rows(Path(args.data) / "eval" / d, args.eval_rows) for d in eval_domains(args.data)}
    results: list[tuple[str, int, dict[str, float], float]] = []

    def record(name: str, masks: MaskSet | None, started: float) -> None:
        model = decoder if masks is None else compact(decoder, masks)
        results.append((name, model.num_params(), domain_ppl(model, eval_rows, args.batch_size),
                        time.perf_counter() - started))
        print(f"done: {name}", flush=True)

    record("source", None, time.perf_counter())
    for n in args.blocks:
        for method in ("angular", "cosine"):
            t0 = time.perf_counter()
            sel = select_blocks(decoder, calib, num_blocks=n, method=method, batch_size=args.batch_size)
            record(f"-{n} layers {method} {sel.blocks}", layer_masks(decoder.cfg.n_layers, sel.blocks), t0)
    target = ", ".join(f"{k}={v}" for k, v in DEMO_TARGET.items())
    for importance in args.importances:
        t0 = time.perf_counter()
        masks = width_prune(decoder, calib, importance=importance, target=DEMO_TARGET, batch_size=4)
        record(f"width {importance}", masks, t0)

    domains = list(eval_rows)
    name_w = max(len(r[0]) for r in results)
    print(f"\nSource {args.model}; calibration {len(calib)} rows x {calib.shape[1]} tokens; "
          f"eval {args.eval_rows} rows per domain; width target: {target}")
    print(f"{'model':<{name_w}}  {'params':>11}  " + "  ".join(f"{d:>9}" for d in domains) + f"  {'geomean':>9}  {'sec':>6}")
    for name, params, ppl, sec in results:
        mean = float(np.exp(np.mean(np.log(list(ppl.values())))))
        print(f"{name:<{name_w}}  {params:>11,}  " + "  ".join(f"{ppl[d]:9.2f}" for d in domains)
              + f"  {mean:9.2f}  {sec:6.1f}")


if __name__ == "__main__":
    main()
