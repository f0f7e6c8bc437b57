"""Plan a run from its config: read it as training does, then size one rank's memory and the step time.

The config goes through `drprune.train.load_config` and `RunConfig.from_cfg`, its sharding through
`drprune.parallel.plan_sharding`, its shape through `drprune.train.model_config` (from the YAML, or
from the `model.path` checkpoint's recorded config: only that entry is read, never the weights). Keys a
plan does not need (data and save folders, domain names, the checkpoint itself) may stay `???`; the
teacher and `model.path` need not exist here, in which case the source shape stands in for them and
the plan says so. Nothing is built but the mask generator, on the meta device where it allows.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from composer.core import Time, TimeUnit
from omegaconf import DictConfig, OmegaConf

from drprune.convert.checkpoint import load_model_state
from drprune.convert.hf import EXTRA_STATE_KEY
from drprune.convert.sharded import looks_sharded, read_state
from drprune.errors import ConfigError, UserError
from drprune.masks import MaskGenerator, build_mask_generator
from drprune.models.config import ModelConfig
from drprune.models.distill import DistillConfig, check_teacher, same_file
from drprune.parallel import ShardingPlan, plan_sharding
from drprune.plan.activations import ActivationSetup, attention_kernel
from drprune.plan.flops import StepTime, step_time
from drprune.plan.memory import Layout, MemoryInputs, MemoryPlan, Teacher, plan_memory
from drprune.plan.target import TargetShape, shape_for_budget
from drprune.precision import resolve_precision
from drprune.run_config import RunConfig
from drprune.train import load_config, model_config, teacher_config

log = logging.getLogger(__name__)

GIB = 2**30
# `???` keys a plan does not need: deleted before the config is read (max_duration gets a placeholder)
NOT_NEEDED = ("data_local", "save_folder", "load_path", "tokenizer", "run_name", "max_duration", "eval_interval",
              "save_interval", "callbacks.data_loading.set_names", "callbacks.data_loading.reference_loss",
              "callbacks.data_loading.proportion", "model.path", "model.mask_generator.init_masks",
              "model.l0_module.init_masks", "model.mask_generator.lagrangian_warmup_steps",
              "model.l0_module.lagrangian_warmup_steps", "distillation.teacher")
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "intermediate_size")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}
MAX_RANKS = 4096  # how far "more ranks" advice searches
L0_MODULES = ("head", "intermediate", "layer", "hidden")  # an L0 node's pruning_modules when it names none


@dataclass(frozen=True)
class Hardware:
    """The cluster a plan is for. `gpu_tflops` is the peak in the run's precision (default: H100 SXM bf16
    dense); `reserve_gib` is memory a rank cannot use for tensors (CUDA context, NCCL, allocator slack)."""

    gpus: int = 1
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    gpu_tflops: float = 989.0
    mfu: float = 0.4
    reserve_gib: float = 2.0
    device: str = "cuda"  # cpu: plan a CPU run (torch's CPU attention kernels, no FSDP1, host memory)

    def __post_init__(self) -> None:
        for key in ("gpus", "nodes"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key}={getattr(self, key)} must be at least 1")
        if not 0 < self.mfu <= 1:
            raise UserError(f"--mfu={self.mfu} must be in (0, 1] (model FLOPs utilisation, e.g. 0.4)")
        if self.gpu_mem_gib <= 0 or self.gpu_tflops <= 0 or self.reserve_gib < 0:
            raise UserError("--gpu-mem and --gpu-tflops must be positive and --reserve non-negative")
        if self.device not in ("cuda", "cpu"):
            raise UserError(f"--device {self.device!r} must be cuda or cpu")

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def capacity(self) -> int:
        """Bytes one rank has for tensors."""
        return int((self.gpu_mem_gib - self.reserve_gib) * GIB)


@dataclass(frozen=True)
class RunShape:
    """What the config asks of each rank, resolved."""

    model: ModelConfig
    precision: str
    parallelism: str  # e.g. "FSDP1 FULL_SHARD" or "DDP"
    global_batch: int
    rank_batch: int
    microbatch: int
    microbatches: int
    seq_len: int
    eval_batch: int | None
    mask_generator: str | None
    teacher: ModelConfig | None
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Advice:
    """A change to the run and the peak per rank it gives."""

    change: str
    peak: int
    fits: bool


@dataclass(frozen=True)
class Plan:
    """The capacity plan of one run on one cluster."""

    run: RunShape
    hardware: Hardware
    layout: Layout
    memory: MemoryPlan
    time: StepTime
    advice: tuple[Advice, ...]
    target: TargetShape | None = None

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.hardware.capacity


# ---------------------------------------------------------------- reading the config

def read_run_config(config: str, overrides: list[str]) -> tuple[RunConfig, list[str]]:
    """The run config as training reads it, with the `???` keys a plan does not need dropped (listed)."""
    cfg = load_config(config, overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    needed = [k for k in missing if k not in NOT_NEEDED]
    if needed:
        raise ConfigError(f"{', '.join(needed)} {'is' if len(needed) == 1 else 'are'} not set (???) and the plan "
                          f"needs {'it' if len(needed) == 1 else 'them'}: add {needed[0]}=... to the command line")
    for key in missing:
        _drop(cfg, key)
    if "max_duration" in missing:
        cfg.max_duration = "1ba"  # required by RunConfig; the plan then reports no run time
    return RunConfig.from_cfg(cfg), missing


def _drop(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    del parent[leaf]


def _checkpoint_config(path: str, trust_pickle: bool) -> dict[str, Any]:
    """The entries of a checkpoint's model state that hold its config, without reading any weight."""
    if looks_sharded(path):
        state = read_state(path, {f"state.model.{EXTRA_STATE_KEY}"}, trust_pickle)
        return dict(state.get("state", {}).get("model", {}))
    state = load_model_state(path, trust_pickle, verify=False)  # memory-mapped: no weight is read
    return {EXTRA_STATE_KEY: state.get(EXTRA_STATE_KEY)}


