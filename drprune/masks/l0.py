"""Hard-concrete L0 masks toward a target shape (CoFi / Sheared-LLaMA)."""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from drprune.errors import ConfigError, UserError, check_keys
from drprune.masks.base import MaskGenerator, MaskSet, config_keys, keyed_generator
from drprune.models.shapes import expected_params
from drprune.models.config import ModelConfig
from drprune.registry import MASK_GENERATORS

log = logging.getLogger(__name__)

LIMIT_L, LIMIT_R, BETA, EPS = -0.1, 1.1, 2.0 / 3.0, 1e-6
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
EVAL_SHARPEN = 0.8  # deterministic masks use sigmoid(log_alpha / BETA * 0.8), as in the anchors
L0_MODULES = ("head", "head_layer", "mlp", "layer", "intermediate", "hidden")
TARGET_KEYS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "intermediate_size")


class HardConcrete(nn.Module):
    """`rows` independent groups of `n` gates, each group pruned to `target_size` units."""

    def __init__(self, rows: int, n: int, target_size: int, droprate_init: float) -> None:
        super().__init__()
        self.n, self.target_size = n, target_size
        init = math.log(1 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(torch.full((rows, n), init))

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.target_size / self.n

    def constrain(self) -> None:
        """Clamp the logits to [ln 0.01, ln 100]; after an optimizer step, never inside forward."""
        with torch.no_grad():
            self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def keep_prob(self) -> Tensor:
        """P(z > 0) per gate."""
        return 1 - torch.sigmoid(BETA * math.log(-LIMIT_L / LIMIT_R) - self.log_alpha)

    def expected_sparsity(self) -> Tensor:
        """Per row: 1 - expected kept fraction."""
        return 1 - self.keep_prob().sum(-1) / self.n

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A hard-concrete sample, with noise drawn on the logits' device (no host copy)."""
        u = torch.rand(self.log_alpha.shape, generator=generator, device=self.log_alpha.device,
                       dtype=self.log_alpha.dtype)
        u = u * (1 - 2 * EPS) + EPS
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)

    def deterministic(self, to_target: bool) -> Tensor:
        """Soft keep values with the smallest `n - kept` of each row zeroed."""
        soft = torch.sigmoid(self.log_alpha / BETA * EVAL_SHARPEN)
        if to_target:
            n_zero = torch.full((soft.shape[0], 1), self.n - self.target_size, device=soft.device)
        else:
            n_zero = torch.round(self.n - self.keep_prob().sum(-1, keepdim=True)).long()
        rank = soft.argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = smallest of its row, all rows at once
        return torch.where(rank < n_zero, torch.zeros_like(soft), soft)


def resolve_targets(cfg: ModelConfig, modules: list[str], target: Mapping[str, Any], prefix: str) -> dict[str, int]:
    """Validate `target_model` against the source and return the kept size of each module.

    Raised before any heavy work, naming the key and the fix.
    """
    unknown = [m for m in modules if m not in L0_MODULES]
    if unknown:
        raise ConfigError(f"{prefix}.pruning_modules has unknown modules {unknown}; valid: {list(L0_MODULES)}")
    check_keys(target, TARGET_KEYS, f"{prefix}.target_model")
    source = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  n_layers=cfg.n_layers, intermediate_size=cfg.intermediate_size)
    needs = {"head": "n_heads", "intermediate": "intermediate_size", "hidden": "d_model",
             "layer": "n_layers", "head_layer": "n_layers", "mlp": "n_layers"}
    for module in modules:
        if target.get(needs[module]) is None:
            raise ConfigError(
                f"{prefix}.target_model.{needs[module]} is required when pruning_modules contains {module!r}"
            )
    for key, value in target.items():
        if value is None:
            continue
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{prefix}.target_model.{key}={value!r} must be a positive integer")
        if value > source[key]:
            raise ConfigError(
                f"{prefix}.target_model.{key}={value} is larger than the source model's {key}={source[key]}: "
                "a pruning target must be no larger than the source"
            )
    sizes: dict[str, int] = {}
    if "head" in modules:
        n_heads = target["n_heads"]
        if n_heads % cfg.group_size:
            raise ConfigError(
                f"{prefix}.target_model.n_heads={n_heads} is not a whole number of GQA groups: the source "
                f"has {cfg.group_size} query heads per KV head, so use a multiple of {cfg.group_size}"
            )
        kv = target.get("n_kv_heads")
        if kv is not None and kv * cfg.group_size != n_heads:
            raise ConfigError(
                f"{prefix}.target_model.n_kv_heads={kv} does not match n_heads={n_heads} with "
                f"{cfg.group_size} query heads per KV head: use n_kv_heads={n_heads // cfg.group_size}"
            )
        sizes["head"] = n_heads // cfg.group_size
    if "intermediate" in modules:
        sizes["intermediate"] = target["intermediate_size"]
    if "hidden" in modules:
        sizes["hidden"] = target["d_model"]
        if cfg.tie_word_embeddings:
            log.info("hidden pruning with tied embeddings: the shared matrix is scaled once at compaction")
    for module in ("layer", "head_layer", "mlp"):
        if module in modules:
            sizes[module] = target["n_layers"]
    return sizes


