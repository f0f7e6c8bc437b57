"""Hypernetwork (DISP-LLM) masks: sampling, determinism, the budget loss, exact counting, frozen LLM."""
from __future__ import annotations

import math

import pytest
import torch
from composer.optim import DecoupledAdamW

from drprune.compact.fold import compact_decoder
from drprune.errors import ConfigError
from drprune.masks import build_mask_generator
from drprune.run_config import ModelSection
from drprune.models.shapes import compact_config, config_params, expected_params
from drprune.masks.hypernetwork import HypernetworkMaskGenerator
from drprune.models.composer_model import PrunableLM
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder

CFG = ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                  intermediate_size=48, tie_word_embeddings=True)
PYTHIA = ModelConfig(family="pythia", vocab_size=97, d_model=32, n_layers=3, n_heads=4, intermediate_size=48,
                     norm="layernorm", mlp="plain", activation="gelu", parallel_residual=True, qkv_bias=True,
                     o_bias=True, mlp_bias=True, rotary_pct=0.25)
L0_KEYS = dict(pruning_modules=["head", "hidden"], target_model={"d_model": 24}, lagrangian_warmup_steps="4ba",
               eval_target_model=True)


def generator_from(cfg, model_node):
    """The mask generator of a `model:` node, read the way a run config reads it."""
    section = ModelSection.read(model_node)
    return build_mask_generator(cfg, section.mask_generator, section.mask_prefix)


def make(cfg: ModelConfig = CFG, **kw) -> HypernetworkMaskGenerator:
    torch.manual_seed(0)
    return HypernetworkMaskGenerator(cfg, **{"target_ratio": 0.5, **kw})


