"""Hypernetwork training masks, `soft` (DISP-LLM) vs `hard_st`: final budget error and perplexity.

    python benchmarks/bench_hypernetwork_masks.py tiny [--steps 60]
    python benchmarks/bench_hypernetwork_masks.py smollm2 --model SOURCE.pt --data MDS_ROOT [--steps 40]

`tiny` trains the tiny config (random init, synthetic data: a repetitive and a random domain);
`smollm2` the demo's pruning config on a converted SmolLM2-135M checkpoint and a prepared MDS root
(the demo writes both: WORK/source/model.pt and WORK/data/mds). Each mode gets the same steps, seed,
data and target. The perplexity is the hard-masked model's on the eval loader (the pruning callback's
`mask_report.json`), which is the exported model's: compaction keeps its logits within 1e-5.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("soft", "hard_st")


def overrides(args: argparse.Namespace, save: Path, mode: str) -> tuple[str, list[str]]:
    common = [f"save_folder={save}", "model.mask_generator.name=hypernetwork",
              f"model.mask_generator.target_ratio={args.target}", f"model.mask_generator.train_masks={mode}",
              f"max_duration={args.steps}ba", f"eval_interval={args.steps}ba", f"save_interval={args.steps}ba",
              "callbacks.data_loading.dynamic=false", f"model.mask_generator.lr={args.lr}"]
    if args.setting == "tiny":
        from drprune.data.testing import write_synthetic_mds

        data = save.parent / "data"
        if not data.exists():
            write_synthetic_mds(data, {"a": "repetitive", "b": "random"}, seq_len=64, vocab_size=49152,
                                n_train=40 * args.steps, n_eval=16)
        return str(ROOT / "configs/tiny/prune.yaml"), [f"data_local={data}",
                                                       "callbacks.data_loading.set_names=[a,b]", *common]
    domains = sorted(p.name for p in (Path(args.data) / "train").iterdir() if p.is_dir())
    return str(ROOT / "configs/demo/prune.yaml"), [
        f"model.path={args.model}", f"data_local={args.data}",
        f"callbacks.data_loading.set_names=[{','.join(domains)}]",
        "model.mask_generator.lagrangian_warmup_steps=0ba", "model.mask_generator.target_model={}",
        "eval_subset_num_batches=4", f"callbacks.data_loading.reference_loss=[{','.join(['0'] * len(domains))}]",
        "callbacks.data_loading.update_type=constant", *common]


def run(args: argparse.Namespace, mode: str, work: Path) -> dict[str, float]:
    from drprune.train import build_trainer, load_config

    save = work / mode
    config, extra = overrides(args, save, mode)
    start = time.perf_counter()
    trainer = build_trainer(load_config(config, extra))
    trainer.fit()
    trainer.close()
    report = json.loads((save / "mask_report.json").read_text())
    return {"target": report["target_params"], "kept": report["kept_params"],
            "error": report["kept_params"] / report["target_params"] - 1, "ppl": report["perplexity"],
            "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", choices=("tiny", "smollm2"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-2, help="hypernetwork learning rate (DISP-LLM: 1e-3 over "
                        "far more steps; 1e-3 did not move SmolLM2's masks in 20 steps)")
    parser.add_argument("--target", type=float, default=0.5, help="kept fraction of non-embedding parameters")
    parser.add_argument("--model", help="smollm2: converted source checkpoint")
    parser.add_argument("--data", help="smollm2: prepared MDS root (train/ and eval/)")
    args = parser.parse_args()
    if args.setting == "smollm2" and not (args.model and args.data):
        parser.error("smollm2 needs --model and --data (the demo's WORK/source/model.pt and WORK/data/mds)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for mode in MODES:  # each printed as it finishes, so a cut-short run still reports
            rows[mode] = run(args, mode, Path(tmp))
            print(f"done: {mode}: {rows[mode]}", flush=True)
    print(f"\n{args.setting}: {args.steps} steps, target {args.target:.0%} of non-embedding parameters")
    print("| train_masks | target params | kept params | budget error | ppl (hard masks = export) | seconds |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['target']:,} | {r['kept']:,.0f} | {r['error']:+.2%} | {r['ppl']:.2f} "
              f"| {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
