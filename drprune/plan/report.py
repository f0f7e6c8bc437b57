"""A capacity plan as text: the terms of one rank's memory, the phases, the step time, what to change."""
from __future__ import annotations

from drprune.models.config import ModelConfig
from drprune.models.shapes import config_params
from drprune.plan.flops import FORMULA
from drprune.plan.planner import GIB, Plan
from drprune.plan.target import TargetShape

DEFAULT_GPU = "the default: H100 SXM bf16 dense"


def size(n: float) -> str:
    """Bytes as GiB (MiB below one GiB), 9 characters wide."""
    return f"{n / GIB:5.2f} GiB" if n >= GIB else f"{n / 2**20:5.1f} MiB"


def _shape(cfg: ModelConfig) -> str:
    heads = f"{cfg.n_heads} heads" + (f" / {cfg.n_kv_heads} KV" if cfg.n_kv_heads != cfg.n_heads else "")
    return (f"{cfg.family}, {config_params(cfg) / 1e9:.3g}B parameters (d_model {cfg.d_model}, {cfg.n_layers} "
            f"layers, {heads}, MLP {cfg.intermediate_size}, vocabulary {cfg.vocab_size})")


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def format_target(target: TargetShape) -> list[str]:
    c = target.config
    return [
        f"target for {target.budget:.3g} parameters: d_model {c.d_model}, n_heads {c.n_heads} ({c.n_kv_heads} KV "
        f"groups), n_layers {c.n_layers}, intermediate_size {c.intermediate_size}",
        f"  = {target.params:,} parameters ({target.error:+.2%} of the budget; {target.non_embedding_params:,} "
        "without embeddings, a hypernetwork's target_params)",
        "  overrides: " + " ".join(target.overrides()),
    ]


def format_plan(plan: Plan, config: str) -> str:
    """The plan as the `drprune plan` command prints it."""
    run, hw, mem, lay = plan.run, plan.hardware, plan.memory, plan.layout
    ranks = f"{lay.world_size} rank{'s' if lay.world_size > 1 else ''} ({hw.nodes} node x {hw.gpus} GPU)"
    lines = [
        f"drprune plan: {config} on {hw.device}",
        f"model    {_shape(run.model)}",
        f"run      {run.precision}, {run.parallelism} over {ranks}, activation checkpointing "
        f"{'on' if lay.checkpointing else 'off'}",
        f"batch    global {run.global_batch} x {run.seq_len} tokens; per rank {run.rank_batch} = {run.microbatches} "
        f"microbatch{'es' if run.microbatches > 1 else ''} of {run.microbatch}"
        + (f"; eval batch {run.eval_batch}" if run.eval_batch is not None else "; no evaluation"),
        f"pruning  {run.mask_generator or 'none (no mask generator)'}; teacher: "
        + (_shape(run.teacher) if run.teacher is not None else "none"),
        "",
        "memory per rank",
    ]
    lines += [f"  {t.name:<22}{size(t.bytes):>10}  {t.detail}" for t in mem.terms.values()]
    lines += ["", "phase totals"]
    lines += [f"  {name:<30}{size(total):>10}{'  <- peak' if name == mem.peak_phase else ''}"
              for name, total in mem.phases.items()]
    usable = (f"{hw.capacity / GIB:.2f} GiB usable ({hw.gpu_mem_gib:g} GiB, {hw.reserve_gib:g} GiB reserved for the "
              "CUDA context, NCCL and allocator slack)")
    largest = mem.largest_term()
    if plan.fits:
        lines.append(f"peak {mem.peak / GIB:.2f} GiB ({mem.peak_phase}) of {usable}: fits")
    else:
        lines.append(f"DOES NOT FIT: peak {mem.peak / GIB:.2f} GiB ({mem.peak_phase}) > {usable}; the largest term "
                     f"is {largest.name}, {largest.bytes / GIB:.2f} GiB")
        if plan.advice:
            lines.append("what to change (each alone):")
            lines += [f"  {a.change:<70} peak {size(a.peak)}  {'fits' if a.fits else 'still too large'}"
                      for a in plan.advice]
        else:
            lines.append("  no single change found fits: shorten max_seq_len, or plan a smaller model")
    t = plan.time
    gpu = DEFAULT_GPU if hw.gpu_tflops == 989.0 else "--gpu-tflops"
    lines += [
        "",
        f"step time {t.seconds:.3g} s ({t.tokens:,} tokens per step, {t.tokens_per_second:,.0f} tokens/s)"
        + (f"; max_duration: {_duration(t.run_seconds)}" if t.run_seconds is not None else ""),
        f"  model FLOPs {t.model_flops:.3g}, hardware FLOPs {t.hardware_flops:.3g} per step, at an assumed "
        f"{hw.gpu_tflops:g} TFLOPS per GPU ({gpu}) and MFU {hw.mfu:g}",
        f"  {FORMULA}",
    ]
    if plan.target is not None:
        lines += ["", *format_target(plan.target)]
    if run.notes:
        lines += ["", "notes", *(f"  {n}" for n in run.notes)]
    return "\n".join(lines)