def _model(run: RunConfig, notes: list[str]) -> ModelConfig:
    path, has_shape = run.model.path, any(k in run.model.shape for k in SHAPE_KEYS)
    if path is not None and Path(path).exists():
        return model_config(run.model, _checkpoint_config(path, run.trust_pickle), run.max_seq_len)
    if not has_shape:
        where = f"model.path {path} does not exist here" if path else "model.path is not set"
        raise UserError(f"{where} and the config gives no model shape: give model.path=CHECKPOINT (only its "
                        "recorded config is read) or the shape keys (model.d_model=..., model.n_layers=..., ...)")
    if path is not None:
        notes.append(f"model.path {path} does not exist here: the shape is the YAML's model keys")
    return model_config(run.model, None, run.max_seq_len)


def _mask_generator(mcfg: ModelConfig, run: RunConfig) -> MaskGenerator | None:
    """The run's mask generator, on the meta device unless it computes while it is built (then on CPU)."""
    node = run.model.mask_generator
    if node is None:
        return None
    node = {k: v for k, v in node.items() if k != "init_masks"}  # a warm start changes no size
    try:
        with torch.device("meta"):
            return build_mask_generator(mcfg, node, run.model.mask_prefix)
    except (RuntimeError, NotImplementedError):  # e.g. a count read back with .item(): build it for real
        return build_mask_generator(mcfg, node, run.model.mask_prefix)


def _masks(generator: MaskGenerator) -> dict[str, tuple[int, ...]]:
    """Name and shape of every mask the generator emits."""
    generator.eval()
    with torch.no_grad():
        return {name: tuple(m.shape) for name, m in generator().items()}


def _distill(run: RunConfig, config: str, missing: list[str]) -> DistillConfig | None:
    """The checked `distillation:` node; a teacher checkpoint that is not here is checked as the config file."""
    node = run.distillation
    if node is None:
        return None
    teacher = node.get("teacher") or run.model.path
    if teacher is None and "model.path" in missing:
        teacher = "model.path"  # the source model, whose file is not named yet
    if teacher is None or Path(str(teacher)).is_file():
        return DistillConfig.from_node(node, run.model.path)
    checked = DistillConfig.from_node({**node, "teacher": config}, None)
    return dataclasses.replace(checked, teacher=str(teacher))


