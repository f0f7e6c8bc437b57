"""Activation checkpointing as Composer applies it: same gradients for both mask generators.

Masks reach each `Block` inside a dict. Non-reentrant checkpointing (Composer's `apply_ac`, FSDP2)
tracks them through saved-tensor hooks; reentrant checkpointing only tracks positional tensors, which
is why a run asking for it with a mask generator is refused.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from composer.distributed.activation_checkpointing import apply_ac, generate_composer_model_check_fn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, CheckpointWrapper,
                                                                         apply_activation_checkpointing,
                                                                         checkpoint_wrapper)

from drprune.masks.hypernetwork import HypernetworkMaskGenerator
from drprune.masks.l0 import L0MaskGenerator
from drprune.models.composer_model import PrunableLM
from drprune.models.config import ModelConfig
from drprune.models.decoder import Block

CFG = ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                  intermediate_size=48)
STEP = 5
WRAPPED = "_checkpoint_wrapped_module."


def l0_model() -> PrunableLM:
    """The LLM trains; multipliers nonzero so log_alpha gets a Lagrangian gradient too."""
    torch.manual_seed(0)
    gen = L0MaskGenerator(CFG, pruning_modules=["head", "intermediate", "layer", "hidden", "head_layer", "mlp"],
                          target_model={"d_model": 24, "n_heads": 2, "n_layers": 2, "intermediate_size": 20},
                          lagrangian_warmup_steps=10, droprate_init=0.3)
    with torch.no_grad():
        for lam in [*gen.lambda_1.values(), *gen.lambda_2.values()]:
            lam.fill_(0.5)
    return PrunableLM(CFG, gen)


def hypernetwork_model() -> PrunableLM:
    """The LLM is frozen; only the hypernetwork trains."""
    torch.manual_seed(0)
    gen = HypernetworkMaskGenerator(CFG, target_ratio=0.5, embedding_dim=16, hidden_size=16)
    with torch.no_grad():  # a mix of kept and dropped units, not everything kept
        for bias in gen.head_bias.values():
            bias.copy_(torch.randn(bias.shape) * 3 - gen.offset)
    return PrunableLM(CFG, gen)


BATCH = {"input_ids": torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))}
BATCH["labels"] = BATCH["input_ids"]


def checkpointed(model: PrunableLM, impl: CheckpointImpl) -> PrunableLM:
    """`model` with every Block checkpointed: Composer's own `apply_ac` (non-reentrant), or the same
    wrapping with reentrant checkpointing (Composer's FSDP1 `activation_checkpointing_reentrant`)."""
    check_fn = generate_composer_model_check_fn(model)
    if impl == CheckpointImpl.NO_REENTRANT:
        apply_ac(model, True, False, check_fn)
    else:
        apply_activation_checkpointing(model, lambda m: checkpoint_wrapper(m, checkpoint_impl=impl), check_fn)
    wrapped = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrapped) == CFG.n_layers and all(isinstance(m._checkpoint_wrapped_module, Block) for m in wrapped)
    return model


def gradients(model: PrunableLM, loss_key: str = "total") -> dict[str, torch.Tensor | None]:
    """Every trainable parameter's gradient from one training step at STEP (the same mask noise each call)."""
    model.train().zero_grad(set_to_none=True)
    model.mask_generator.set_step(STEP)
    losses = model.loss(model(BATCH), BATCH)
    losses[loss_key].backward()
    return {name.replace(WRAPPED, ""): None if p.grad is None else p.grad.clone()
            for name, p in model.named_parameters() if p.requires_grad}


def max_difference(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None]) -> float:
    assert a.keys() == b.keys()
    assert all(g is not None for g in [*a.values(), *b.values()]), "a trainable parameter got no gradient"
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_non_reentrant_checkpointing_keeps_every_l0_gradient():
    plain = gradients(l0_model())
    ac = gradients(checkpointed(l0_model(), CheckpointImpl.NO_REENTRANT))
    assert any(k.startswith("model.") for k in plain) and any("log_alpha" in k for k in plain)
    assert any("lambda_1" in k for k in plain) and any("lambda_2" in k for k in plain)
    assert all(float(g.abs().sum()) > 0 for k, g in plain.items() if "log_alpha" in k or "lambda" in k)
    assert max_difference(plain, ac) <= 1e-5  # measured 0 (bit-identical)


def test_non_reentrant_checkpointing_keeps_the_hypernetworks_language_model_gradient():
    model = hypernetwork_model()
    assert all(k.startswith("mask_generator.") for k in gradients(model))  # the LLM is frozen
    ac_model = checkpointed(hypernetwork_model(), CheckpointImpl.NO_REENTRANT)
    assert max_difference(gradients(model), gradients(ac_model)) <= 1e-5  # measured 0 (bit-identical)
    plain_ce, ac_ce = gradients(model, "ce_loss"), gradients(ac_model, "ce_loss")
    assert max_difference(plain_ce, ac_ce) <= 1e-5  # measured 0
    assert sum(float(g.abs().sum()) for g in ac_ce.values()) > 0  # the LM loss itself trains the hypernetwork


@pytest.mark.filterwarnings("ignore:Please specify CheckpointImpl.NO_REENTRANT:FutureWarning")
def test_reentrant_checkpointing_breaks_l0():
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        gradients(checkpointed(l0_model(), CheckpointImpl.REENTRANT))


@pytest.mark.filterwarnings("ignore:Please specify CheckpointImpl.NO_REENTRANT:FutureWarning")
def test_reentrant_checkpointing_starves_the_hypernetwork_silently():
    model = checkpointed(hypernetwork_model(), CheckpointImpl.REENTRANT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train().mask_generator.set_step(STEP)
        losses = model.loss(model(BATCH), BATCH)
    assert any("None of the inputs have requires_grad=True" in str(w.message) for w in caught)
    assert not losses["ce_loss"].requires_grad  # the LM loss is cut off from the hypernetwork
    # The run does not fail: the total still backpropagates, but only the budget term's gradient,
    # exactly what the unwrapped model gets from the budget term alone.
    budget_only = gradients(hypernetwork_model(), "mask_loss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert max_difference(gradients(model), budget_only) == 0
