"""One home for how a run is sharded: FSDP version, wrapping, activation checkpointing, and the pruning state.

Composer builds the FSDP units (every child of the ComposerModel, and inside it every module its
`fsdp_wrap_fn` names: one unit per decoder block). This module decides everything around that, once,
before the model is built:

- **Which FSDP.** `fsdp_config` (the seeds' key) is FSDP1 unless `FSDP_VERSION=2` is set (Composer's
  switch). Composer's FSDP1 path needs CUDA; FSDP2 also runs on CPU over gloo. FSDP2 has no
  `sharding_strategy`: FULL_SHARD and SHARD_GRAD_OP become `reshard_after_forward` true and false
  (Composer itself would drop the key with a warning and always fully shard).
- **The pruning state stays whole.** The mask generator (L0 logits and multipliers, hypernetwork) is
  kilobytes to megabytes: it is never an FSDP unit (`_fsdp_wrap = False`, honoured by both Composer
  paths), so it stays fp32 and identical on every rank, and its gradients are averaged over ranks by
  a hook on each of its parameters, as DDP would.
- **Weights are loaded once.** Only global rank 0 reads checkpoint weights; the other ranks build
  the student and the teacher on the meta device, and Composer broadcasts rank 0's weights as it
  shards (FSDP2 detects the mixed start; FSDP1 gets `sync_module_states`, on by default here).
- **Activation checkpointing is non-reentrant**: masks reach blocks in a dict, which reentrant
  checkpointing does not track (it breaks L0 and silently starves the hypernetwork of gradient).
  The run-level `activation_checkpointing: true` asks for it with or without FSDP: under FSDP it is
  `fsdp_config.activation_checkpointing`; without, drprune applies Composer's own `apply_ac` (one
  wrapper per block, as Composer's FSDP2 path does), which Composer only does for sharded runs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import torch
from composer.algorithms import GradientClipping
from composer.core import Algorithm, Event, State
from composer.distributed.activation_checkpointing import apply_ac, generate_composer_model_check_fn
from composer.loggers import Logger
from composer.utils import FSDP2Config, FSDPConfig, dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from drprune.errors import ConfigError

log = logging.getLogger(__name__)

FSDP2_RESHARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}  # strategy -> reshard_after_forward
FSDP2_KEYS = {"activation_checkpointing", "activation_cpu_offload", "state_dict_type", "mixed_precision",
              "verbose", "load_monolith_rank0_only"}
# FSDP1 tuning knobs FSDP2 has no counterpart for; accepted (so one YAML serves both) and logged as unused
FSDP1_ONLY_KEYS = {"use_orig_params", "limit_all_gathers", "forward_prefetch", "backward_prefetch",
                   "forward_prefetch_limit", "backward_prefetch_limit", "sync_module_states", "cpu_offload",
                   "activation_checkpointing_reentrant", "te_checkpoint_wrapper", "te_shard_fp8_weight",
                   "ignored_modules", "auto_wrap", "process_group", "keep_low_precision_grads",
                   "data_parallel_shard_degree", "data_parallel_replicate_degree", "sharded_ckpt_prefix_dir",
                   "device_mesh", "verbose_checkpointing"}


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """How the run is parallelised: `version` 0 is DDP (or one process), 1 and 2 the FSDP versions."""

    version: int = 0
    config: FSDPConfig | FSDP2Config | None = None
    checkpoint_blocks: bool = False  # unsharded: drprune wraps each block (sharded: Composer, from `config`)

    @property
    def sharded(self) -> bool:
        return self.version > 0

    def parallelism_config(self) -> dict[str, Any] | None:
        """What the Composer Trainer takes as `parallelism_config`."""
        return None if self.config is None else {"fsdp": self.config}


def fsdp_version() -> int:
    """Composer's switch: FSDP_VERSION=2 selects FSDP2, anything else FSDP1."""
    value = os.environ.get("FSDP_VERSION", "1").strip()
    if value not in ("1", "2"):
        raise ConfigError(f"FSDP_VERSION={value!r} must be 1 or 2 (2 = FSDP2, which also runs on CPU)")
    return int(value)


