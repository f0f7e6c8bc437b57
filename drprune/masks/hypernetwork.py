"""Hypernetwork masks for dimension-independent structural pruning (DISP-LLM).

A small network (fixed random input embeddings, one per mask -> bidirectional GRU -> LayerNorm +
GeLU -> one linear head per mask) emits a logit for every prunable unit: per layer, its own
selection of residual dimensions for the attention input/output and the MLP input/output, its
intermediate channels and optionally its KV-head groups. The LLM stays frozen; only this network
trains, against cross-entropy + lambda * |ln(P / P_target)|.

P counts non-embedding parameters (`expected_params(..., embeddings=False)`): this generator never
changes the residual width, so embeddings and the output head are fixed costs, and `target_ratio`
is relative to the same non-embedding count.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drprune.errors import ConfigError, check_keys
from drprune.masks.base import MaskGenerator, MaskSet, config_keys, keyed_generator
from drprune.masks.l0 import L0MaskGenerator
from drprune.models.shapes import RESIDUAL_SELECTIONS, config_params, expected_params, mask_shape
from drprune.models.config import ModelConfig
from drprune.registry import MASK_GENERATORS

log = logging.getLogger(__name__)

EPS = 1e-6
TRAIN_MASKS = ("soft", "hard_st")  # DISP-LLM's soft Gumbel-sigmoid masks | hard straight-through samples


class HypernetworkMaskGenerator(MaskGenerator):
    """Per-layer residual selections, intermediate channels (and heads) from one GRU pass per step."""

    def __init__(
        self,
        cfg: ModelConfig,
        target_ratio: float | None = None,
        target_params: int | None = None,
        budget_weight: float = 4.0,
        temperature: float = 0.4,
        offset: float = 3.0,
        prune_heads: bool = False,
        embedding_dim: int = 64,
        hidden_size: int = 64,
        lr: float = 1e-3,
        seed: int = 0,
        train_masks: str = "soft",
        config_prefix: str = "model.mask_generator",
    ) -> None:
        super().__init__()
        if train_masks not in TRAIN_MASKS:
            raise ConfigError(f"{config_prefix}.train_masks={train_masks!r} must be one of {', '.join(TRAIN_MASKS)} "
                              "(soft: DISP-LLM's soft Gumbel-sigmoid masks; hard_st: hard samples, straight-through)")
        self.train_masks = train_masks
        self.cfg = cfg
        self.kinds = (*RESIDUAL_SELECTIONS, "intermediate", *(("head",) if prune_heads else ()))
        self.full_params = config_params(cfg, embeddings=False)
        self.target_params = _resolve_target(cfg, self.kinds, target_ratio, target_params, config_prefix)
        for key, value in (("budget_weight", budget_weight), ("temperature", temperature), ("lr", lr),
                           ("embedding_dim", embedding_dim), ("hidden_size", hidden_size)):
            if not value > 0:
                raise ConfigError(f"{config_prefix}.{key}={value!r} must be positive")
        self.budget_weight, self.temperature, self.offset, self.lr = budget_weight, temperature, offset, lr
        self.settings = dict(target_params=self.target_params, budget_weight=budget_weight,
                             temperature=temperature, offset=offset, prune_heads=prune_heads,
                             embedding_dim=embedding_dim, hidden_size=hidden_size, lr=lr, seed=seed,
                             train_masks=train_masks)
        n_masks = cfg.n_layers * len(self.kinds)
        inputs = torch.randn(n_masks, embedding_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("inputs", inputs)  # fixed, saved with the checkpoint
        self.gru = nn.GRU(embedding_dim, hidden_size, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * hidden_size)
        bound = 1 / math.sqrt(2 * hidden_size)
        self.head_weight = nn.ParameterDict({
            k: nn.Parameter(torch.empty(cfg.n_layers, 2 * hidden_size, mask_shape(k, cfg)[1]).uniform_(-bound, bound))
            for k in self.kinds
        })
        self.head_bias = nn.ParameterDict({k: nn.Parameter(torch.zeros(mask_shape(k, cfg))) for k in self.kinds})
        self._budget_masks: MaskSet | None = None
        self.seed, self._step, self._draws = seed, 0, 0

    def logits(self) -> dict[str, Tensor]:
        """Per mask kind [L, n] logits plus the offset: > 0 means keep.

        Always fp32 (outside autocast), so training-time eval masks and exported masks agree bit for bit.
        """
        with torch.autocast(self.inputs.device.type, enabled=False):
            features, _ = self.gru(self.inputs.unsqueeze(0).float())
            features = F.gelu(self.norm(features[0])).view(self.cfg.n_layers, len(self.kinds), -1)
            return {
                k: torch.einsum("lh,lhn->ln", features[:, j], self.head_weight[k]) + self.head_bias[k] + self.offset
                for j, k in enumerate(self.kinds)
            }

    def forward(self) -> MaskSet:
        logits = self.logits()
        if not self.training:
            return MaskSet({k: _deterministic(v) for k, v in logits.items()})
        if self.train_masks == "soft":
            # DISP-LLM: the model sees soft Gumbel-sigmoid masks; the budget counts their hard
            # threshold (>= 0.5, straight-through), a noisy sample of the size.
            soft = {k: self._soft_sample(v) for k, v in logits.items()}
            self._budget_masks = MaskSet({k: self._straight_through(v >= 0.5, v, logits[k], probs=True)
                                          for k, v in soft.items()})
            return MaskSet(soft)
        # hard_st: the budget counts the noise-free masks (what eval and compaction keep), so the
        # exported size converges to the target; cross-entropy sees hard noisy samples, which explore.
        self._budget_masks = MaskSet({k: self._straight_through(v > 0, v / self.temperature, v)
                                      for k, v in logits.items()})
        return MaskSet({k: self._sample(v) for k, v in logits.items()})

    def set_step(self, step: int) -> None:
        self._step, self._draws = step, 0

    def _uniform(self, like: Tensor) -> Tensor:
        """Noise as a pure function of (seed, step, rank, draw), drawn on the logits' device."""
        gen = keyed_generator(like.device, self.seed, self._step, self._draws)
        self._draws += 1
        return torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    def _sample(self, logits: Tensor) -> Tensor:
        """Gumbel-sigmoid sample; forward value is hard 0/1, gradient is the soft sample's."""
        u = self._uniform(logits).clamp(EPS, 1 - EPS)
        noisy = (logits + torch.log(u) - torch.log1p(-u)) / self.temperature
        return self._straight_through(noisy > 0, noisy, logits)

    def _soft_sample(self, logits: Tensor) -> Tensor:
        """sigmoid((logit + Gumbel noise) / T), as DISP-LLM's `gumbel_softmax_sample`."""
        u = self._uniform(logits).clamp(EPS, 1 - EPS)
        return torch.sigmoid((logits - torch.log(-torch.log(u))) / self.temperature)

    @staticmethod
    def _straight_through(keep: Tensor, soft: Tensor, logits: Tensor, probs: bool = False) -> Tensor:
        """Exactly 0/1 forward, the gradient of sigmoid(soft) (or of `soft` itself when `probs`)."""
        soft = soft if probs else torch.sigmoid(soft)
        hard = _at_least_one(keep, logits).to(soft.dtype)
        return hard + (soft - soft.detach())

    @torch.no_grad()
    def hard_masks(self) -> MaskSet:
        """Noise-free 0/1 masks: the same weights always compact to the same model."""
        return MaskSet({k: _deterministic(v) for k, v in self.logits().items()})

    def regularization(self, masks: MaskSet) -> tuple[Tensor, dict[str, Tensor | float]]:
        """lambda * |ln(P / P_target)|, P from the last training forward's budget masks (see `forward`).

        Stats stay tensors (no host sync in the step) until a logger reads them.
        """
        budget = self._budget_masks if self.training and self._budget_masks is not None else masks
        kept = expected_params(self.cfg, budget, embeddings=False)
        loss = self.budget_weight * torch.log(kept / self.target_params).abs()
        with torch.no_grad():
            sampled = expected_params(self.cfg, masks, embeddings=False)
            sizes = {f"expected_size/{k}": v.detach().sum(-1).mean() for k, v in budget.items()}  # per layer
            kept = kept.detach()
        return loss, {"expected_params": kept, "kept_ratio": kept / self.full_params,
                      "sampled_ratio": sampled / self.full_params,
                      "target_ratio": self.target_params / self.full_params, "budget_loss": loss.detach(), **sizes}

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's config rides in checkpoints, so `drprune compact` can rebuild it alone."""
        return {"name": "hypernetwork", "params": dict(self.settings)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("params", {}) if isinstance(state, dict) else {}
        for key in ("target_params", "prune_heads", "embedding_dim", "hidden_size", "seed"):
            if key in saved and saved[key] != self.settings[key]:
                raise ValueError(f"checkpoint hypernetwork has {key}={saved[key]!r} but this run has "
                                 f"{self.settings[key]!r}")

    def model_parameters_frozen(self) -> bool:
        return True

    def param_groups(self, lag_lr: float) -> list[dict[str, Any]]:
        """The hypernetwork trains at its own `lr` (optimizer.lag_lr is for Lagrange multipliers)."""
        return [{"params": list(self.parameters()), "lr": self.lr, "weight_decay": 0.0}]


def _at_least_one(keep: Tensor, logits: Tensor) -> Tensor:
    """Force the highest-logit unit on in every row that would otherwise keep nothing."""
    empty = ~keep.any(-1, keepdim=True)
    best = F.one_hot(logits.argmax(-1), logits.shape[-1]).bool()
    return keep | (empty & best)


def _deterministic(logits: Tensor) -> Tensor:
    return _at_least_one(logits > 0, logits).to(logits.dtype)


def _resolve_target(cfg: ModelConfig, kinds: tuple[str, ...], ratio: float | None, count: int | None,
                    prefix: str) -> int:
    """Target non-embedding parameter count, checked against what one unit per mask must keep."""
    full = config_params(cfg, embeddings=False)
    if (ratio is None) == (count is None):
        raise ConfigError(f"set exactly one of {prefix}.target_ratio (fraction of the {full} non-embedding "
                          f"parameters) or {prefix}.target_params")
    if ratio is not None:
        if not 0 < float(ratio) <= 1:
            raise ConfigError(f"{prefix}.target_ratio={ratio!r} must be in (0, 1]")
        count = round(float(ratio) * full)
    if not isinstance(count, int) or not 0 < count <= full:
        raise ConfigError(f"{prefix}.target_params={count!r} must be a positive integer <= {full} "
                          "(the source's non-embedding parameters)")
    floor = int(expected_params(cfg, {k: F.one_hot(torch.zeros(mask_shape(k, cfg)[0], dtype=torch.long, device="cpu"),
                                                    mask_shape(k, cfg)[1]).float() for k in kinds},
                                embeddings=False))
    if count < floor:
        raise ConfigError(f"{prefix}: target of {count} parameters is below {floor}, the size left when every "
                          "mask keeps its one required unit; raise target_ratio/target_params")
    return count


@MASK_GENERATORS.register("hypernetwork")
def build_hypernetwork(cfg: ModelConfig, params: Mapping[str, Any], prefix: str) -> HypernetworkMaskGenerator:
    """From the `model.mask_generator` node; L0-only keys left over from a base config (a `name=hypernetwork`
    override keeps the base's L0 keys in the node) are ignored."""
    params = dict(params)
    valid = config_keys(HypernetworkMaskGenerator)
    l0_only = set(config_keys(L0MaskGenerator)) - set(valid)
    ignored = sorted(l0_only & set(params))
    if ignored:
        log.info("%s: hypernetwork ignores L0-only keys %s", prefix, ignored)
    check_keys(set(params) - l0_only, valid, prefix)
    kwargs = {k: v for k, v in params.items() if k in valid}
    return HypernetworkMaskGenerator(cfg, config_prefix=prefix, **kwargs)