def _teacher(distill: DistillConfig | None, run: RunConfig, mcfg: ModelConfig, generator: MaskGenerator | None,
             compute_bytes: int, notes: list[str]) -> Teacher | None:
    if distill is None:
        return None
    default = distill.teacher in ("model.path", run.model.path) or same_file(distill.teacher, run.model.path)
    if default or not Path(distill.teacher).exists():
        cfg = mcfg
        if not default:
            notes.append(f"distillation.teacher {distill.teacher} does not exist here: the teacher is assumed "
                         "to have the source's shape")
    else:
        cfg = teacher_config(_checkpoint_config(distill.teacher, run.trust_pickle), distill.teacher, None)
    check_teacher(cfg, mcfg, distill.teacher)
    kl = distill.kl_weight > 0
    if default and generator is not None and generator.model_parameters_frozen():
        return Teacher(cfg, 0, compute_bytes, kl, stored=False)
    dtype = getattr(distill, "teacher_dtype", "auto")
    storage = DTYPE_BYTES[dtype] if dtype != "auto" else (2 if run.precision == "amp_bf16" else 4)
    return Teacher(cfg, storage, compute_bytes if compute_bytes < 4 else storage, kl)


# ---------------------------------------------------------------- layout and batches

def _compute_bytes(precision: str, device: str) -> int:
    if device == "cpu":
        _, autocast = resolve_precision(precision, cuda=False)  # refuses what a CPU cannot run
        return 2 if autocast is not None else 4
    return 4 if precision == "fp32" else 2  # amp_bf16, amp_fp16 (amp_fp8 counted as 16-bit)


def _param_bytes(mixed_precision: Any, compute_bytes: int) -> int:
    """Bytes per weight FSDP gathers: Composer's mixed precision (DEFAULT and PURE: the compute dtype)."""
    if isinstance(mixed_precision, dict):
        return DTYPE_BYTES.get(str(mixed_precision.get("param_dtype", "float32")).removeprefix("torch."), 4)
    return 4 if str(mixed_precision).upper() == "FULL" else compute_bytes


def layout_of(sharding: ShardingPlan, world: int) -> tuple[Layout, str]:
    """The Layout a sharding plan gives `world` ranks, and its name."""
    if not sharding.sharded:
        return (Layout(world, "ddp" if world > 1 else "single", sharding.checkpoint_blocks),
                "DDP" if world > 1 else "one process")
    config = sharding.config
    if sharding.version == 1:
        full = config.sharding_strategy == "FULL_SHARD"
    else:
        full = bool(config.reshard_after_forward)
    strategy = "full_shard" if full else "shard_grad_op"
    return (Layout(world, strategy, bool(config.activation_checkpointing)),
            f"FSDP{sharding.version} {strategy.upper()}")


def _rank_batches(run: RunConfig, hw: Hardware) -> tuple[int, int | None]:
    """(each rank's share of the global batch, its microbatch; None for `auto`), refused as training refuses."""
    world, global_bs = hw.world_size, run.global_train_batch_size
    if global_bs % world:
        raise ConfigError(f"global_train_batch_size={global_bs} is not divisible by the world size {world} "
                          f"({hw.nodes} nodes x {hw.gpus} GPUs): use a multiple of {world}, or another --gpus/--nodes")
    rank, micro = global_bs // world, run.device_train_microbatch_size
    if micro == "auto":
        return rank, None
    if micro is None or micro >= rank:
        return rank, rank
    if rank % micro:
        raise ConfigError(f"global_train_batch_size={global_bs} is not divisible by the world size {world} times "
                          f"device_train_microbatch_size={micro}: each rank's {rank} samples would end in a short "
                          f"microbatch; use a global batch that is a multiple of {world * micro}, or a microbatch "
                          f"that divides {rank}")
    return rank, micro


def _steps(run: RunConfig, missing: list[str], tokens_per_step: int) -> int | None:
    """Optimizer steps of `max_duration` (batches or tokens), None when it is in epochs or not set."""
    if "max_duration" in missing:
        return None
    duration = run.max_duration
    time = Time(duration, TimeUnit.BATCH) if isinstance(duration, int) else Time.from_timestring(str(duration))
    if time.unit == TimeUnit.BATCH:
        return int(time.value)
    if time.unit == TimeUnit.TOKEN:
        return math.ceil(time.value / tokens_per_step)
    return None


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class _Fixed:
    """What stays when the layout or the batch changes (for advice)."""

    model: ModelConfig
    compute_bytes: int
    mixed_precision: Any
    trainable: bool
    masks: frozenset[str]
    mask_params: int
    mask_buffers: int
    mask_units: int
    teacher: Teacher | None
    seq_len: int
    device: str

    def layout(self, layout: Layout) -> Layout:
        """`layout` with the bytes FSDP gathers (on CPU Composer runs fp32 and drprune autocasts)."""
        gather = _param_bytes(self.mixed_precision, self.compute_bytes) if self.device == "cuda" else 4
        return dataclasses.replace(layout, gather_bytes=gather)

    def inputs(self, layout: Layout, microbatch: int, microbatches: int, eval_batch: int | None) -> MemoryInputs:
        layout = self.layout(layout)
        residual = 2 if layout.sharded and layout.gather_bytes == 2 else 4  # the embedding runs in that dtype
        kernel, copy = attention_kernel(self.model, self.device, self.compute_bytes)
        setup = ActivationSetup(self.compute_bytes, residual, self.trainable, self.masks, kernel, copy)
        return MemoryInputs(self.model, setup, layout, microbatch, microbatches, self.seq_len, eval_batch,
                            self.mask_params, self.mask_buffers, self.mask_units, self.teacher)


