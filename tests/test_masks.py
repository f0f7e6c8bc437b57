"""Masks multiply in exactly where they should; parameter counting is exact."""
from __future__ import annotations

import pytest
import torch

from drprune.errors import ConfigError
from drprune.masks.base import MaskSet
from drprune.models.shapes import compact_config, config_params, expected_params, mask_shape
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder

CFGS = {
    "llama_gqa": ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                             intermediate_size=48, tie_word_embeddings=True),
    "qwen2": ModelConfig(family="qwen2", vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         head_dim=12, intermediate_size=48, qkv_bias=True),
    "pythia": ModelConfig(family="pythia", vocab_size=97, d_model=32, n_layers=3, n_heads=4, intermediate_size=48,
                          norm="layernorm", mlp="plain", activation="gelu", parallel_residual=True,
                          qkv_bias=True, o_bias=True, mlp_bias=True, rotary_pct=0.25),
}


@pytest.fixture(params=sorted(CFGS))
def decoder(request):
    torch.manual_seed(0)
    return PrunableDecoder(CFGS[request.param]).eval()


def ones(cfg, names):
    return MaskSet({n: torch.ones(mask_shape(n, cfg)) for n in names})


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def test_all_ones_masks_leave_logits_unchanged(decoder):
    cfg = decoder.cfg
    with torch.no_grad():
        plain = decoder(IDS)
        for names in (["head", "head_layer", "mlp", "layer", "intermediate", "hidden"],
                      ["attn_in", "attn_out", "mlp_in", "mlp_out", "intermediate"]):
            assert torch.equal(decoder(IDS, ones(cfg, names).validate(cfg)), plain)


def test_zeroed_head_group_equals_zeroed_out_proj_columns(decoder):
    cfg = decoder.cfg
    masks = ones(cfg, ["head"])
    masks["head"][1, 0] = 0
    ref = PrunableDecoder(cfg).eval()
    ref.load_state_dict(decoder.state_dict())
    cols = cfg.group_size * cfg.head_dim
    with torch.no_grad():
        ref.transformer["blocks"][1].attn.out_proj.weight[:, :cols] = 0
        assert torch.allclose(decoder(IDS, masks), ref(IDS), atol=1e-6)
        assert not torch.allclose(decoder(IDS, masks), decoder(IDS), atol=1e-4)


def test_zeroed_channel_equals_zeroed_down_proj_column(decoder):
    cfg = decoder.cfg
    masks = ones(cfg, ["intermediate"])
    masks["intermediate"][2, 5] = 0
    ref = PrunableDecoder(cfg).eval()
    ref.load_state_dict(decoder.state_dict())
    with torch.no_grad():
        ref.transformer["blocks"][2].mlp.down_proj.weight[:, 5] = 0
        assert torch.allclose(decoder(IDS, masks), ref(IDS), atol=1e-6)


def test_zeroed_layer_skips_the_block(decoder):
    cfg = decoder.cfg
    masks = ones(cfg, ["layer"])
    masks["layer"][1] = 0
    with torch.no_grad():
        expected = decoder.transformer["wte"](IDS)
        rope = decoder.rotary(IDS.shape[1], IDS.device)
        for i, block in enumerate(decoder.transformer["blocks"]):
            if i != 1:
                expected = block(expected, rope, {})
        expected = torch.nn.functional.linear(decoder.transformer["ln_f"](expected), decoder.output_weight())
        assert torch.allclose(decoder(IDS, masks), expected, atol=1e-6)


def test_zeroed_sublayers(decoder):
    """head_layer=0 removes only attention, mlp=0 only the MLP."""
    cfg = decoder.cfg
    for name, sub in (("head_layer", "attn"), ("mlp", "mlp")):
        masks = ones(cfg, [name])
        masks[name][0] = 0
        with torch.no_grad():
            block = decoder.transformer["blocks"][0]
            saved = getattr(block, sub)
            delattr(block, sub)
            try:
                expected = decoder(IDS)
            finally:
                setattr(block, sub, saved)
            assert torch.allclose(decoder(IDS, masks), expected, atol=1e-6)


def test_mask_shapes_are_validated(decoder):
    with pytest.raises(ConfigError, match="shape"):
        MaskSet({"head": torch.ones(2, 2)}).validate(decoder.cfg)
    with pytest.raises(ConfigError, match="unknown mask"):
        MaskSet({"heads": torch.ones(3)}).validate(decoder.cfg)


@pytest.mark.parametrize("name", sorted(CFGS))
def test_param_count_of_config_is_exact(name):
    cfg = CFGS[name]
    assert config_params(cfg) == PrunableDecoder(cfg).num_params()
    assert config_params(cfg, embeddings=False) == PrunableDecoder(cfg).num_params(non_embedding=True)


@pytest.mark.parametrize("name", sorted(CFGS))
def test_expected_params_on_hard_masks_equals_compact_config(name):
    cfg = CFGS[name]
    g = torch.Generator().manual_seed(3)
    for names in (["head", "intermediate", "layer", "hidden", "head_layer", "mlp"],
                  ["head", "intermediate", "attn_in", "attn_out", "mlp_in", "mlp_out"]):
        masks = MaskSet({n: (torch.rand(mask_shape(n, cfg), generator=g) > 0.3).float() for n in names})
        masks.get("layer", torch.ones(1))[0] = 1  # keep at least one layer
        if "layer" in masks:
            masks["head_layer"][0] = 1
            masks["head"][0, 0] = 1
        compact, _ = compact_config(cfg, masks)
        assert int(expected_params(cfg, masks)) == config_params(compact)
        assert config_params(compact) == PrunableDecoder(compact).num_params()
