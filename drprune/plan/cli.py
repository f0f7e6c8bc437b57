"""`drprune plan CONFIG [key=value ...] [--gpus N] [--nodes M] [--gpu-mem GiB]`: will a run fit, how long is a step.

Exit codes: 0 the run fits, 1 it does not (the plan says which term is too large and what to change),
2 bad input (as every drprune command).
"""
from __future__ import annotations

import argparse

NOT_FIT_EXIT = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `drprune plan` to the sub-commands."""
    p = subparsers.add_parser(
        "plan", help="per-rank memory and step time of a run config on a cluster (does it fit?)",
        description="Read a run config as training reads it and print, per rank, the memory of weights, gradients, "
                    "optimizer state, mask generator, teacher, activations (with and without checkpointing) and "
                    "logits, the peak over a step's phases, an estimated step time from the FLOPs, and what to "
                    "change when the peak does not fit. Exit code 0: fits; 1: does not fit; 2: bad input.",
    )
    p.add_argument("config", help="run config (YAML), as for training (e.g. configs/llama3/8b.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dot-list overrides as for training (e.g. model.path=ckpt.pt device_train_microbatch_size=2); "
                        "keys a plan does not need (data_local, save_folder, ...) may stay ???")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GiB", help="memory per GPU (default 80)")
    p.add_argument("--reserve", type=float, metavar="GiB",
                   help="memory per GPU not available to tensors: CUDA context, NCCL buffers, allocator slack "
                        "(default 2 on cuda, 0 on cpu)")
    p.add_argument("--gpu-tflops", type=float, default=989.0,
                   help="peak TFLOPS per GPU in the run's precision (default 989: H100 SXM bf16 dense)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="plan for GPUs (default) or a CPU run (torch's CPU attention kernels; --gpu-mem is then "
                        "host memory)")
    p.add_argument("--target-params", type=float, metavar="N",
                   help="also turn a parameter budget (embeddings included, e.g. 1.3e9) into an engine-friendly L0 "
                        "target shape: widths in multiples of 64, heads in whole KV groups")
    p.add_argument("--target-layers", type=int, metavar="L",
                   help="with --target-params: keep this many layers (default: width first, layers only if needed)")
    p.set_defaults(func=plan)
    _overrides_anywhere(p)


def _overrides_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let key=value overrides follow the options too (`plan CFG --gpus 8 key=value`), as argparse's
    intermixed parsing does; the sub-command action calls `parse_known_args`, so that is what changes."""
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):  # noqa: ANN001, ANN202 - argparse's own signature
        parser.parse_known_args = plain  # the intermixed parser calls parse_known_args itself
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = parse_known_args

    parser.parse_known_args = parse_known_args


def plan(args: argparse.Namespace) -> int:
    """`drprune plan`: prints the plan; exit code 1 when it does not fit."""
    from drprune.errors import UserError
    from drprune.plan.planner import Hardware, plan_run
    from drprune.plan.report import format_plan

    if args.target_layers is not None and args.target_params is None:
        raise UserError("--target-layers shapes a --target-params budget: add --target-params N")
    reserve = args.reserve if args.reserve is not None else (2.0 if args.device == "cuda" else 0.0)
    hardware = Hardware(gpus=args.gpus, nodes=args.nodes, gpu_mem_gib=args.gpu_mem, gpu_tflops=args.gpu_tflops,
                        mfu=args.mfu, reserve_gib=reserve, device=args.device)
    result = plan_run(args.config, list(args.overrides), hardware, args.target_params, args.target_layers)
    print(format_plan(result, args.config))
    return 0 if result.fits else NOT_FIT_EXIT