def plan_sharding(fsdp_config: Mapping[str, Any] | None, *, has_mask_generator: bool,
                  cuda: bool | None = None, activation_checkpointing: bool = False) -> ShardingPlan:
    """Check `fsdp_config` against this machine and the run, and translate it for the chosen FSDP version.

    `activation_checkpointing` is the run-level key: without FSDP, drprune checkpoints the blocks itself.
    """
    if not fsdp_config:
        return ShardingPlan(checkpoint_blocks=activation_checkpointing)
    cfg = dict(fsdp_config)
    if activation_checkpointing:
        if cfg.get("activation_checkpointing", True) is False:
            raise ConfigError("activation_checkpointing=true contradicts fsdp_config.activation_checkpointing=false: "
                              "set one of them")
        cfg["activation_checkpointing"] = True
    cuda = torch.cuda.is_available() if cuda is None else cuda
    version = fsdp_version()
    checkpointing = bool(cfg.get("activation_checkpointing", False))
    if has_mask_generator and checkpointing and cfg.get("activation_checkpointing_reentrant", False):
        raise ConfigError(
            "fsdp_config.activation_checkpointing_reentrant=true cannot train a mask generator: reentrant "
            "checkpointing does not track the masks a block receives (L0 fails, the hypernetwork silently gets no "
            "gradient from the loss); drop the key or set it to false (non-reentrant, the default)")
    if version == 1:
        if not cuda:
            raise ConfigError(
                "fsdp_config asks for FSDP1, which in Composer needs CUDA, and this machine has none: set "
                "FSDP_VERSION=2 in the environment to shard with FSDP2 (it runs on CPU over gloo), or drop "
                "fsdp_config to train with DDP")
    strategy = str(cfg.pop("sharding_strategy", "FULL_SHARD")).upper()
    if strategy not in FSDP2_RESHARD:
        raise ConfigError(
            f"fsdp_config.sharding_strategy={strategy} is not supported: use FULL_SHARD or SHARD_GRAD_OP (every "
            "rank holds one shard, which drprune's gradient clipping and replicated mask state assume), or drop "
            "fsdp_config to train with DDP")
    if version == 1:
        cfg.setdefault("activation_checkpointing_reentrant", False)
        cfg.setdefault("sync_module_states", True)  # rank 0 loads the weights, the others start on meta
        return ShardingPlan(1, FSDPConfig(sharding_strategy=strategy, **cfg))
    unused = sorted(k for k in cfg if k in FSDP1_ONLY_KEYS)
    if unused:
        log.info("FSDP2: fsdp_config keys %s are FSDP1 settings and have no effect", unused)
    kwargs = {k: v for k, v in cfg.items() if k in FSDP2_KEYS}
    kwargs["reshard_after_forward"] = FSDP2_RESHARD[strategy]
    return ShardingPlan(2, FSDP2Config(**kwargs))


def prepare_model(model: nn.Module, plan: ShardingPlan) -> None:
    """Unsharded: checkpoint the blocks when asked. Sharded: keep the mask generator out of FSDP and
    average its gradients over ranks."""
    if plan.checkpoint_blocks:
        apply_ac(model, activation_checkpointing=True, activation_cpu_offload=False,
                 check_fn=generate_composer_model_check_fn(model))
        log.info("activation checkpointing: each decoder block's activations are recomputed in backward "
                 "(non-reentrant, Composer's apply_ac)")
    generator = getattr(model, "mask_generator", None)
    if not plan.sharded or generator is None:
        return
    generator._fsdp_wrap = False  # both Composer FSDP paths skip a child marked so: it stays whole and fp32
    if dist.get_world_size() > 1:
        for param in generator.parameters():
            if param.requires_grad:
                param.register_hook(_mean_over_ranks)
    log.info("FSDP%d: the mask generator (%d parameters) is replicated on every rank, in fp32, not sharded",
             plan.version, sum(p.numel() for p in generator.parameters()))


def _mean_over_ranks(grad: Tensor) -> Tensor:
    """What DDP does for a replicated parameter: each microbatch's gradient averaged over ranks (divided
    before the sum, in DDP's order of operations, so the two round alike)."""
    grad = grad / dist.get_world_size()
    dist.all_reduce(grad, reduce_operation="SUM")
    return grad