def scramble(gen: HypernetworkMaskGenerator, scale: float = 3.0) -> None:
    """Random head biases, so masks keep a mix of units instead of everything."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bias in gen.head_bias.values():
            bias.copy_(torch.randn(bias.shape, generator=g) * scale - gen.offset)


def test_factory_ignores_l0_keys_and_rejects_unknown_ones(caplog):
    node = {"mask_generator": {"name": "hypernetwork", "target_ratio": 0.6, **L0_KEYS}}
    with caplog.at_level("INFO"):
        gen = generator_from(CFG, node)
    assert isinstance(gen, HypernetworkMaskGenerator)
    assert "ignores L0-only keys" in caplog.text and "target_model" in caplog.text
    assert gen.target_params == round(0.6 * config_params(CFG, embeddings=False))
    with pytest.raises(ConfigError, match="mask_generator.tempreature.*did you mean model.mask_generator.temperature"):
        generator_from(CFG, {"mask_generator": {"name": "hypernetwork", "target_ratio": 0.6, "tempreature": 1}})


def test_factory_ignores_every_l0_key_including_init_masks(caplog):
    """A base L0 config with init_masks, switched to name=hypernetwork, builds (the key list follows L0's)."""
    node = {"name": "hypernetwork", "target_ratio": 0.6, **L0_KEYS, "init_masks": "oneshot/masks.safetensors",
            "start_sparsity": 0.1, "droprate_init": 0.05, "seed": 3}
    with caplog.at_level("INFO"):
        gen = generator_from(CFG, {"mask_generator": node})
    assert gen.settings["seed"] == 3  # shared with L0, so used, not ignored
    ignored = caplog.text.split("ignores L0-only keys")[1].splitlines()[0]
    assert all(k in ignored for k in ("init_masks", "start_sparsity", "droprate_init", "target_model"))
    assert "seed" not in ignored and "target_ratio" not in ignored


@pytest.mark.parametrize("kw, match", [
    ({}, "exactly one"),
    ({"target_ratio": 0.5, "target_params": 1000}, "exactly one"),
    ({"target_ratio": 1.5}, r"\(0, 1\]"),
    ({"target_params": 10**9}, "positive integer"),
    ({"target_ratio": 0.001}, "one required unit"),
    ({"target_ratio": 0.5, "temperature": 0.0}, "temperature"),
])
def test_bad_targets_are_rejected(kw, match):
    with pytest.raises(ConfigError, match=match):
        HypernetworkMaskGenerator(CFG, **kw)


def test_everything_starts_kept_and_eval_masks_are_deterministic_0_1():
    gen = make(prune_heads=True)
    hard = gen.hard_masks()
    assert sorted(hard) == ["attn_in", "attn_out", "head", "intermediate", "mlp_in", "mlp_out"]
    assert all(bool((m == 1).all()) for m in hard.values())  # offset +3 keeps every unit
    scramble(gen)
    first = gen.hard_masks()
    gen.eval()
    again, eval_forward = gen.hard_masks(), gen()
    for name, m in first.items():
        assert set(m.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(m, again[name]) and torch.equal(m, eval_forward[name])
        assert torch.equal(m, (gen.logits()[name] > 0).float())  # keep where logit + offset > 0


@pytest.mark.parametrize("train_masks", ["soft", "hard_st"])
def test_at_least_one_unit_per_mask_keeps_the_best(train_masks):
    gen = make(train_masks=train_masks)
    with torch.no_grad():
        for bias in gen.head_bias.values():
            bias.fill_(-100.0)
        gen.head_bias["intermediate"][1, 7] = -50.0
    trained = gen.train()()
    # hard_st: the samples the model sees; soft: the hard masks the budget counts
    counted = trained if train_masks == "hard_st" else gen._budget_masks
    for masks in (gen.eval().hard_masks(), counted):
        for m in masks.values():
            assert (m.detach() != 0).sum(-1).tolist() == [1, 1, 1]
    assert gen.hard_masks()["intermediate"][1, 7] == 1
    assert int(expected_params(CFG, gen.hard_masks(), embeddings=False)) > 0


def test_hard_st_training_samples_are_hard_with_logistic_noise_and_carry_gradients():
    torch.manual_seed(0)
    gen = make(train_masks="hard_st").train()
    logits = torch.linspace(-2, 2, 48).view(3, 16)
    samples = gen._sample(logits.expand(4000, 3, 16))
    assert set(samples.unique().tolist()) == {0.0, 1.0}
    # P(logit + logistic noise > 0) = sigmoid(logit); temperature only shapes the gradient.
    assert torch.allclose(samples.mean(0), torch.sigmoid(logits), atol=0.03)
    loss, _ = gen.regularization(gen())
    loss.backward()
    params = (gen.head_weight["mlp_in"], gen.head_bias["intermediate"], *gen.gru.parameters(), *gen.norm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert gen.inputs.grad is None  # the per-mask input embeddings are fixed


@pytest.mark.parametrize("cfg", [CFG, PYTHIA], ids=["llama_gqa", "pythia"])
def test_budget_loss_and_exact_parameter_count(cfg):
    gen = make(cfg, prune_heads=True)
    scramble(gen)
    hard = gen.hard_masks()
    compact, _ = compact_config(cfg, hard)
    real = PrunableDecoder(compact).num_params(non_embedding=True)
    loss, stats = gen.regularization(hard)
    assert stats["expected_params"] == real == config_params(compact, embeddings=False)
    assert 0.2 < stats["kept_ratio"] < 0.9  # a real mix, not all or nothing
    assert stats["kept_ratio"] == pytest.approx(real / config_params(cfg, embeddings=False))
    assert float(loss) == pytest.approx(4.0 * abs(math.log(real / gen.target_params)), rel=1e-6)


@pytest.mark.parametrize("cfg", [CFG, PYTHIA], ids=["llama_gqa", "pythia"])
def test_compact_model_has_per_layer_widths_the_masked_logits_and_the_counted_size(cfg):
    gen = make(cfg, prune_heads=True)
    scramble(gen)
    hard = gen.hard_masks()
    torch.manual_seed(0)
    decoder = PrunableDecoder(cfg).eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():  # non-trivial norms and biases, so misplaced folds show
            p.copy_(torch.rand_like(p) + 0.5 if "ln_" in name else torch.randn_like(p) * 0.2)
    compact = compact_decoder(decoder, hard)
    assert not compact.cfg.is_uniform and compact.cfg.d_model == cfg.d_model  # residual width stays d
    assert [len(compact.cfg.layer_spec(i).mlp_in) for i in range(cfg.n_layers)] == (
        (hard["mlp_in"] != 0).sum(-1).tolist())
    assert compact.num_params(non_embedding=True) == int(expected_params(cfg, hard, embeddings=False))
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compact(ids), decoder(ids, hard), atol=1e-5, rtol=0)


def test_generator_config_rides_in_the_state_dict():
    gen = make(target_ratio=0.6, hidden_size=16, prune_heads=True)
    scramble(gen)
    state = gen.state_dict()
    assert state["_extra_state"] == {"name": "hypernetwork", "params": gen.settings}
    rebuilt = generator_from(CFG, {"mask_generator": state["_extra_state"]["params"] | {"name": "hypernetwork"}})
    rebuilt.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.hard_masks().values(), gen.hard_masks().values()))
    with pytest.raises(ValueError, match="target_params"):
        make(target_ratio=0.7, hidden_size=16, prune_heads=True).load_state_dict(state)


