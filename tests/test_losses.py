"""Chunked losses equal the whole-tensor fp32 computation (values and gradients) and keep no fp32 copy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drprune.models.losses import IGNORE_INDEX, kd_token_losses, token_losses


def reference_ce(logits, labels):
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)
    return loss.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def reference_kd(student, teacher, labels, t):
    keep = labels[:, 1:] != IGNORE_INDEX
    log_s = F.log_softmax(student[:, :-1].float() / t, dim=-1)
    log_t = F.log_softmax(teacher[:, :-1].float() / t, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return (torch.where(keep, kl, torch.zeros_like(kl)) * t * t).sum(-1), keep.sum(-1)


def batch(dtype=torch.float32, b=3, t=37, v=101):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[1, 5:9] = IGNORE_INDEX
    return logits, teacher, labels


@pytest.mark.parametrize("chunk", [1, 7, 16, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_the_whole_tensor_computation(chunk, dtype):
    logits, _, labels = batch(dtype)
    got, tokens = token_losses(logits, labels, chunk=chunk)
    (grad,) = torch.autograd.grad(got.sum() * 0.5, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    want, want_tokens = reference_ce(ref_logits, labels)
    (want_grad,) = torch.autograd.grad(want.sum() * 0.5, ref_logits)
    assert got.dtype == torch.float32 and torch.equal(tokens, want_tokens)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype and torch.allclose(grad.float(), want_grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 2048])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_distillation_kl_equals_the_whole_tensor_computation(chunk, t):
    student, teacher, labels = batch()
    got, tokens = kd_token_losses(student, teacher, labels, t, chunk=chunk)
    (grad,) = torch.autograd.grad(got.sum(), student)
    ref = student.detach().clone().requires_grad_()
    want, want_tokens = reference_kd(ref, teacher, labels, t)
    (want_grad,) = torch.autograd.grad(want.sum(), ref)
    assert torch.equal(tokens, want_tokens)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_no_fp32_copy_of_the_logits_is_saved_for_backward():
    """Every tensor autograd keeps for a chunked loss is at most one chunk in fp32 (the bf16 logits are shared)."""
    logits, _, labels = batch(torch.bfloat16, b=2, t=64, v=128)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = token_losses(logits, labels, chunk=16)
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() > 16 * 128]
    loss.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_a_second_backward_is_refused():
    logits, _, labels = batch()
    loss = token_losses(logits, labels, chunk=8)[0].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
