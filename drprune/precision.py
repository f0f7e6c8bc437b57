"""Which precision a run computes in, and the fp32 island the pruning state lives on.

Composer 0.32 refuses any precision but fp32 on its CPU device and its autocast context does nothing
there, so on a machine without CUDA drprune applies torch's CPU autocast itself (`PrunableLM`'s
`cpu_autocast`): `precision: amp_bf16` is bf16 everywhere, never a silent fp32 run.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from drprune.errors import ConfigError

AUTOCAST_DEVICES = ("cpu", "cuda")


def resolve_precision(precision: str, cuda: bool) -> tuple[str, torch.dtype | None]:
    """(the precision to hand Composer, the CPU autocast dtype drprune applies itself or None).

    With CUDA, Composer's own autocast does everything. On CPU, amp_bf16 is torch's CPU bf16
    autocast under Composer's fp32; amp_fp16 is refused because fp16 training needs a loss scaler,
    which Composer only builds for CUDA (unscaled fp16 gradients underflow); amp_fp8 needs
    TransformerEngine on a GPU.
    """
    if precision == "fp32" or cuda:
        return precision, None
    if precision == "amp_bf16":
        return "fp32", torch.bfloat16
    if precision == "amp_fp16":
        raise ConfigError("precision=amp_fp16 needs a GPU (fp16 needs a loss scaler, which Composer only has on "
                          "CUDA); on CPU use precision=amp_bf16 (bf16 autocast) or precision=fp32")
    raise ConfigError(f"precision={precision} needs a GPU (this machine has no CUDA); on CPU use "
                      "precision=amp_bf16 (bf16 autocast) or precision=fp32")


def cpu_autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch's CPU autocast to `dtype`, or nothing when dtype is None (fp32, or CUDA: Composer's own)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


@contextlib.contextmanager
def fp32_region() -> Iterator[None]:
    """Autocast off on every device where it is on, so the code inside runs in its parameters' fp32.

    Mask logits, hard-concrete and Gumbel sampling, the Lagrangian and the hypernetwork are small and
    sensitive: a bf16 sigmoid of a logit near the keep threshold flips masks, and bf16 rounding of
    expected sparsity stalls the multipliers. One context for CPU (drprune's autocast) and CUDA
    (Composer's).
    """
    with contextlib.ExitStack() as stack:
        for device in AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
