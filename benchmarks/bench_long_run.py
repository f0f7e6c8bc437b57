"""Long-run stability: RSS over a long tiny pruning run, and checkpoint sizes over time.

    python benchmarks/bench_long_run.py [--steps 2000] [--warmup 200] [--workers 2] [--out DIR]

Runs configs/tiny/prune.yaml (L0 + a DRO mixture over two synthetic domains) in this process through
the real Composer Trainer for --steps batches, checkpointing every --save-every batches (all kept).
Samples the resident memory of this process and of its loader workers every --sample-every batches
and prints RSS over time, the growth from the end of the warm-up to the end of the run (target:
< 5%; medians of the samples around each point, so one allocator burst does not decide it), and the
size of every checkpoint (what grows per step in a checkpoint grows without bound in a long run).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from composer.core import Callback

from drprune.data.testing import write_synthetic_mds
from drprune.train import build_trainer, load_config

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "prune.yaml")
MB = 1024 ** 2


class RssSampler(Callback):
    """(step, seconds, RSS of this process, of its children, of both) every `every` batches."""

    def __init__(self, every: int) -> None:
        self.every, self.rows, self.start = every, [], time.perf_counter()
        self.proc = psutil.Process()

    def batch_end(self, state, logger) -> None:
        step = int(state.timestamp.batch)
        if step % self.every:
            return
        children = sum(c.memory_info().rss for c in self.proc.children(recursive=True) if c.is_running())
        main = self.proc.memory_info().rss
        self.rows.append((step, time.perf_counter() - self.start, main, children, main + children))


def around(rows: list[tuple], step: int, column: int, width: int = 5) -> float:
    """Median of `column` over the `width` samples nearest to `step`."""
    nearest = sorted(rows, key=lambda r: abs(r[0] - step))[:width]
    return statistics.median(r[column] for r in nearest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200, help="batches before the RSS baseline")
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--update-type", default="dro")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-long-run-"))
    data = write_synthetic_mds(out / "data", {"a": "repetitive", "b": "random"}, seq_len=64, vocab_size=49152,
                               n_train=400, n_eval=8)
    save = out / "run"
    cfg = load_config(TINY, [
        f"data_local={data}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
        f"callbacks.data_loading.update_type={args.update_type}", "callbacks.data_loading.reference_loss=[9.0,9.0]",
        f"max_duration={args.steps}ba", f"save_interval={args.save_every}ba", f"eval_interval={args.eval_every}ba",
        "save_num_checkpoints_to_keep=-1", f"train_loader.num_workers={args.workers}", "log_to_console=false",
        f"model.mask_generator.lagrangian_warmup_steps={args.steps // 10}ba"])
    trainer = build_trainer(cfg)
    sampler = RssSampler(args.sample_every)
    trainer.state.callbacks.append(sampler)
    trainer.fit()
    trainer.close()
    rows = sampler.rows

    print(f"{args.steps} steps in {rows[-1][1]:.0f}s; RSS of the trainer process and of its "
          f"{args.workers} loader workers (MB)")
    print(f"{'step':>6}  {'seconds':>8}  {'main':>8}  {'workers':>8}")
    for row in rows[:: max(1, len(rows) // 10)] + [rows[-1]]:
        print(f"{row[0]:6d}  {row[1]:8.0f}  {row[2] / MB:8.1f}  {row[3] / MB:8.1f}")
    warm = min(args.warmup, rows[-1][0])
    for column, label in ((2, "main"), (3, "workers"), (4, "total")):
        base, end = around(rows, warm, column), around(rows, rows[-1][0], column)
        growth = (end - base) / base * 100 if base else float("nan")
        verdict = "ok" if growth < 5 else "ABOVE TARGET"
        print(f"RSS {label:<7} step {warm} -> {rows[-1][0]}: {base / MB:8.1f} -> {end / MB:8.1f} MB "
              f"({growth:+.1f}%, target < 5%: {verdict})")

    ckpts = sorted(save.glob("ep*-ba*-rank0.pt"), key=lambda p: int(p.name.split("-ba")[1].split("-")[0]))
    print(f"\n{'checkpoint':<24}  {'bytes':>12}  {'vs first':>9}")
    for p in ckpts:
        size = p.stat().st_size
        print(f"{p.name:<24}  {size:12d}  {size / ckpts[0].stat().st_size:9.4f}")
    if len(ckpts) > 1:
        steps = int(ckpts[-1].name.split("-ba")[1].split("-")[0]) - int(ckpts[0].name.split("-ba")[1].split("-")[0])
        per_step = (ckpts[-1].stat().st_size - ckpts[0].stat().st_size) / steps
        print(f"checkpoint growth: {per_step:.0f} bytes per step "
              f"({per_step * 1e6 / MB:.1f} MB per million steps)")


if __name__ == "__main__":
    main()
