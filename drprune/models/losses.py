"""Per-sample next-token losses that never hold an fp32 copy of the whole [B, T, vocab] logits.

Cross-entropy and distillation KL need fp32 log-softmaxes, and at a 128k vocabulary and 8 x 4096
tokens one fp32 copy of the logits is 16 GB. Both losses here are fused: they walk the positions in
chunks of CHUNK_ELEMENTS logits, upcast one chunk, compute its losses and, when the logits need a
gradient, its gradient too, written straight into one buffer in the logits' own dtype (the gradient the
backward pass must produce anyway). Backward only scales that buffer by each position's incoming
gradient. The fp32 working set is one chunk; the values equal the whole-tensor computation.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label value excluded from every loss
CHUNK_ELEMENTS = 1 << 22  # logits per fp32 chunk (16 MiB): 85 positions at a 49k vocabulary, 32 at 128k


def token_losses(logits: Tensor, labels: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample summed next-token cross-entropy and token count, [B] each (position t predicts labels[t+1]).

    `chunk`: positions per fp32 chunk (default: CHUNK_ELEMENTS logits).
    """
    targets = _shifted_targets(labels)
    per_position = _FusedCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), chunk or _positions(logits))
    return per_position.view_as(labels).sum(-1), (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def kd_token_losses(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0,
                    chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample summed forward KL(teacher || student) and token count, [B] each.

    Over the positions `token_losses` scores (IGNORE_INDEX targets excluded), on softmax(logits / T) in
    fp32, times T^2 (so gradients keep their scale across T). The teacher gets no gradient.
    """
    keep = _shifted_targets(labels) != IGNORE_INDEX
    per_position = _FusedKL.apply(student_logits.flatten(0, 1), teacher_logits.flatten(0, 1).detach(),
                                  keep.flatten(), float(temperature), chunk or _positions(student_logits))
    return per_position.view_as(labels).sum(-1), keep.sum(-1)


def _positions(logits: Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // logits.shape[-1])


def _shifted_targets(labels: Tensor) -> Tensor:
    """labels[t + 1] at position t; the last position of each sample has none (IGNORE_INDEX)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


class _FusedCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy of [N, V] logits; the gradient (softmax - one-hot) is made in forward."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, chunk: int) -> Tensor:
        losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits) if logits.requires_grad else None
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            x = logits[rows].float()
            target = targets[rows]
            valid = target != IGNORE_INDEX
            safe = torch.where(valid, target, 0).unsqueeze(1)
            lse = torch.logsumexp(x, dim=-1)
            losses[rows] = torch.where(valid, lse - x.gather(1, safe).squeeze(1), 0.0)
            if grad is not None:
                p = torch.exp(x - lse.unsqueeze(1))
                p.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=p.dtype))
                grad[rows] = (p * valid.unsqueeze(1)).to(grad.dtype)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, None, None]:
        return _scaled(ctx, grad_losses), None, None


class _FusedKL(torch.autograd.Function):
    """Per-position KL(softmax(t/T) || softmax(s/T)) * T^2 of [N, V] logits; gradient T (p_s - p_t) in forward."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, keep: Tensor, temperature: float, chunk: int) -> Tensor:
        losses = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student) if student.requires_grad else None
        for start in range(0, student.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_s = torch.log_softmax(student[rows].float() / temperature, dim=-1)
            log_t = torch.log_softmax(teacher[rows].float() / temperature, dim=-1)
            p_t = torch.exp(log_t)
            kept = keep[rows]
            kl = (p_t * (log_t - log_s)).sum(-1) * temperature**2
            losses[rows] = torch.where(kept, kl, 0.0)
            if grad is not None:
                grad[rows] = ((torch.exp(log_s) - p_t) * (temperature * kept.unsqueeze(1))).to(grad.dtype)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        return _scaled(ctx, grad_losses), None, None, None, None


def _scaled(ctx: Any, grad_losses: Tensor) -> Tensor | None:
    """The saved per-position gradient times each position's incoming gradient, in place (no second copy).

    A second backward through the same loss (retain_graph) is refused by autograd's saved-tensor version check.
    """
    (grad,) = ctx.saved_tensors
    return None if grad is None else grad.mul_(grad_losses.unsqueeze(1).to(grad.dtype))
