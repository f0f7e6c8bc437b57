"""What the training-step benchmarks share: their flags, the dtype for the device and a random batch."""
from __future__ import annotations

import argparse
from typing import Any

import torch


def step_setup(doc: str, steps: int, vocab_size: int) -> tuple[argparse.Namespace, torch.dtype, dict[str, Any]]:
    """Parse --device/--steps/--batch/--seq-len; bf16 on a GPU (as under amp), fp32 on a CPU."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    ids = torch.randint(0, vocab_size, (args.batch, args.seq_len), device=args.device)
    return args, dtype, {"input_ids": ids, "labels": ids}