class L0MaskGenerator(MaskGenerator):
    """Hard-concrete gates per module with a Lagrangian pulling expected sparsity to the target."""

    def __init__(
        self,
        cfg: ModelConfig,
        pruning_modules: list[str],
        target_model: Mapping[str, Any],
        lagrangian_warmup_steps: int = 0,
        start_sparsity: float = 0.0,
        eval_target_model: bool = True,
        droprate_init: float = 0.01,
        seed: int = 0,
        init_masks: str | None = None,
        init_logit: float | None = None,
        config_prefix: str = "model.mask_generator",
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sizes = resolve_targets(cfg, list(pruning_modules), dict(target_model), config_prefix)
        if not 0 < droprate_init < 1:
            raise ConfigError(f"{config_prefix}.droprate_init={droprate_init} must be in (0, 1)")
        self.warmup = int(lagrangian_warmup_steps)
        self.init_params: dict[str, Any] = dict(
            pruning_modules=list(pruning_modules), target_model=dict(target_model),
            lagrangian_warmup_steps=self.warmup, start_sparsity=start_sparsity,
            eval_target_model=eval_target_model, droprate_init=droprate_init, seed=seed,
        )
        self.seed = seed
        self._step, self._draws_this_step = 0, 0
        self._eval_masks: tuple[tuple[int, ...], MaskSet] | None = None  # (logits' versions, masks)
        self.start_sparsity = start_sparsity
        self.eval_target_model = eval_target_model
        shapes = {  # module -> (rows, gates per row)
            "head": (cfg.n_layers, cfg.n_kv_heads), "intermediate": (cfg.n_layers, cfg.intermediate_size),
            "hidden": (1, cfg.d_model), "layer": (1, cfg.n_layers), "head_layer": (1, cfg.n_layers),
            "mlp": (1, cfg.n_layers),
        }
        self.gates = nn.ModuleDict(
            {m: HardConcrete(*shapes[m], self.sizes[m], droprate_init) for m in self.sizes}
        )
        # One element each, not 0-d (FSDP refuses scalars); they climb through `ascend` in the loss.
        self.lambda_1 = nn.ParameterDict({m: nn.Parameter(torch.zeros(1)) for m in self.sizes})
        self.lambda_2 = nn.ParameterDict({m: nn.Parameter(torch.zeros(1)) for m in self.sizes})
        self._register_load_state_dict_pre_hook(_scalar_multipliers_to_vectors)
        if init_logit is not None and init_masks is None:
            raise ConfigError(f"{config_prefix}.init_logit={init_logit} needs {config_prefix}.init_masks: it is "
                              "the logit magnitude of the warm start")
        if init_logit is not None and not 0 < init_logit <= LOG_ALPHA_MAX:
            raise ConfigError(f"{config_prefix}.init_logit={init_logit} must be in (0, {LOG_ALPHA_MAX:.3f}] "
                              "(logits are clamped to +-ln 100)")
        if init_masks is not None:
            self._warm_start(init_masks, init_logit, f"{config_prefix}.init_masks")

    def _warm_start(self, path: str, logit: float | None, key: str) -> None:
        """Start the logits from a hard MaskSet file (e.g. a one-shot pruner's selection): kept units
        at `logit` (default: the usual keep logit, ln((1 - droprate_init) / droprate_init)), dropped
        ones at its negative, so training refines that selection. A smaller logit leaves the masks
        free to swap units within a short run (a gap of 2 * logit to close) at the price of noisier
        masks. The target then holds from step 0: a warm-up ramp from zero sparsity would first pull
        the Lagrangian toward re-enabling every dropped unit. Not stored in the generator's extra
        state: checkpoints carry the trained logits themselves."""
        try:
            masks = MaskSet.load(path, self.cfg)
        except UserError as err:
            raise ConfigError(f"{key}: {err}") from err
        with torch.no_grad():
            for name, gate in self.gates.items():
                if name in masks:
                    keep = masks[name].reshape(gate.log_alpha.shape) != 0
                    high = gate.log_alpha.abs().max() if logit is None else torch.tensor(float(logit))
                    gate.log_alpha.copy_(torch.where(keep, high, -high))
        if self.warmup:
            log.info("warm start: the masks are already at the target, so the sparsity warm-up "
                     "(lagrangian_warmup_steps=%d) is skipped", self.warmup)
            self.warmup = 0
        log.info("L0 logits warm-started from %s (%s)", path, ", ".join(n for n in self.gates if n in masks))

    def set_step(self, step: int) -> None:
        self._step, self._draws_this_step = step, 0

    def _noise(self) -> torch.Generator:
        """Noise keyed by (seed, step, draw within the step): a resumed run samples the same masks
        as an uninterrupted one, whatever else consumed the global RNG in between."""
        self._draws_this_step += 1
        return keyed_generator(self.gates[next(iter(self.gates))].log_alpha.device, self.seed, self._step,
                               self._draws_this_step)

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's config rides in checkpoints, so `drprune compact` can rebuild it alone."""
        return {"name": "l0", "params": self.init_params}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("params", {}) if isinstance(state, dict) else {}
        for key in ("pruning_modules", "target_model"):
            if key in saved and saved[key] != self.init_params[key]:
                raise ValueError(
                    f"checkpoint mask generator has {key}={saved[key]!r} but this run has {self.init_params[key]!r}"
                )

    def _as_maskset(self, values: dict[str, Tensor]) -> MaskSet:
        out = MaskSet()
        for name, v in values.items():
            out[name] = v if name in ("head", "intermediate") else v.reshape(-1)
        return out

    def after_optimizer_step(self) -> None:
        """Clamp every gate's logits: outside forward, so no graph or FSDP view sees an in-place change."""
        for gate in self.gates.values():
            gate.constrain()

    def forward(self) -> MaskSet:
        if self.training:
            noise = self._noise()
            return self._as_maskset({m: g.sample(noise) for m, g in self.gates.items()})
        key = tuple(g.log_alpha._version for g in self.gates.values())  # bumped by every in-place update
        if torch.is_grad_enabled() or self._eval_masks is None or self._eval_masks[0] != key:
            masks = self._as_maskset({m: g.deterministic(self.eval_target_model) for m, g in self.gates.items()})
            if torch.is_grad_enabled():
                return masks
            self._eval_masks = (key, masks)  # one computation per evaluation, not per eval batch
        return self._eval_masks[1]

    def hard_masks(self) -> MaskSet:
        with torch.no_grad():
            return self._as_maskset({m: g.deterministic(True) for m, g in self.gates.items()})

    def target_sparsity(self, module: str) -> float:
        """Linear warm-up from start_sparsity to the module's target sparsity."""
        final = self.gates[module].target_sparsity
        frac = 1.0 if self.warmup <= 0 else min(1.0, self._step / self.warmup)
        return self.start_sparsity + (final - self.start_sparsity) * frac

    def regularization(self, masks: MaskSet) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The Lagrangian; its stats stay tensors (no host sync in the step) until a logger reads them."""
        loss = torch.zeros((), device=self.lambda_1[next(iter(self.sizes))].device)
        stats: dict[str, Tensor | float] = {}
        for m, gate in self.gates.items():
            expected = gate.expected_sparsity()
            target = self.target_sparsity(m)
            gap = expected - target
            lam_1, lam_2 = ascend(self.lambda_1[m]), ascend(self.lambda_2[m])
            loss = loss + (lam_1 * gap + lam_2 * gap.pow(2)).mean()
            expected = expected.detach()
            stats[f"expected_sparsity/{m}"] = expected.mean()
            stats[f"expected_size/{m}"] = (1 - expected).mean() * gate.n  # kept units per row
            stats[f"target_sparsity/{m}"] = target
            stats[f"lambda_1/{m}"] = self.lambda_1[m].detach()[0]
            stats[f"lambda_2/{m}"] = self.lambda_2[m].detach()[0]
        with torch.no_grad():
            stats["expected_params"] = expected_params(self.cfg, self.keep_probs(), embeddings=False)
        stats["lagrangian_loss"] = loss.detach()
        return loss, stats

    @property
    def target_params(self) -> int:
        """Non-embedding parameters at the final target (every gate kept at its target fraction)."""
        with torch.no_grad():
            keep = {m: torch.full_like(g.log_alpha, 1 - g.target_sparsity) for m, g in self.gates.items()}
            return int(round(float(expected_params(self.cfg, self._as_maskset(keep), embeddings=False))))

    def keep_probs(self) -> MaskSet:
        return self._as_maskset({m: g.keep_prob() for m, g in self.gates.items()})

    def param_groups(self, lag_lr: float) -> list[dict[str, Any]]:
        """Mask logits and Lagrange multipliers both at lag_lr, never weight-decayed."""
        return [
            {"params": [g.log_alpha for g in self.gates.values()], "lr": lag_lr, "weight_decay": 0.0},
            {"params": list(self.lambda_1.values()) + list(self.lambda_2.values()), "lr": lag_lr,
             "weight_decay": 0.0},
        ]


class _Ascend(torch.autograd.Function):
    """Identity forward, negated gradient backward: the Lagrange multipliers maximise the Lagrangian.

    Explicit in the loss's graph, so every wrapper (DDP, FSDP, activation checkpointing) and every
    optimizer sees the ascent gradient; a tensor hook on the parameter is lost under FSDP.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


def ascend(x: Tensor) -> Tensor:
    """`x` in the forward pass; in backward its gradient is negated (gradient ascent on `x`)."""
    return _Ascend.apply(x)


def _scalar_multipliers_to_vectors(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before the multipliers were 1-element tensors hold them 0-d: reshape on load."""
    for key, value in list(state_dict.items()):
        if key.startswith((f"{prefix}lambda_1.", f"{prefix}lambda_2.")) and torch.is_tensor(value) and value.dim() == 0:
            state_dict[key] = value.reshape(1)


@MASK_GENERATORS.register("l0")
def build_l0(cfg: ModelConfig, params: Mapping[str, Any], prefix: str) -> L0MaskGenerator:
    """From the `model.mask_generator` (or Sheared's `model.l0_module`) node."""
    params = dict(params)
    check_keys(params, config_keys(L0MaskGenerator), prefix)
    params.setdefault("pruning_modules", ["head", "intermediate", "layer", "hidden"])
    if "target_model" not in params:
        raise ConfigError(f"{prefix}.target_model is required: the shape to prune to (d_model, n_heads, ...)")
    params["lagrangian_warmup_steps"] = _batches(params.get("lagrangian_warmup_steps", 0), prefix)
    return L0MaskGenerator(cfg, config_prefix=prefix, **params)


def _batches(value: Any, prefix: str) -> int:
    """'320ba' or 320 -> 320."""
    text = str(value)
    digits = text[:-2] if text.endswith("ba") else text
    if not digits.isdigit():
        raise ConfigError(f"{prefix}.lagrangian_warmup_steps={value!r} must be a number of batches like 320ba")
    return int(digits)
