"""Attention numerics: RoPE in q's dtype, SDPA's enable_gqa against K/V copies, flash against SDPA."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from drprune.models.config import ModelConfig
from drprune.models.decoder import Attention, PrunableDecoder, _flash_dtype, _rotate_half, apply_rotary

GQA = ModelConfig(family="llama", vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  intermediate_size=96)
MHA = dataclasses.replace(GQA, n_kv_heads=4)
PARTIAL = dataclasses.replace(MHA, rotary_pct=0.25)  # Pythia-style: rotates a quarter of each head


def old_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The previous SDPA path: K/V repeated over each query group, then plain SDPA."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def old_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The previous RoPE: cos/sin already cast to the activations' dtype, computed in it."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.numel() else x_rot


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
def test_enable_gqa_matches_repeated_kv_in_fp32(cfg):
    torch.manual_seed(0)
    attn = Attention(cfg, cfg.layer_spec(0), cfg.d_model, cfg.d_model)
    q = torch.randn(2, cfg.n_heads, 16, cfg.head_dim)
    k, v = (torch.randn(2, cfg.n_kv_heads, 16, cfg.head_dim) for _ in range(2))
    new, old = attn._attend(q, k, v), old_attend(q, k, v)
    assert new.shape == old.shape == (2, 16, cfg.n_heads, cfg.head_dim)
    assert (new - old).abs().max() <= 1e-6  # measured 2.4e-7 (GQA), 0 (MHA)


@pytest.mark.parametrize("cfg", [GQA, PARTIAL], ids=["full", "partial"])
def test_fp32_rotary_is_bit_identical_and_16_bit_rotary_keeps_q_dtype(cfg):
    torch.manual_seed(0)
    cos, sin = PrunableDecoder(cfg).rotary(16, torch.device("cpu"))
    assert cos.dtype == torch.float32
    x = torch.randn(2, cfg.n_heads, 16, cfg.head_dim)
    assert torch.equal(apply_rotary(x, cos, sin), old_rotary(x, cos, sin))
    xb = x.bfloat16()
    out = apply_rotary(xb, cos, sin)
    assert out.dtype == torch.bfloat16
    reference = apply_rotary(xb.float(), cos, sin)  # exact rotation of the same bf16 inputs
    # fp32 math then one rounding: within bf16's half-ulp (2^-9 relative) of the exact rotation,
    # and never further from it than the old all-bf16 computation
    assert ((out.float() - reference).abs() <= reference.abs() * 2 ** -8 + 1e-6).all()
    assert (out.float() - reference).abs().sum() <= (old_rotary(xb, cos, sin).float() - reference).abs().sum()


def test_flash_dtype_refuses_fp32_without_autocast():
    q = torch.zeros(1, 2, 3, 4)
    assert _flash_dtype(q.bfloat16()) == torch.bfloat16 and _flash_dtype(q.half()) == torch.float16
    with pytest.raises(ValueError, match="attn_impl=flash needs fp16/bf16.*amp_bf16"):
        _flash_dtype(q)


needs_flash = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                                 reason="needs CUDA and flash_attn")


@pytest.mark.gpu
@needs_flash
@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
def test_flash_matches_sdpa_in_bf16_on_cuda(cfg):
    torch.manual_seed(0)
    sdpa = Attention(cfg, cfg.layer_spec(0), cfg.d_model, cfg.d_model)
    flash = Attention(dataclasses.replace(cfg, attn_impl="flash"), cfg.layer_spec(0), cfg.d_model, cfg.d_model)
    q = torch.randn(2, cfg.n_heads, 128, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, cfg.n_kv_heads, 128, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    want, got = sdpa._attend(q, k, v).float(), flash._attend(q, k, v).float()
    assert got.shape == want.shape == (2, 128, cfg.n_heads, cfg.head_dim)
    assert (want - got).abs().max() <= 2e-2  # unit-scale inputs: about 2 bf16 ulps of the outputs


@pytest.mark.gpu
@needs_flash
def test_flash_gets_one_16_bit_dtype_and_matches_sdpa_under_cuda_autocast(monkeypatch):
    import flash_attn

    torch.manual_seed(0)
    sdpa = PrunableDecoder(GQA).cuda()
    flash = PrunableDecoder(dataclasses.replace(GQA, attn_impl="flash")).cuda()
    flash.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, GQA.vocab_size, (2, 64), device="cuda")
    seen: list[tuple[torch.dtype, ...]] = []
    real = flash_attn.flash_attn_func

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(flash_attn, "flash_attn_func", spy)  # _attend imports it at call time
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = sdpa(ids).float(), flash(ids).float()
    assert len(seen) == GQA.n_layers and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    assert (want - got).abs().max() <= 2e-2 * want.abs().max()
