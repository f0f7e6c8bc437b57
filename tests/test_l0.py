"""L0 hard-concrete math, target validation and the Lagrangian."""
from __future__ import annotations

import math

import pytest
import torch

from drprune.errors import ConfigError
from drprune.masks import build_mask_generator
from drprune.run_config import ModelSection
from drprune.masks.l0 import BETA, LIMIT_L, LIMIT_R, HardConcrete, L0MaskGenerator
from drprune.models.config import ModelConfig

CFG = ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                  intermediate_size=48)
TARGET = {"d_model": 24, "n_heads": 2, "n_layers": 3, "intermediate_size": 20}
MODULES = ["head", "intermediate", "layer", "hidden", "head_layer", "mlp"]


def generator_from(cfg, model_node):
    """The mask generator of a `model:` node, read the way a run config reads it."""
    section = ModelSection.read(model_node)
    return build_mask_generator(cfg, section.mask_generator, section.mask_prefix)


def make(**kw) -> L0MaskGenerator:
    args = dict(pruning_modules=MODULES, target_model=TARGET, lagrangian_warmup_steps=10)
    args.update(kw)
    return L0MaskGenerator(CFG, **args)


def test_keep_probability_matches_closed_form():
    gate = HardConcrete(2, 5, 3, droprate_init=0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 10).view(2, 5))
    expected = 1 - torch.sigmoid(BETA * math.log(-LIMIT_L / LIMIT_R) - gate.log_alpha)
    assert torch.allclose(gate.keep_prob(), expected)
    assert torch.allclose(gate.expected_sparsity(), 1 - expected.sum(-1) / 5)


def test_samples_match_keep_probability():
    torch.manual_seed(0)
    gate = HardConcrete(1, 4, 2, droprate_init=0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([[-2.0, -0.5, 0.5, 2.0]]))
    samples = torch.stack([gate.sample() for _ in range(20000)])
    assert samples.min() >= 0 and samples.max() <= 1
    empirical = (samples > 0).float().mean(0)
    assert torch.allclose(empirical, gate.keep_prob().detach(), atol=0.02)


def test_deterministic_masks_have_exactly_the_target_size():
    torch.manual_seed(0)
    gen = make().eval()
    with torch.no_grad():
        for gate in gen.gates.values():
            gate.log_alpha.normal_()
    hard = gen.hard_masks()
    assert (hard["head"] != 0).sum(-1).tolist() == [1] * 4
    assert (hard["intermediate"] != 0).sum(-1).tolist() == [20] * 4
    assert int((hard["hidden"] != 0).sum()) == 24
    assert int((hard["layer"] != 0).sum()) == 3
    kept = hard["intermediate"][0] != 0
    soft = torch.sigmoid(gen.gates["intermediate"].log_alpha[0] / BETA * 0.8)
    assert soft[kept].min() >= soft[~kept].max()  # the largest logits are kept
    assert torch.allclose(hard["intermediate"][0][kept], soft[kept])  # kept values are the scale to fold


def test_eval_without_target_keeps_expected_count():
    gen = make(eval_target_model=False).eval()
    with torch.no_grad():
        gen.gates["intermediate"].log_alpha.fill_(0.0)
    kept = (gen()["intermediate"] != 0).sum(-1)
    expected = round(float(gen.gates["intermediate"].keep_prob()[0].sum()))
    assert kept.tolist() == [expected] * 4


def test_lagrangian_schedule_sign_and_ascent():
    gen = make(lagrangian_warmup_steps=10).train()
    final = 1 - 20 / 48
    gen.set_step(5)
    assert gen.target_sparsity("intermediate") == pytest.approx(final / 2)
    gen.set_step(50)
    assert gen.target_sparsity("intermediate") == pytest.approx(final)
    loss, stats = gen.regularization(gen())
    assert loss.item() == 0.0  # multipliers start at zero
    assert stats["expected_sparsity/intermediate"] < stats["target_sparsity/intermediate"]
    loss.backward()
    # expected sparsity below target: dL/dlambda_1 = gap < 0, ascent => gradient stored negated (> 0)
    # so that a descent step lowers lambda_1, making the loss push sparsity up.
    lam = gen.lambda_1["intermediate"]
    assert lam.grad.item() > 0
    opt = torch.optim.SGD(gen.param_groups(lag_lr=0.1), lr=0.1)
    opt.step()
    assert lam.item() < 0
    opt.zero_grad()
    loss, _ = gen.regularization(gen())
    loss.backward()
    # with lambda_1 < 0, minimising lambda_1 * (s - t) raises sparsity: log_alpha gradient is positive
    assert gen.gates["intermediate"].log_alpha.grad.sum() > 0


def test_lagrangian_pulls_sparsity_to_target():
    torch.manual_seed(0)
    gen = make(lagrangian_warmup_steps=0).train()
    opt = torch.optim.Adam(gen.param_groups(lag_lr=0.1))
    for _ in range(300):
        opt.zero_grad()
        loss, stats = gen.regularization(gen())
        loss.backward()
        opt.step()
    for m in ("intermediate", "hidden", "head"):
        assert abs(stats[f"expected_sparsity/{m}"] - stats[f"target_sparsity/{m}"]) < 0.05, m


