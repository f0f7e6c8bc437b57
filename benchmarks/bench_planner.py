"""Planner vs measured: `drprune plan --device cpu` against the peak memory of real training steps on CPU.

Every case is a run config (SmolLM2's 49152-token vocabulary, 4 layers, an L0 mask generator; one with
distillation, one in bf16 autocast, one with a frozen LLM and a hypernetwork, one over 2 FSDP2 ranks
with activation checkpointing) trained for a few steps through the real path, `drprune.train.build_trainer`
on a synthetic MDS dataset, each in fresh processes. Each process records its resident memory before
the trainer is built (the interpreter, torch and Composer already imported: the baseline), resets the
kernel's peak (`/proc/self/clear_refs`) once the trainer is built, runs the steps (the first without
Adam state, the later ones with it) and reads the peak back (VmHWM). measured = peak - baseline: every
tensor the run holds, as the planner's peak counts them. glibc and MKL are told to give freed blocks back
(MALLOC_MMAP_THRESHOLD_, MKL_DISABLE_FAST_MM), so the resident peak is the live peak, as a GPU's caching
allocator reports it, not a heap's high-water mark. Exit code 1 when a case is off by more than 15%.

    python benchmarks/bench_planner.py                 # every case, a markdown table (about 5 minutes on 2 cores)
    python benchmarks/bench_planner.py --case d64-mha-l0 --case d512-mha-l0-distill   # some of them
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from rank_worker import proc_status, run_config, run_ranks, write_rank_result

VOCAB = 49152
STEPS = 3
D64 = dict(d_model=64, n_heads=4, n_kv_heads=4, intermediate_size=128)
D256 = dict(d_model=256, n_heads=4, n_kv_heads=2, intermediate_size=704)
D512 = dict(d_model=512, n_heads=8, n_kv_heads=8, intermediate_size=1408)
D768 = dict(d_model=768, n_heads=12, n_kv_heads=4, intermediate_size=2048)


@dataclass(frozen=True)
class Case:
    """One benchmarked run: 4 layers of `model` (SmolLM2's vocabulary, tied embeddings)."""

    model: dict
    seq_len: int
    global_batch: int
    microbatch: int
    precision: str = "fp32"
    generator: str = "l0"
    distill: bool = False
    ranks: int = 1  # 2: FSDP2 FULL_SHARD with activation checkpointing over 2 gloo ranks (composer -n 2)


CASES = {
    "d64-mha-l0": Case(D64, 256, 2, 2),
    "d256-gqa-l0-2micro": Case(D256, 256, 8, 4),
    "d512-mha-l0-distill": Case(D512, 512, 2, 2, distill=True),
    "d768-gqa-l0-bf16": Case(D768, 256, 4, 4, precision="amp_bf16"),
    "d512-mha-hypernetwork": Case(D512, 512, 2, 2, generator="hypernetwork"),
    "d512-mha-l0-fsdp2x2-ckpt": Case(D512, 512, 4, 2, ranks=2),
}
GENERATORS = {
    "l0": lambda m: {"name": "l0", "pruning_modules": ["head", "intermediate", "layer", "hidden"],
                     "lagrangian_warmup_steps": "2ba",
                     "target_model": {"d_model": m["d_model"] // 2, "n_heads": m["n_heads"] // 2,
                                      "n_kv_heads": m["n_kv_heads"] // 2, "n_layers": 3,
                                      "intermediate_size": m["intermediate_size"] // 2}},
    "hypernetwork": lambda m: {"name": "hypernetwork", "target_ratio": 0.5},
}


def case_config(name: str, work: Path) -> tuple[Path, list[str]]:
    """The case's run config (a YAML in `work`) and the overrides naming its data and teacher."""
    case = CASES[name]
    model = {"family": "llama", "vocab_size": VOCAB, "n_layers": 4, "tie_word_embeddings": True,
             "context_length": 2048, **case.model}
    cfg = run_config(f"bench-planner-{name}", seq_len=case.seq_len, steps=STEPS, global_batch=case.global_batch,
                     microbatch=case.microbatch, precision=case.precision, lr=1e-4,
                     mask_generator=GENERATORS[case.generator](case.model))
    cfg["model"].update(model)
    if case.ranks > 1:
        cfg["fsdp_config"] = {"sharding_strategy": "FULL_SHARD", "activation_checkpointing": True}
    overrides = []
    if case.distill:
        cfg["distillation"] = {"teacher": "???", "kl_weight": 0.5, "ce_weight": 0.5}
        overrides.append(f"distillation.teacher={work / 'teacher.pt'}")
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, [f"data_local={work / f'data-{case.seq_len}'}", *overrides]


def prepare(work: Path) -> None:
    """The synthetic dataset every case reads and the teacher checkpoint the distillation case loads."""
    from drprune.convert.checkpoint import decoder_checkpoint_state, save_checkpoint
    from drprune.data.testing import write_synthetic_mds
    from drprune.models.config import ModelConfig
    from drprune.models.decoder import PrunableDecoder

    for seq_len in sorted({c.seq_len for c in CASES.values()}):
        write_synthetic_mds(work / f"data-{seq_len}", {"a": "random", "b": "random"}, seq_len=seq_len,
                            vocab_size=VOCAB, n_train=64, n_eval=2)
    teacher = PrunableDecoder(ModelConfig(family="llama", vocab_size=VOCAB, n_layers=4, tie_word_embeddings=True,
                                          context_length=2048, **CASES["d512-mha-l0-distill"].model))
    save_checkpoint(decoder_checkpoint_state(teacher), work / "teacher.pt")


def measure(config: Path, overrides: list[str]) -> dict[str, float]:
    """Build the trainer and run its steps in this process; resident memory before, after building, at peak."""
    from drprune.train import build_trainer, load_config

    cfg = load_config(str(config), overrides)
    baseline = proc_status("VmRSS")
    trainer = build_trainer(cfg)
    built = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the resident size now
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    return {"baseline": baseline, "built": built - baseline, "measured": proc_status("VmHWM") - baseline,
            "seconds_per_step": seconds / STEPS}


def planned(config: Path, overrides: list[str], ranks: int) -> dict[str, float]:
    """The planner's numbers for the case, on a CPU (sharded with FSDP2, the one Composer runs on CPU)."""
    from drprune.plan.planner import Hardware, plan_run

    os.environ["FSDP_VERSION"] = "2"
    plan = plan_run(str(config), overrides, Hardware(gpus=ranks, device="cpu", gpu_mem_gib=1024, reserve_gib=0))
    static = sum(plan.memory.terms[n].bytes for n in ("weights", "gradients", "optimizer state", "mask generator",
                                                      "teacher"))
    return {"planned": plan.memory.peak, "phase": plan.memory.peak_phase, "static": static,
            "activations": plan.memory.terms["activations"].bytes, "logits": plan.memory.terms["logits"].bytes}


def run_case(name: str, work: Path) -> dict:
    """One case in fresh processes (the measurement; the largest rank's) and here (the plan)."""
    config, overrides = case_config(name, work)
    ranks = CASES[name].ranks
    result = max(run_ranks(__file__, name, work, ranks, mmap_threshold=1 << 20), key=lambda r: r["measured"])
    result.update(planned(config, overrides, ranks))
    result["ratio"] = result["planned"] / result["measured"]
    return result


def table(results: dict[str, dict]) -> str:
    mib = 2**20
    lines = ["| case | planned peak (phase) | measured peak | planned / measured | weights+grads+Adam+masks+teacher "
             "| activations | logits | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['planned'] / mib:.0f} MiB ({r['phase']}) | {r['measured'] / mib:.0f} MiB | "
                     f"{r['ratio']:.3f} | {r['static'] / mib:.0f} MiB | {r['activations'] / mib:.0f} MiB | "
                     f"{r['logits'] / mib:.0f} MiB | {r['seconds_per_step']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append",
                        help="cases to run (default: all); with --json, measure one case in this process")
    parser.add_argument("--work", type=Path, help="folder for the data and configs (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the measurement of the one --case here (internal)")
    args = parser.parse_args()
    if args.json is not None:
        write_rank_result(args.json, measure(*case_config(args.case[0], args.work)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "teacher.pt").exists():
            prepare(work)
        results = {name: run_case(name, work) for name in (args.case or CASES)}
    print(table(results))
    worst = max(abs(r["ratio"] - 1) for r in results.values())
    print(f"\nlargest error {worst:.1%} (target: within 15%)")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