def test_soft_training_masks_are_disp_llm_gumbel_sigmoids_and_the_budget_is_their_hard_threshold():
    gen = make(temperature=0.5).train()
    logits = torch.linspace(-2, 2, 48).view(3, 16)
    samples = torch.stack([gen._soft_sample(logits) for _ in range(4000)])
    assert float(((samples > 0.01) & (samples < 0.99)).float().mean()) > 0.3  # soft, not 0/1
    # sigmoid((l + G) / T) >= 0.5  <=>  l + G >= 0, G ~ Gumbel(0, 1): P = 1 - exp(-exp(l))
    assert torch.allclose((samples >= 0.5).float().mean(0), 1 - torch.exp(-torch.exp(logits)), atol=0.03)
    masks = gen()
    for k, soft in masks.items():
        budget = gen._budget_masks[k]
        assert set(budget.detach().unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(budget.detach() == 1, (soft.detach() >= 0.5) | (budget.detach() == 1))
    loss, _ = gen.regularization(masks)
    loss.backward()
    assert gen.head_bias["intermediate"].grad.abs().sum() > 0


@pytest.mark.parametrize("train_masks", ["soft", "hard_st"])
def test_budget_alone_reaches_the_target(train_masks):
    """Gradient through the straight-through budget masks moves the deterministic size onto the target
    (hard_st counts the noise-free masks; soft counts a noisy hard sample, so it lands less exactly)."""
    torch.manual_seed(0)
    gen = make(target_ratio=0.4, lr=3e-2, train_masks=train_masks).train()
    opt = torch.optim.Adam(gen.parameters(), lr=gen.lr)
    for _ in range(150):
        opt.zero_grad()
        gen.regularization(gen())[0].backward()
        opt.step()
    kept = float(expected_params(CFG, gen.hard_masks(), embeddings=False))
    assert kept / gen.target_params == pytest.approx(1.0, abs=0.02 if train_masks == "hard_st" else 0.1)


def test_llm_stays_bit_identical_while_the_hypernetwork_trains():
    torch.manual_seed(0)
    model = PrunableLM(CFG, make(lr=1e-2)).train()
    before = {k: v.detach().clone() for k, v in model.model.named_parameters()}
    gen_before = [p.detach().clone() for p in model.mask_generator.parameters()]
    groups = model.param_groups(lr=1e-3, weight_decay=0.1, lag_lr=1.0)
    assert [p for g in groups for p in g["params"]] == list(model.mask_generator.parameters())
    assert all(g["weight_decay"] == 0.0 and g["lr"] == 1e-2 for g in groups)
    opt = DecoupledAdamW(groups, lr=1e-3, weight_decay=0.1)
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    for _ in range(3):
        opt.zero_grad()
        model.loss(model(batch), batch)["total"].backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.model.named_parameters())
    assert all(p.grad is None for p in model.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, model.mask_generator.parameters()))
