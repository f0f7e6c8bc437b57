"""Composer wrapper: cross-entropy (+ distillation KL) + mask regularisation, overall and per-domain metrics."""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Mapping

import torch
from composer.models import ComposerModel
from torch import Tensor, nn
from torchmetrics import Metric

from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.models.distill import DistillConfig
from drprune.models.losses import kd_token_losses, token_losses
from drprune.precision import cpu_autocast, fp32_region

if TYPE_CHECKING:  # a type only: masks sit above models in the package graph
    from drprune.masks.base import MaskGenerator

TEACHER = "teacher"  # attribute (and state-dict prefix) of the distillation teacher


class DomainCrossEntropy(Metric):
    """Mean token cross-entropy over the samples of one domain (all samples when domain is None)."""

    full_state_update = False
    output_key = "loss_sum"  # the per-sample sums this metric averages, from the model's outputs

    def __init__(self, domain: int | None = None) -> None:
        super().__init__()
        self.domain = domain
        self.add_state("loss_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, tokens: Tensor, set_ids: Tensor | None) -> None:
        """loss_sum, tokens: per sample [B]; set_ids: domain of each sample [B]."""
        loss_sum, tokens = loss_sum.double(), tokens.double()
        if self.domain is not None:
            if set_ids is None:
                return
            keep = set_ids == self.domain  # a select, not boolean indexing: no host sync
            loss_sum, tokens = torch.where(keep, loss_sum, 0.0), torch.where(keep, tokens, 0.0)
        self.loss_sum += loss_sum.sum()
        self.tokens += tokens.sum()

    def compute(self) -> Tensor:
        """NaN for a domain with no tokens yet (a tensor choice, not a Python branch: no host sync)."""
        nan = torch.full_like(self.loss_sum, math.nan)
        return torch.where(self.tokens > 0, self.loss_sum / self.tokens, nan).float()


class DomainKLDivergence(DomainCrossEntropy):
    """Mean token KL(teacher || student) (times T^2) over the samples of one domain, or all of them."""

    output_key = "kd_sum"


class PrunableLM(ComposerModel):
    """The decoder (`self.model`) plus an optional mask generator (`self.mask_generator`).

    With `distill` set, the loss is ce_weight * CE + kl_weight * KL(teacher || student) (+ mask
    regularisation) and `self.teacher` holds the teacher: a frozen, always-eval decoder that is a
    submodule (Composer moves, autocasts and FSDP-wraps it like the student) but is in no optimizer
    group and in no checkpoint (its keys are dropped from `state_dict()`; loading accepts state dicts
    without them and stays strict about every other key); the logged size (`self.model.num_params()`)
    leaves it out. `teacher=None` with `distill` means the student's own unmasked weights are the
    teacher, which only holds when the mask generator freezes the LLM (hypernetwork): no second copy.

    `on_meta` builds the decoder without storage: its weights come from a checkpoint (loaded into
    it, or broadcast from rank 0 by Composer's FSDP start, which sees a meta model on a rank).

    `cpu_autocast` (a dtype, from `drprune.precision.resolve_precision`) is torch's CPU autocast
    around forward and loss, which Composer does not apply on CPU. Whatever the autocast, the mask
    generator and its regularizer run in fp32 (`fp32_region`).
    """

    def __init__(self, cfg: ModelConfig, mask_generator: MaskGenerator | None = None,
                 set_names: list[str] | None = None, distill: DistillConfig | None = None,
                 teacher: PrunableDecoder | None = None, cpu_autocast: torch.dtype | None = None,
                 on_meta: bool = False) -> None:
        super().__init__()
        self.cpu_autocast = cpu_autocast
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            self.model = PrunableDecoder(cfg)
        # Checkpoints leave the teacher out; Composer's FSDP2 start clears this to broadcast all of it
        self.should_save_peft_only = True
        self.mask_generator = mask_generator
        self.set_names = list(set_names or [])
        self.last_stats: dict[str, Tensor | float] = {}  # the mask generator's, tensors until logged
        frozen = mask_generator is not None and mask_generator.model_parameters_frozen()
        if frozen:
            self.model.requires_grad_(False)
        if teacher is not None and distill is None:
            raise ValueError("a teacher needs a DistillConfig (the loss weights and temperature)")
        if distill is not None and teacher is None and not frozen:
            raise ValueError("distillation needs a teacher decoder unless the mask generator freezes the LLM "
                             "(then the unmasked student is the teacher)")
        self.distill = distill
        self.teacher: PrunableDecoder | None = None
        if teacher is not None:
            if teacher.cfg.vocab_size != cfg.vocab_size:
                raise ValueError(f"teacher vocab_size {teacher.cfg.vocab_size} != student vocab_size {cfg.vocab_size}")
            teacher.requires_grad_(False)
            self.teacher = teacher.eval()
            self.register_state_dict_post_hook(_drop_teacher_keys)
            self.register_load_state_dict_post_hook(_teacher_keys_optional)
        self.train_metrics = self._metrics()
        self.eval_metrics = self._metrics()

    def _metrics(self) -> dict[str, Metric]:
        kinds: list[tuple[str, type[DomainCrossEntropy]]] = [("LanguageCrossEntropy", DomainCrossEntropy)]
        if self.distill is not None:
            kinds.append(("KLDivergence", DomainKLDivergence))
        metrics: dict[str, Metric] = {}
        for suffix, cls in kinds:
            metrics[suffix] = cls()
            for i, name in enumerate(self.set_names):
                metrics[f"{name}_{suffix}"] = cls(i)
        return metrics

    def train(self, mode: bool = True) -> "PrunableLM":
        """The teacher stays in eval mode whatever the trainer sets."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, input_ids: Tensor) -> Tensor:
        if self.teacher is None:  # frozen LLM: the unmasked student is the source model
            return self.model(input_ids, None)
        logits = self.teacher(input_ids)
        for module in self.teacher.modules():  # FSDP2 units: the root (and, under SHARD_GRAD_OP, every
            if hasattr(module, "reshard"):     # unit) keep their gathered weights for a backward the
                module.reshard()               # teacher never runs
        return logits

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        with cpu_autocast(self.cpu_autocast):
            masks = None
            if self.mask_generator is not None:
                with fp32_region():
                    masks = self.mask_generator()
            input_ids = batch["input_ids"].long()
            logits = self.model(input_ids, masks)
            outputs = {"logits": logits, "masks": masks}
            if self.distill is not None:
                outputs["teacher_logits"] = self.teacher_logits(input_ids)
        return outputs

    def _kd_sum(self, logits: Tensor, outputs: Mapping[str, Any], labels: Tensor) -> Tensor:
        assert self.distill is not None
        return kd_token_losses(logits, outputs["teacher_logits"], labels, self.distill.temperature)[0]

    def loss(self, outputs: dict[str, Any], batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        with cpu_autocast(self.cpu_autocast):
            return self._loss(outputs, batch)

    def _loss(self, outputs: dict[str, Any], batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        labels = batch["labels"].long()
        loss_sum, tokens = token_losses(outputs["logits"], labels)
        # Kept for metrics and data-mixture callbacks (per-domain training losses): always the CE.
        outputs["loss_sum"], outputs["tokens"] = loss_sum.detach(), tokens
        n_tokens = tokens.sum().clamp(min=1)
        ce = loss_sum.sum() / n_tokens
        losses = {"ce_loss": ce}
        total = ce
        if self.distill is not None:
            d = self.distill
            # with kl_weight 0 the KL is only a metric: no graph through it
            logits = outputs["logits"] if d.kl_weight > 0 else outputs["logits"].detach()
            kd_sum = self._kd_sum(logits, outputs, labels)
            outputs["kd_sum"] = kd_sum.detach()
            kd = kd_sum.sum() / n_tokens
            losses["kd_loss"] = kd
            total = d.ce_weight * ce + d.kl_weight * kd
        if self.mask_generator is not None and outputs["masks"] is not None:
            with fp32_region():
                reg, self.last_stats = self.mask_generator.regularization(outputs["masks"])
            losses["mask_loss"] = reg
            total = total + reg
        losses["total"] = total
        return losses

    def eval_forward(self, batch: Mapping[str, Tensor], outputs: Any | None = None) -> dict[str, Any]:
        if outputs is not None:
            return outputs
        outputs = self.forward(batch)
        labels = batch["labels"].long()
        outputs["loss_sum"], outputs["tokens"] = token_losses(outputs["logits"], labels)
        if self.distill is not None:
            outputs["kd_sum"] = self._kd_sum(outputs["logits"], outputs, labels)
        return outputs

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        labels = batch["labels"].long()
        if "loss_sum" not in outputs:
            outputs["loss_sum"], outputs["tokens"] = token_losses(outputs["logits"], labels)
        key = getattr(metric, "output_key", "loss_sum")
        if key == "kd_sum" and "kd_sum" not in outputs:
            outputs["kd_sum"] = self._kd_sum(outputs["logits"], outputs, labels)
        metric.update(outputs[key], outputs["tokens"], batch.get("set"))

    def param_groups(self, lr: float, weight_decay: float, lag_lr: float) -> list[dict[str, Any]]:
        """Model weights at lr (none when the LLM is frozen); mask parameters as their generator says.

        The teacher is never in a group.
        """
        groups = []
        weights = [p for p in self.model.parameters() if p.requires_grad]
        if weights:
            groups.append({"params": weights, "lr": lr, "weight_decay": weight_decay})
        if self.mask_generator is not None:
            groups.extend(self.mask_generator.param_groups(lag_lr))
        return groups


# Names wrappers put in front of (or inside) module paths: DDP, torch.compile, FSDP, checkpointing.
_WRAPPER_NAMES = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def _is_teacher_key(key: str) -> bool:
    """A state-dict key of PrunableLM.teacher, seen from the model or from a wrapper around it."""
    for part in key.split("."):
        if part not in _WRAPPER_NAMES:
            return part == TEACHER
    return False


def _drop_teacher_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: the teacher is read from its own checkpoint, never saved with the run.

    Except while Composer broadcasts rank 0's weights to ranks built on the meta device: it asks for
    the whole state by clearing `should_save_peft_only` (its switch for "trainable part only").
    """
    if not getattr(module, "should_save_peft_only", True):
        return
    for key in [k for k in state_dict if k.startswith(f"{prefix}{TEACHER}.")]:
        del state_dict[key]


def _teacher_keys_optional(module: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: checkpoints never hold the teacher, so its keys are not missing.

    Composer loads (and resumes) strictly before it wraps the model in DDP, and under FSDP through
    the module's own load_state_dict, so this hook sees every load; all other keys stay strict.
    """
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_teacher_key(k)]
