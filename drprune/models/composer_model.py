"""Composer wrapper: cross-entropy + mask regularisation, overall and per-domain metrics."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import Tensor
from torchmetrics import Metric

from drprune.masks.base import MaskGenerator
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder

IGNORE_INDEX = -100


class DomainCrossEntropy(Metric):
    """Mean token cross-entropy over the samples of one domain (all samples when domain is None)."""

    full_state_update = False

    def __init__(self, domain: int | None = None) -> None:
        super().__init__()
        self.domain = domain
        self.add_state("loss_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, tokens: Tensor, set_ids: Tensor | None) -> None:
        """loss_sum, tokens: per sample [B]; set_ids: domain of each sample [B]."""
        if self.domain is not None:
            if set_ids is None:
                return
            keep = set_ids == self.domain
            loss_sum, tokens = loss_sum[keep], tokens[keep]
        self.loss_sum += loss_sum.double().sum()
        self.tokens += tokens.double().sum()

    def compute(self) -> Tensor:
        if self.tokens == 0:
            return torch.tensor(float("nan"))
        return (self.loss_sum / self.tokens).float()


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample summed next-token loss and token count, [B] each."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    return loss.sum(-1), (targets != IGNORE_INDEX).sum(-1)


class PrunableLM(ComposerModel):
    """The decoder (`self.model`) plus an optional mask generator (`self.mask_generator`)."""

    def __init__(self, cfg: ModelConfig, mask_generator: MaskGenerator | None = None,
                 set_names: list[str] | None = None) -> None:
        super().__init__()
        self.model = PrunableDecoder(cfg)
        self.mask_generator = mask_generator
        self.set_names = list(set_names or [])
        self.last_stats: dict[str, float] = {}
        if mask_generator is not None and mask_generator.model_parameters_frozen():
            self.model.requires_grad_(False)
        self.train_metrics = self._metrics()
        self.eval_metrics = self._metrics()

    def _metrics(self) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {"LanguageCrossEntropy": DomainCrossEntropy()}
        for i, name in enumerate(self.set_names):
            metrics[f"{name}_LanguageCrossEntropy"] = DomainCrossEntropy(i)
        return metrics

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        masks = self.mask_generator() if self.mask_generator is not None else None
        logits = self.model(batch["input_ids"].long(), masks)
        return {"logits": logits, "masks": masks}

    def loss(self, outputs: dict[str, Any], batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        loss_sum, tokens = token_losses(outputs["logits"], batch["labels"].long())
        # Kept for metrics and data-mixture callbacks (per-domain training losses).
        outputs["loss_sum"], outputs["tokens"] = loss_sum.detach(), tokens
        ce = loss_sum.sum() / tokens.sum().clamp(min=1)
        losses = {"ce_loss": ce}
        total = ce
        if self.mask_generator is not None and outputs["masks"] is not None:
            reg, self.last_stats = self.mask_generator.regularization(outputs["masks"])
            losses["mask_loss"] = reg
            total = total + reg
        losses["total"] = total
        return losses

    def eval_forward(self, batch: Mapping[str, Tensor], outputs: Any | None = None) -> dict[str, Any]:
        if outputs is not None:
            return outputs
        outputs = self.forward(batch)
        outputs["loss_sum"], outputs["tokens"] = token_losses(outputs["logits"], batch["labels"].long())
        return outputs

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        if "loss_sum" not in outputs:
            outputs["loss_sum"], outputs["tokens"] = token_losses(outputs["logits"], batch["labels"].long())
        metric.update(outputs["loss_sum"], outputs["tokens"], batch.get("set"))

    def param_groups(self, lr: float, weight_decay: float, lag_lr: float) -> list[dict[str, Any]]:
        """Model weights at lr (none when the LLM is frozen); mask parameters as their generator says."""
        groups = []
        weights = [p for p in self.model.parameters() if p.requires_grad]
        if weights:
            groups.append({"params": weights, "lr": lr, "weight_decay": weight_decay})
        if self.mask_generator is not None:
            groups.extend(self.mask_generator.param_groups(lag_lr))
        return groups
