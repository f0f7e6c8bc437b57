"""Where and in which dtype `drprune eval` and `drprune oneshot` run a model: `--device` and `--dtype`.

`auto` picks CUDA when torch sees a GPU, in bf16 there (half the memory of fp32, and the GPU's fast
matmul path), and the CPU otherwise, in fp32 (CPUs have no fast bf16 matmul, and fp32 scores are
the ones training's evaluations report). A device the machine does not have is refused before any
model is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from drprune.errors import UserError
from drprune.dtypes import DTYPES

AUTO = "auto"


@dataclass(frozen=True)
class Compute:
    """A resolved device and parameter dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def place(self, module: nn.Module) -> nn.Module:
        """`module` with its parameters in `dtype` on `device`, cast before the move (the device never holds
        an fp32 copy). Buffers keep their dtype: RoPE frequencies rounded to bf16 would shift every
        position's rotation."""
        for param in module.parameters():
            param.data = param.data.to(self.dtype)
        return module.to(self.device)


def resolve_compute(device: str = AUTO, dtype: str = AUTO) -> Compute:
    """The device and dtype `--device`/`--dtype` name; a UserError naming the fix for one this machine lacks."""
    cuda = torch.cuda.is_available()
    name = ("cuda" if cuda else "cpu") if device == AUTO else device
    try:
        where = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if where.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device} is not supported: use auto, cpu, cuda or cuda:N")
    if where.type == "cuda" and not cuda:
        raise UserError(f"--device {device}: torch sees no CUDA device on this machine (no GPU or driver, or a "
                        "CPU-only torch build): use --device cpu, or --device auto to take a GPU when there is one")
    if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dtype != AUTO and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {AUTO}, {', '.join(DTYPES)}")
    chosen = ("bfloat16" if where.type == "cuda" else "float32") if dtype == AUTO else dtype
    return Compute(where, getattr(torch, chosen))