@pytest.mark.parametrize("target,match", [
    ({**TARGET, "n_heads": 8}, "larger than the source"),
    ({**TARGET, "d_model": 64}, "target_model.d_model=64 is larger"),
    ({**TARGET, "n_heads": 3}, "whole number of GQA groups"),
    ({**TARGET, "n_kv_heads": 2}, "n_kv_heads=2 does not match"),
    ({**TARGET, "n_layer": 2}, "did you mean model.mask_generator.target_model.n_layers"),
    ({k: v for k, v in TARGET.items() if k != "intermediate_size"}, "intermediate_size is required"),
    ({**TARGET, "intermediate_size": 0}, "positive integer"),
])
def test_bad_targets_are_rejected(target, match):
    with pytest.raises(ConfigError, match=match):
        make(target_model=target)


def test_unknown_module_and_generator_are_rejected():
    with pytest.raises(ConfigError, match="unknown modules"):
        make(pruning_modules=["head", "heads"])
    with pytest.raises(ConfigError, match="model.mask_generator.name='nope'"):
        generator_from(CFG, {"mask_generator": {"name": "nope"}})
    with pytest.raises(ConfigError, match="model.l0_module.target_model is required"):
        generator_from(CFG, {"l0_module": {"pruning_modules": ["head"]}})


def test_sheared_style_l0_module_config():
    gen = generator_from(CFG, {"l0_module": {
        "pruning_modules": ["head", "layer"], "lagrangian_warmup_steps": "320ba",
        "target_model": {"n_heads": 2, "n_layers": 2}}})
    assert gen.warmup == 320 and set(gen.sizes) == {"head", "layer"}


def test_warm_start_from_a_hard_mask_file(tmp_path):
    from drprune.masks.base import MaskSet

    g = torch.Generator().manual_seed(0)
    chosen = MaskSet(
        intermediate=torch.stack([(torch.randperm(48, generator=g) < 20).float() for _ in range(4)]),
        head=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
        layer=torch.tensor([1.0, 0.0, 1.0, 1.0]),
    )
    path = chosen.save(tmp_path / "masks.safetensors")
    legacy = tmp_path / "zs_s4.pt"  # Sheared-LLaMA's torch.save dict with `_z` names loads too
    torch.save({f"{k}_z": v for k, v in chosen.items()}, legacy)
    assert all(torch.equal(MaskSet.load(legacy)[k], v) for k, v in chosen.items())
    gen = make(init_masks=str(path))
    assert gen.warmup == 0 and gen.target_sparsity("intermediate") == pytest.approx(1 - 20 / 48)
    hard = gen.hard_masks()
    for name in ("intermediate", "head", "layer"):
        assert torch.equal(hard[name] != 0, chosen[name] != 0), name
    assert gen.gates["intermediate"].keep_prob()[0][chosen["intermediate"][0] == 0].max() < 0.05
    assert "init_masks" not in gen.get_extra_state()["params"]  # checkpoints carry the logits instead
    with pytest.raises(ConfigError, match="init_masks: mask file .* does not exist"):
        make(init_masks=str(tmp_path / "none.pt"))
    torch.save({"head": torch.ones(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="init_masks: .*bad.pt.*shape"):
        make(init_masks=str(tmp_path / "bad.pt"))


def test_warm_start_logit_sets_how_firmly_the_selection_is_held(tmp_path):
    """init_logit puts kept units at +v and dropped ones at -v (the same hard selection), so a short
    run can move them; it is refused without init_masks and outside the logit clamp."""
    from drprune.masks.base import MaskSet

    chosen = MaskSet(intermediate=torch.stack([(torch.arange(48) % 2 == 0) & (torch.arange(48) < 40)] * 4).float(),
                     head=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
                     layer=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    path = str(chosen.save(tmp_path / "masks.safetensors"))
    firm, loose = make(init_masks=path), make(init_masks=path, init_logit=1.0)
    for name in ("intermediate", "head", "layer"):
        assert torch.equal(loose.hard_masks()[name] != 0, chosen[name] != 0), name
        logits = loose.gates[name].log_alpha
        assert set(logits.unique().tolist()) == {-1.0, 1.0}, name
        assert firm.gates[name].log_alpha.max().item() == pytest.approx(math.log(99), rel=1e-6)
    # a dropped unit at -1 is sampled nonzero in 64.5% of draws (at -4.6 in 4.7%): free to come back
    dropped = chosen["intermediate"] == 0
    assert loose.gates["intermediate"].keep_prob()[dropped].mean().item() == pytest.approx(0.645, abs=1e-3)
    assert firm.gates["intermediate"].keep_prob()[dropped].max().item() == pytest.approx(0.047, abs=1e-3)
    with pytest.raises(ConfigError, match="init_logit=1.0 needs model.mask_generator.init_masks"):
        make(init_logit=1.0)
    with pytest.raises(ConfigError, match=r"init_logit=5.0 must be in \(0, 4.605\]"):
        make(init_masks=path, init_logit=5.0)
