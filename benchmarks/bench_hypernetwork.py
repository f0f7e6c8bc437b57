"""Time of a hypernetwork training step over plain inference+backward of the same frozen model.

    python benchmarks/bench_hypernetwork.py [--device cpu|cuda] [--steps N]

Both steps run the frozen ~50M-parameter model forward, the loss and a backward that reaches the
first layer, on the same batch. The plain step gets its gradient path from an embedding output that
requires grad; the hypernetwork step gets it from the masks, and adds the GRU pass, the budget loss
and an optimizer step on the hypernetwork. Steps are interleaved so machine noise hits both alike.
Target ratio: <= 1.2.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from composer.optim import DecoupledAdamW
from torch import Tensor, nn

from drprune.masks.hypernetwork import HypernetworkMaskGenerator
from drprune.models.composer_model import PrunableLM
from drprune.models.config import ModelConfig
from step_setup import step_setup

CFG = dict(family="llama", vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
           intermediate_size=1408, context_length=256)


def timed(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def plain_step(model: PrunableLM, batch: dict[str, Tensor]) -> Callable[[], None]:
    """Frozen model; the embedding output requires grad so backward runs through every layer."""
    def grad_from_embedding(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return out.detach().requires_grad_(True)

    model.model.transformer["wte"].register_forward_hook(grad_from_embedding)

    def step() -> None:
        model.loss(model(batch), batch)["total"].backward()

    return step


def hypernetwork_step(model: PrunableLM, batch: dict[str, Tensor]) -> Callable[[], None]:
    opt = DecoupledAdamW(model.param_groups(lr=1e-4, weight_decay=0.0, lag_lr=1.0), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(model(batch), batch)["total"].backward()
        opt.step()

    return step


def main() -> None:
    args, dtype, batch = step_setup(__doc__, 10, CFG["vocab_size"])
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    plain = PrunableLM(cfg).to(device=args.device, dtype=dtype).train().requires_grad_(False)
    gen = HypernetworkMaskGenerator(cfg, target_ratio=0.5)
    hyper = PrunableLM(cfg, gen).to(device=args.device).train()
    hyper.model.to(dtype)  # the LLM in bf16 as under amp; the small hypernetwork stays fp32
    hyper.model.load_state_dict(plain.model.state_dict())
    steps = {"plain": plain_step(plain, batch), "hypernetwork": hypernetwork_step(hyper, batch)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps + 3):
        for name, step in steps.items():
            t = timed(step, args.device)
            if i >= 3:  # warm-up steps excluded
                times[name].append(t)
    base, ours = statistics.median(times["plain"]), statistics.median(times["hypernetwork"])
    print(f"device={args.device} dtype={dtype} llm params={plain.model.num_params() / 1e6:.1f}M "
          f"hypernetwork params={sum(p.numel() for p in gen.parameters()) / 1e6:.2f}M "
          f"batch={args.batch}x{args.seq_len}")
    print(f"{'step':<14}{'median s':>12}")
    print(f"{'plain':<14}{base:>12.4f}")
    print(f"{'hypernetwork':<14}{ours:>12.4f}")
    print(f"ratio hypernetwork/plain = {ours / base:.3f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