def plan_run(config: str, overrides: list[str], hardware: Hardware, target_params: float | None = None,
             target_layers: int | None = None) -> Plan:
    """The capacity plan of the run `config` (with dot-list `overrides`) on `hardware`."""
    run, missing = read_run_config(config, overrides)
    notes = [f"not set, not needed to plan: {', '.join(missing)}"] if missing else []
    world = hardware.world_size
    rank_batch, micro = _rank_batches(run, hardware)
    sharding = plan_sharding(run.fsdp_config, has_mask_generator=run.model.mask_generator is not None,
                             cuda=hardware.device == "cuda", activation_checkpointing=run.activation_checkpointing)
    layout, parallelism = layout_of(sharding, world)
    if sharding.sharded and getattr(sharding.config, "activation_cpu_offload", False):
        notes.append("fsdp_config.activation_cpu_offload is on: activations are counted on the GPU all the same")
    mcfg = _model(run, notes)
    seq_len = run.max_seq_len or mcfg.context_length
    if run.max_seq_len is None:
        notes.append(f"max_seq_len is not set: planned at the model's context length {seq_len}")
    run.check_model_fits_data(mcfg.context_length)
    generator = _mask_generator(mcfg, run)
    masks = _masks(generator) if generator is not None else {}
    c = _compute_bytes(run.precision, hardware.device)
    trainable = generator is None or not generator.model_parameters_frozen()
    teacher = _teacher(_distill(run, config, missing), run, mcfg, generator, c, notes)
    fixed = _Fixed(
        mcfg, c, getattr(sharding.config, "mixed_precision", "DEFAULT"), trainable, frozenset(masks),
        sum(p.numel() for p in generator.parameters()) if generator is not None else 0,
        sum(b.numel() for b in generator.buffers()) if generator is not None else 0,
        sum(math.prod(s) for s in masks.values()), teacher, seq_len, hardware.device)
    eval_batch = (run.device_eval_batch_size or rank_batch) if run.eval_loader is not None else None

    def memory(lay: Layout, mb: int, ev: int | None = eval_batch) -> MemoryPlan:
        return plan_memory(fixed.inputs(lay, mb, math.ceil(rank_batch / mb), ev))

    if micro is None:
        micro = _largest_fitting(_halvings(rank_batch), lambda mb: memory(layout, mb), hardware) or 1
        notes.append(f"device_train_microbatch_size=auto: Composer starts from the rank's {rank_batch} samples "
                     f"and halves on OOM; planned at {micro}, the largest that fits")
    plan = memory(layout, micro)
    sequences = run.global_train_batch_size
    time = step_time(mcfg, sequences=sequences, seq_len=seq_len, trainable=trainable,
                     checkpointing=layout.checkpointing,
                     teacher=teacher.cfg if teacher is not None else None, ranks=world,
                     peak_flops=hardware.gpu_tflops * 1e12, mfu=hardware.mfu,
                     steps=_steps(run, missing, sequences * seq_len))
    shape = RunShape(mcfg, run.precision, parallelism, run.global_train_batch_size, rank_batch, micro,
                     math.ceil(rank_batch / micro), seq_len, eval_batch,
                     run.model.mask_generator.get("name") if run.model.mask_generator else None,
                     teacher.cfg if teacher is not None and teacher.stored else None, tuple(notes))
    advice = () if plan.peak <= hardware.capacity else tuple(
        _advice(run, hardware, layout, fixed, memory, rank_batch, micro, eval_batch, plan))
    target = None
    if target_params is not None:
        modules = (run.model.mask_generator or {}).get("pruning_modules") or L0_MODULES
        target = shape_for_budget(mcfg, target_params, modules, target_layers)
    return Plan(shape, hardware, fixed.layout(layout), plan, time, advice, target)