def sharding_algorithms(plan: ShardingPlan, clipping: tuple[str, float] | None) -> list[Algorithm]:
    """The Composer algorithms a run needs for its layout (gradient averaging and clipping)."""
    if not plan.sharded:
        return [] if clipping is None else [GradientClipping(*clipping)]
    if clipping is not None and clipping[0] not in ("norm", "value"):
        raise ConfigError(f"algorithms.gradient_clipping.clipping_type={clipping[0]!r} is not available under "
                          "FSDP: use norm or value")
    return [ShardedGradients(check_average=plan.version == 2, clipping=clipping)]


class ShardedGradients(Algorithm):
    """After the last microbatch: make sharded gradients the average over ranks, then clip them as DDP would.

    Averaging: FSDP2 reduce-scatters fp32/bf16 gradients with `ReduceOp.AVG`, which torch 2.7's gloo
    backend (the CPU one) silently treats as SUM, so on CPU every sharded gradient is world-size times
    too large (Adam hides a constant scale; clipping and the optimizer's eps do not). At the start of
    training one tiny reduce-scatter measures what AVG does here; where it summed, sharded gradients are
    divided by the measured factor (NCCL averages: factor 1, nothing done).

    Clipping: by the norm of the whole gradient, shards summed over ranks and the replicated mask
    generator counted once. Composer's GradientClipping fails under FSDP2 (torch's clip_grad_norm_
    refuses the mix of DTensor and plain gradients) and under FSDP1 clips each wrapped child by its own
    norm. One algorithm does both, in this order: Composer runs algorithms of "after" events in reverse.
    """

    def __init__(self, check_average: bool, clipping: tuple[str, float] | None) -> None:
        self.check_average, self.clipping, self.factor = check_average, clipping, 1.0

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_TRAIN_BATCH)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            if self.check_average:
                self.factor = reduce_scatter_avg_factor(state.device.tensor_to_device(torch.zeros(1)).device)
                if self.factor != 1.0:
                    log.warning("FSDP2: this backend's reduce-scatter AVG sums (factor %g); drprune divides the "
                                "sharded gradients to get their average over ranks", self.factor)
            return
        with torch.no_grad():
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            if self.factor != 1.0:
                for g in grads:
                    if isinstance(g, DTensor):
                        g.to_local().div_(self.factor)
            if self.clipping is None:
                return
            clipping_type, threshold = self.clipping
            if clipping_type == "value":
                for g in grads:
                    _local(g).clamp_(-threshold, threshold)
                return
            scale = torch.clamp(threshold / (global_grad_norm(state.model) + 1e-6), max=1.0)
            for g in grads:
                _local(g).mul_(scale.to(g.dtype))


def reduce_scatter_avg_factor(device: torch.device) -> float:
    """What a reduce-scatter with ReduceOp.AVG returns divided by the true average (1.0 when correct)."""
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return 1.0
    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    out = torch.zeros(1, device=device)
    torch_dist.reduce_scatter_tensor(out, torch.full((world,), float(rank + 1), device=device),
                                     op=torch_dist.ReduceOp.AVG)
    torch_dist.broadcast(out, src=0)  # every rank applies the same factor
    return float(out.item()) / ((world + 1) / 2)


def global_grad_norm(model: nn.Module) -> Tensor:
    """L2 norm of every gradient of the model: shards summed over ranks, replicated gradients counted once.

    Per-tensor norms as torch computes them, combined in fp64 on the device (no host sync per tensor).
    """
    replicated = {id(p) for m in model.modules() if getattr(m, "_fsdp_wrap", True) is False for p in m.parameters()}
    device = next(model.parameters()).device
    squares: dict[bool, list[Tensor]] = {True: [], False: []}
    for p in model.parameters():
        if p.grad is not None:
            norm = torch.linalg.vector_norm(_local(p.grad), dtype=torch.float32)
            squares[id(p) in replicated].append(norm.double().pow(2))

    def total(parts: list[Tensor]) -> Tensor:
        return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=device)

    sharded = total(squares[False])
    dist.all_reduce(sharded, reduce_operation="SUM")
    return (sharded + total(squares[True])).sqrt().float()


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a (possibly DTensor) gradient."""
    return t.to_local() if isinstance(t, DTensor) else t
