"""Time of a pruning training step (L0 masks on every module) over a plain training step.

    python benchmarks/bench_prune_step.py [--device cpu|cuda] [--steps N]

Both steps run forward, loss, backward and an optimizer step on the same ~50M-parameter model and
the same batch, interleaved so machine noise hits both alike. Target ratio: <= 1.15.
"""
from __future__ import annotations

import statistics
import time

import torch
from composer.optim import DecoupledAdamW

from drprune.masks.l0 import L0MaskGenerator
from drprune.models.composer_model import PrunableLM
from drprune.models.config import ModelConfig
from step_setup import step_setup

CFG = dict(family="llama", vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
           intermediate_size=1408, context_length=256)
TARGET = dict(d_model=384, n_heads=4, n_layers=6, intermediate_size=704)


def make(masked: bool, device: str, dtype: torch.dtype) -> tuple[PrunableLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = ModelConfig(**CFG)
    gen = L0MaskGenerator(cfg, ["head", "head_layer", "mlp", "layer", "intermediate", "hidden"], TARGET,
                          lagrangian_warmup_steps=10) if masked else None
    model = PrunableLM(cfg, gen).to(device=device, dtype=dtype).train()
    return model, DecoupledAdamW(model.param_groups(lr=1e-4, weight_decay=0.0, lag_lr=1.0), lr=1e-4)


def step(model: PrunableLM, opt: torch.optim.Optimizer, batch: dict, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model.loss(model(batch), batch)["total"]
    loss.backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args, dtype, batch = step_setup(__doc__, 8, CFG["vocab_size"])
    runs = {name: make(name == "pruning", args.device, dtype) for name in ("plain", "pruning")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps + 2):
        for name, (model, opt) in runs.items():
            t = step(model, opt, batch, args.device)
            if i >= 2:  # warm-up steps excluded
                times[name].append(t)
    params = runs["plain"][0].model.num_params() / 1e6
    plain, pruning = statistics.median(times["plain"]), statistics.median(times["pruning"])
    print(f"device={args.device} dtype={dtype} params={params:.1f}M batch={args.batch}x{args.seq_len}")
    print(f"{'step':<10}{'median s':>12}")
    print(f"{'plain':<10}{plain:>12.4f}")
    print(f"{'pruning':<10}{pruning:>12.4f}")
    print(f"ratio pruning/plain = {pruning / plain:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