def _halvings(n: int) -> list[int]:
    """n, n/2, n/4, ... while whole: the microbatches Composer's auto microbatching tries."""
    out = [n]
    while out[-1] % 2 == 0 and out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _largest_fitting(candidates: list[int], memory: Callable[[int], MemoryPlan], hw: Hardware) -> int | None:
    for value in sorted(candidates, reverse=True):
        if memory(value).peak <= hw.capacity:
            return value
    return None


def _divisors_below(n: int, below: int) -> list[int]:
    return [d for d in range(below - 1, 0, -1) if n % d == 0]


def _advice(run: RunConfig, hw: Hardware, layout: Layout, fixed: _Fixed,
            memory: Callable[..., MemoryPlan], rank_batch: int, micro: int, eval_batch: int | None,
            plan: MemoryPlan) -> list[Advice]:
    """Changes that bring the peak down, each with the peak it gives (and whether it fits)."""
    out: list[Advice] = []
    cap = hw.capacity
    fsdp = "" if layout.sharded else "fsdp_config.sharding_strategy=FULL_SHARD "
    sharded = layout if layout.sharded else dataclasses.replace(layout, strategy="full_shard")
    if plan.peak_phase == "evaluation" and eval_batch is not None:
        best = _largest_fitting(_divisors_below(eval_batch, eval_batch), lambda ev: memory(layout, micro, ev), hw)
        if best is not None:
            out.append(Advice(f"device_eval_batch_size={best}", memory(layout, micro, best).peak, True))
    if not layout.checkpointing and not layout.sharded:
        peak = memory(dataclasses.replace(layout, checkpointing=True), micro).peak
        out.append(Advice("activation_checkpointing=true", peak, peak <= cap))
    if not layout.checkpointing and (layout.sharded or fixed.device == "cuda"):
        with_ckpt = dataclasses.replace(sharded, checkpointing=True)
        peak = memory(with_ckpt, micro).peak
        out.append(Advice(f"{fsdp}fsdp_config.activation_checkpointing=true", peak, peak <= cap))
    smaller = _largest_fitting(_divisors_below(rank_batch, micro), lambda mb: memory(layout, mb), hw)
    if smaller is not None:
        out.append(Advice(f"device_train_microbatch_size={smaller} (the global batch stays: "
                          f"{rank_batch // smaller} microbatches per rank)", memory(layout, smaller).peak, True))
    if fixed.device == "cuda":
        out.extend(_more_ranks(run, hw, sharded, fixed, micro, eval_batch, fsdp))
    return out


def _rank_counts(hw: Hardware) -> list[tuple[int, int]]:
    """(GPUs per node, nodes) with more ranks than `hw`, fewest first: fill a node to 8 GPUs, then add nodes."""
    within = [(g, 1) for g in range(hw.gpus + 1, 9)] if hw.nodes == 1 else []
    gpus = max(hw.gpus, 8) if hw.nodes == 1 else hw.gpus
    return within + [(gpus, n) for n in range(2 if hw.nodes == 1 else hw.nodes + 1, MAX_RANKS // gpus + 1)]


def _more_ranks(run: RunConfig, hw: Hardware, layout: Layout, fixed: _Fixed, micro: int, eval_batch: int | None,
                fsdp: str) -> list[Advice]:
    """The fewest ranks whose fully sharded memory fits, with the same global batch.

    `layout` is already fully sharded; `fsdp` is the config change that made it so ("" when it was, and
    then the present ranks are known not to fit).
    """
    global_bs = run.global_train_batch_size
    counts = ([(hw.gpus, hw.nodes)] if fsdp else []) + _rank_counts(hw)
    for gpus, nodes in counts:
        world = gpus * nodes
        if global_bs % world or (global_bs // world) % min(micro, global_bs // world):
            continue
        rank = global_bs // world
        mb = min(micro, rank)
        ev = None if eval_batch is None else (run.device_eval_batch_size or rank)
        peak = plan_memory(fixed.inputs(dataclasses.replace(layout, world_size=world), mb, rank // mb, ev)).peak
        if peak <= hw.capacity:
            where = f"--gpus {gpus}" + (f" --nodes {nodes}" if nodes > 1 else "") + f" ({world} ranks)"
            return [Advice(f"{fsdp}{where}", peak, True)]
    return []
