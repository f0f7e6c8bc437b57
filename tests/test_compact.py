"""Compaction: a hard-masked model and its compact model give the same logits, with the predicted size."""
from __future__ import annotations

import pytest
import torch

from drprune.compact.fold import compact_decoder
from drprune.errors import UserError
from drprune.masks.base import MaskSet
from drprune.models.shapes import config_params, expected_params, mask_shape
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder

COMMON = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, intermediate_size=48)
CFGS = {
    "llama": ModelConfig(family="llama", **COMMON),
    "llama_gqa": ModelConfig(family="llama", **COMMON, n_kv_heads=2, tie_word_embeddings=True),
    "qwen2": ModelConfig(family="qwen2", **COMMON, n_kv_heads=2, head_dim=12, qkv_bias=True),
    "pythia": ModelConfig(family="pythia", **COMMON, norm="layernorm", mlp="plain", activation="gelu",
                          parallel_residual=True, qkv_bias=True, o_bias=True, mlp_bias=True, rotary_pct=0.25),
}
GLOBAL = ("head", "head_layer", "mlp", "layer", "intermediate", "hidden")
PER_LAYER = ("head", "head_layer", "mlp", "layer", "intermediate", "attn_in", "attn_out", "mlp_in", "mlp_out")
IDS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))


def random_decoder(cfg: ModelConfig, seed: int = 0) -> PrunableDecoder:
    """Random weights everywhere (norms and biases too), so a misplaced fold cannot hide."""
    torch.manual_seed(seed)
    decoder = PrunableDecoder(cfg).eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
                    else torch.randn_like(p) * 0.2)
    return decoder


def random_masks(cfg: ModelConfig, names: tuple[str, ...], seed: int = 0) -> MaskSet:
    """About a third of each mask zeroed, the rest scales in [0.5, 1.5]; layer 1 removed whole.

    Rows of head / intermediate keep at least one unit: a sub-layer with no unit left is removed, and
    with output biases (Pythia) its masked output would be the bias, not zero.
    """
    gen = torch.Generator().manual_seed(seed)
    masks = MaskSet()
    for name in names:
        shape = mask_shape(name, cfg)
        keep = torch.rand(shape, generator=gen) > 0.35
        keep.view(-1, shape[-1])[:, 0] = True
        if name in ("layer", "head_layer", "mlp"):
            keep[:] = True  # whole sub-layers are removed below, at chosen layers
        masks[name] = keep * (0.5 + torch.rand(shape, generator=gen))
    if "layer" in masks:
        masks["layer"][1] = 0.0
    if "head_layer" in masks:
        masks["head_layer"][2] = 0.0  # layer 2 keeps only its MLP
    return masks.validate(cfg)


@pytest.fixture(params=sorted(CFGS))
def cfg(request) -> ModelConfig:
    return CFGS[request.param]


@pytest.mark.parametrize("names", [GLOBAL, PER_LAYER], ids=["global", "per_layer"])
def test_compact_logits_equal_masked_logits_and_size_is_predicted(cfg, names):
    decoder = random_decoder(cfg)
    masks = random_masks(cfg, names)
    compact = compact_decoder(decoder, masks)
    with torch.no_grad():
        masked, small = decoder(IDS, masks), compact(IDS)
    assert small.shape == masked.shape
    assert torch.allclose(small, masked, atol=1e-5, rtol=0), (small - masked).abs().max()
    hard01 = MaskSet({k: (v != 0).float() for k, v in masks.items()})
    assert compact.num_params() == config_params(compact.cfg) == int(expected_params(cfg, hard01))
    assert compact.cfg.n_layers == cfg.n_layers - 1
    assert not compact.cfg.layer_spec(1).has_attn  # source layer 2 after renumbering
    assert compact.cfg.head_dim == cfg.head_dim


def test_uniform_masks_give_a_uniform_config_of_the_target_shape():
    cfg = CFGS["llama_gqa"]
    masks = MaskSet(head=torch.tensor([[1.0, 0.0]] * 4), intermediate=torch.ones(4, 48),
                    hidden=torch.ones(32), layer=torch.tensor([1.0, 1.0, 0.0, 1.0]))
    masks["intermediate"][:, ::2] = 0
    masks["hidden"][:8] = 0
    compact = compact_decoder(random_decoder(cfg), masks)
    c = compact.cfg
    assert c.is_uniform and (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.intermediate_size) == (24, 3, 2, 1, 24)


def test_compact_decoder_copies_weights_and_keeps_dtype():
    cfg = CFGS["llama"]
    decoder = random_decoder(cfg).to(torch.bfloat16)
    compact = compact_decoder(decoder, MaskSet(layer=torch.tensor([1.0, 0.0, 1.0, 1.0])))
    assert compact.transformer["wte"].weight.dtype == torch.bfloat16
    assert torch.equal(compact.transformer["wte"].weight, decoder.transformer["wte"].weight)
    with torch.no_grad():
        compact.transformer["wte"].weight.zero_()
    assert decoder.transformer["wte"].weight.abs().sum() > 0


def test_bad_masks_are_rejected_before_any_weight_is_touched():
    cfg = CFGS["llama_gqa"]
    decoder = random_decoder(cfg)
    with pytest.raises(UserError, match="every attention head"):
        compact_decoder(decoder, MaskSet(head=torch.zeros(4, 2)))
    with pytest.raises(UserError, match="has shape"):
        compact_decoder(decoder, MaskSet(head=torch.ones(4, 4)))
    with pytest.raises(UserError, match="NaN"):
        compact_decoder(decoder, MaskSet(hidden=torch.full((32,), float("nan"))))
    with pytest.raises(UserError, match="every layer"):
        compact_decoder(decoder, MaskSet(layer=torch.zeros(4)))


def test_removing_a_sub_layer_with_an_output_bias_is_reported(caplog):
    cfg = CFGS["pythia"]
    masks = MaskSet(head=torch.ones(4, 4))
    masks["head"][3] = 0
    compact = compact_decoder(random_decoder(cfg), masks)
    assert not compact.cfg.layer_spec(3).has_attn
    assert "layer 3: every unit of attn.out_proj.bias is pruned" in caplog.text
