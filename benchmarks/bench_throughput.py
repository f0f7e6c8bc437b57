"""Throughput (tokens/s) and model FLOPs utilisation (MFU) of drprune's four training steps, as JSON.

    python benchmarks/bench_throughput.py [--out bench_throughput.json] [--steps N] [--batch B] [--seq-len T]
        [--kinds plain,l0,hypernetwork,distillation] [--attn sdpa,flash] [--no-fsdp] [--peak-tflops X]
    python -m torch.distributed.run --standalone --nproc_per_node N benchmarks/bench_throughput.py   # N GPUs
    python benchmarks/bench_throughput.py --tiny --device cpu   # smoke run of every code path

Steps (each: forward, loss, backward, optimizer step, on random tokens): `plain` (no mask generator),
`l0` (hard-concrete masks on every L0 module, target half of each dimension), `hypernetwork`
(DISP-LLM's generator, the LLM frozen, target half the parameters) and `distillation` (a plain student
and a frozen teacher of the same shape, stored in bf16 as `teacher_dtype: auto` does). Shape:
TinyLlama-1.1B's (d_model 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000; 1.10B
parameters), 8 x 2048 tokens per rank and step. On CUDA the weights are fp32 and the step runs under
bf16 autocast; FSDP2 with Composer's wrapping (one unit per block, the mask generator left whole, bf16
parameters) shards over the launch's ranks, so a plain one-GPU launch is FSDP on a single rank: no
sharding, only its bookkeeping. `--no-fsdp` runs the unwrapped model. Flash attention runs only when
`flash_attn` imports (else it is reported as skipped).

Model FLOPs per token (PaLM's accounting; attention counted in full, not halved for causality):
    plain, l0      6N + 12 L H hd T
    hypernetwork   4N + 12 L H hd T     (frozen weights: no weight gradients)
    distillation   8N + 16 L H hd T     (the student's 6N + 12 L H hd T, the teacher's forward 2N + 4 L H hd T)
N: parameters that multiply (all but the input embedding table); L layers, H heads, hd head dim, T the
sequence length. MFU = model FLOPs per second / (the device's peak dense bf16 TFLOP/s x ranks).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from composer.core import Precision
from composer.distributed.fsdp2 import prepare_fully_shard
from composer.distributed.fsdp2_utils import generate_composer_model_policy
from composer.optim import DecoupledAdamW
from composer.utils import FSDP2Config

from drprune.atomic import write_json
from drprune.masks.hypernetwork import HypernetworkMaskGenerator
from drprune.masks.l0 import L0_MODULES, L0MaskGenerator
from drprune.masks.base import MaskGenerator
from drprune.models.composer_model import PrunableLM
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.models.distill import DistillConfig
from drprune.parallel import ShardingPlan, prepare_model
from step_setup import random_batch, step_parser

TINYLLAMA_1B = dict(family="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                    intermediate_size=5632, context_length=2048)
TINY = dict(family="llama", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
            intermediate_size=128, context_length=64)
FULL_RUN = dict(batch=8, seq_len=2048, steps=10, warmup=3)
TINY_RUN = dict(batch=2, seq_len=32, steps=2, warmup=1)
KINDS = ("plain", "l0", "hypernetwork", "distillation")
ATTN_IMPLS = ("sdpa", "flash")
# Peak dense bf16 tensor TFLOP/s by device-name fragment, first match wins (vendor data sheets, no sparsity)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# model FLOPs per token: (multiples of N, multiples of L * H * hd * T)
FLOP_TERMS = {"plain": (6, 12), "l0": (6, 12), "hypernetwork": (4, 12), "distillation": (8, 16)}


@dataclass
class Launch:
    """This process's place in the launch: rank, ranks, device, and whether it made the process group."""

    rank: int
    world: int
    device: str
    own_group: bool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The shared step flags plus this benchmark's; `--tiny` changes the defaults, explicit flags still win."""
    parser = step_parser(__doc__, FULL_RUN["steps"])
    parser.add_argument("--warmup", type=int, help="untimed steps before the timed ones")
    parser.add_argument("--kinds", default=",".join(KINDS), help="steps to run, comma-separated")
    parser.add_argument("--attn", default=",".join(ATTN_IMPLS), help="attention kernels, comma-separated")
    parser.add_argument("--no-fsdp", action="store_true", help="run the model unwrapped (one process only)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s, for MFU "
                        "(default: looked up by device name)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 2 steps: a smoke run for a CPU")
    parser.add_argument("--out", default="bench_throughput.json", help="JSON file to write")
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**(TINY_RUN if known.tiny else FULL_RUN))
    args = parser.parse_args(argv)
    for flag, valid in (("kinds", KINDS), ("attn", ATTN_IMPLS)):
        picked = [v.strip() for v in getattr(args, flag).split(",") if v.strip()]
        if not picked or any(v not in valid for v in picked):
            parser.error(f"--{flag} {getattr(args, flag)!r}: pick from {', '.join(valid)} (comma-separated)")
        setattr(args, flag, picked)
    for key in ("steps", "batch", "seq_len"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: use cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device: use --device cpu (with --tiny) on this machine")
    if args.no_fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--no-fsdp runs one process: launch it without torchrun, or drop --no-fsdp")
    return args


def start(args: argparse.Namespace) -> Launch:
    """Join torchrun's ranks, or make a one-rank process group (FSDP2 needs one) on a plain launch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if args.no_fsdp or dist.is_initialized():
        rank = dist.get_rank() if dist.is_initialized() else 0
        return Launch(rank, world, device, own_group=False)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend)  # env:// rendezvous from torchrun
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Launch(dist.get_rank(), world, device, own_group=True)


def model_flops_per_token(cfg: ModelConfig, seq_len: int, kind: str) -> float:
    """FLOPs one token costs the step `kind` (see the module docstring)."""
    decoder_params = sum(p.numel() for p in _shape_only(cfg).parameters())
    n = decoder_params - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_word_embeddings else 1)
    per_n, per_attn = FLOP_TERMS[kind]
    return per_n * n + per_attn * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def _shape_only(cfg: ModelConfig) -> PrunableDecoder:
    with torch.device("meta"):
        return PrunableDecoder(cfg)


def mask_generator(kind: str, cfg: ModelConfig) -> MaskGenerator | None:
    """Built on the CPU (the hypernetwork seeds its inputs from a CPU generator), moved with the model."""
    if kind == "l0":
        target = dict(d_model=cfg.d_model // 2, n_heads=cfg.n_heads // 2, n_kv_heads=cfg.n_kv_heads // 2,
                      n_layers=cfg.n_layers // 2, intermediate_size=cfg.intermediate_size // 2)
        return L0MaskGenerator(cfg, list(L0_MODULES), target, lagrangian_warmup_steps=10)
    if kind == "hypernetwork":
        return HypernetworkMaskGenerator(cfg, target_ratio=0.5)
    return None


def build(kind: str, cfg: ModelConfig, device: str, compute_dtype: torch.dtype) -> PrunableLM:
    """The step's PrunableLM, its weights initialised on `device` directly."""
    torch.manual_seed(0)
    generator = mask_generator(kind, cfg)
    distill, teacher = None, None
    if kind == "distillation":
        distill = DistillConfig(teacher="random weights (benchmark)")
        with torch.device(device):
            teacher = PrunableDecoder(cfg)
        for param in teacher.parameters():  # buffers (RoPE) stay fp32, as train.build_teacher keeps them
            param.data = param.data.to(compute_dtype)
    with torch.device(device):
        model = PrunableLM(cfg, generator, distill=distill, teacher=teacher)
    return model.to(device).train()


def shard(model: PrunableLM, precision: Precision) -> None:
    """FSDP2 as Composer applies it in training: its wrap policy, the mask generator kept whole."""
    plan = ShardingPlan(2, FSDP2Config(reshard_after_forward=True))
    prepare_model(model, plan)
    # recorded and dropped: Composer warns about the `_fsdp_wrap` drprune sets, with a filter of its own
    with warnings.catch_warnings(record=True):
        prepare_fully_shard(model, plan.config, precision, generate_composer_model_policy(model))


def train_step(model: PrunableLM, opt: torch.optim.Optimizer, batch: dict[str, Any],
               autocast: Callable[[], contextlib.AbstractContextManager], step: int) -> None:
    """One training step as the Trainer and the pruning callback run it."""
    generator = model.mask_generator
    if generator is not None:
        generator.set_step(step)
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss = model.loss(model(batch), batch)["total"]
    loss.backward()
    opt.step()
    if generator is not None:
        generator.after_optimizer_step()


def timed(fn: Callable[[], None], device: str) -> float:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - begin


def skip_reason(attn: str, device: str) -> str | None:
    if attn != "flash":
        return None
    if not device.startswith("cuda"):
        return "flash attention needs CUDA"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed (pip install 'drprune[gpu]', see the README)"
    return None


def run_steps(kind: str, cfg: ModelConfig, args: argparse.Namespace, device: str, batch: dict[str, Any]) -> list[float]:
    """Build the step's model (FSDP2-wrapped unless --no-fsdp), run it; the timed steps' seconds."""
    cuda = device.startswith("cuda")
    model = build(kind, cfg, device, torch.bfloat16 if cuda else torch.float32)
    if not args.no_fsdp:
        shard(model, Precision.AMP_BF16 if cuda else Precision.FP32)
    opt = DecoupledAdamW(model.param_groups(lr=1e-4, weight_decay=0.0, lag_lr=1e-3), lr=1e-4)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    times = [timed(lambda i=i: train_step(model, opt, batch, autocast, i), device)
             for i in range(args.warmup + args.steps)]
    return times[args.warmup:]


def measure(kind: str, attn: str, args: argparse.Namespace, launch: Launch, shape: dict[str, Any],
            batch: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    """One step kind with one attention kernel: its median step time and what follows from it."""
    record: dict[str, Any] = {"step": kind, "attn_impl": attn}
    reason = skip_reason(attn, launch.device)
    if reason:
        return {**record, "status": "skipped", "reason": reason}
    cuda = launch.device.startswith("cuda")
    cfg = ModelConfig(**shape, attn_impl=attn)
    if cuda:
        torch.cuda.reset_peak_memory_stats(launch.device)
    try:
        times = run_steps(kind, cfg, args, launch.device, batch)
    except Exception as err:  # one failing config (out of memory, a kernel refusing a shape) must not hide the rest
        traceback.print_exc()
        return {**record, "status": "error", "error": f"{type(err).__name__}: {err}"[:1000]}
    finally:
        gc.collect()  # the model and its optimizer state, gone before the next config is built
        if cuda:
            torch.cuda.empty_cache()
    step_s = statistics.median(times)
    tokens_per_s = args.batch * args.seq_len * launch.world / step_s
    flops_per_token = model_flops_per_token(cfg, args.seq_len, kind)
    model_tflops = flops_per_token * tokens_per_s / 1e12
    return {
        **record, "status": "ok", "tokens_per_s": tokens_per_s, "step_ms": step_s * 1e3,
        "step_ms_each": [t * 1e3 for t in times], "model_flops_per_token": flops_per_token,
        "model_tflops_per_s": model_tflops,
        "mfu": model_tflops / (peak_tflops * launch.world) if peak_tflops else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(launch.device) / 2**30 if cuda else None,
    }


def device_peak(device: str, override: float | None) -> tuple[str, float | None, str]:
    """(device name, peak bf16 TFLOP/s or None, where the peak came from)."""
    if not device.startswith("cuda"):
        return platform.processor() or platform.machine(), override, "--peak-tflops" if override else "none (CPU)"
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override, "--peak-tflops"
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment in name:
            return name, peak, f"table: {fragment}"
    return name, None, "unknown device: pass --peak-tflops for MFU"


def environment(device_name: str, world: int) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "device_name": device_name, "cuda_devices": torch.cuda.device_count(), "ranks": world,
        "composer": version("mosaicml"), "flash_attn": version("flash_attn"), "drprune": version("drprune"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every (step, attention) pair; rank 0 writes the JSON. Exit status 1 when any pair failed."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")  # Composer's, per config
    launch = start(args)
    try:
        shape = TINY if args.tiny else TINYLLAMA_1B
        device_name, peak, peak_source = device_peak(launch.device, args.peak_tflops)
        torch.manual_seed(launch.rank)
        batch = random_batch(argparse.Namespace(**{**vars(args), "device": launch.device}), shape["vocab_size"])
        results = [measure(kind, attn, args, launch, shape, batch, peak) for attn in args.attn for kind in args.kinds]
        cfg = ModelConfig(**shape)
        report = {
            "benchmark": "bench_throughput",
            "environment": environment(device_name, launch.world),
            "shape": {**shape, "name": "tiny (smoke run)" if args.tiny else "TinyLlama-1.1B"},
            "params": sum(p.numel() for p in _shape_only(cfg).parameters()),
            "batch_per_rank": args.batch, "seq_len": args.seq_len,
            "tokens_per_step": args.batch * args.seq_len * launch.world,
            "steps_timed": args.steps, "warmup_steps": args.warmup,
            "precision": ("fp32 weights, bf16 autocast" if launch.device.startswith("cuda") else "fp32"),
            "fsdp": _fsdp_note(args.no_fsdp, launch.world),
            "peak_bf16_tflops": peak, "peak_source": peak_source,
            "flops_per_token": "plain, l0: 6N + 12 L H hd T; hypernetwork: 4N + 12 L H hd T; distillation: "
                               "8N + 16 L H hd T (N: parameters that multiply, all but the input embedding)",
            "results": results,
        }
        if launch.rank == 0:
            write_json(args.out, report)
            print_table(report)
            print(f"wrote {args.out}")
        return 1 if any(r["status"] == "error" for r in results) else 0
    finally:
        if launch.own_group:
            dist.destroy_process_group()


def _fsdp_note(no_fsdp: bool, world: int) -> dict[str, Any]:
    if no_fsdp:
        return {"version": None, "ranks": 1, "note": "unwrapped model (--no-fsdp)"}
    note = ("single rank: FSDP2 wraps the model but shards nothing (its bookkeeping only)" if world == 1
            else f"FSDP2 full sharding over {world} ranks (Composer's wrap policy, mask generator whole)")
    return {"version": 2, "ranks": world, "note": note}


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"{env['device_name']} x{env['ranks']}  torch {env['torch']}  {report['precision']}  "
          f"{report['params'] / 1e6:.1f}M params  {report['tokens_per_step']} tokens/step  "
          f"peak {report['peak_bf16_tflops']} TFLOP/s ({report['peak_source']})")
    print(f"{'step':<14}{'attn':<7}{'tokens/s':>12}{'step ms':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for r in report["results"]:
        if r["status"] != "ok":
            print(f"{r['step']:<14}{r['attn_impl']:<7}  {r['status']}: {r.get('reason') or r.get('error')}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['step']:<14}{r['attn_impl']:<7}{r['tokens_per_s']:>12.0f}{r['step_ms']:>10.1f}"
              f"{r['model_tflops_per_s']:>10.2f}{mfu:>8}{mem:>10}")


if __name__ == "__main__":
    sys.exit(main())
