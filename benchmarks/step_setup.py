"""What the training-step benchmarks share: their flags, the dtype for the device and a random batch."""
from __future__ import annotations

import argparse
from typing import Any

import torch


def step_parser(doc: str, steps: int) -> argparse.ArgumentParser:
    """The shared flags --device/--steps/--batch/--seq-len; a benchmark adds its own before parsing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    return parser


def random_batch(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """A [batch, seq_len] batch of random token ids on args.device, its own labels."""
    ids = torch.randint(0, vocab_size, (args.batch, args.seq_len), device=args.device)
    return {"input_ids": ids, "labels": ids}


def step_setup(doc: str, steps: int, vocab_size: int) -> tuple[argparse.Namespace, torch.dtype, dict[str, Any]]:
    """Parse the shared flags; bf16 on a GPU (as under amp), fp32 on a CPU."""
    args = step_parser(doc, steps).parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return args, dtype, random_batch(args, vocab_size)
