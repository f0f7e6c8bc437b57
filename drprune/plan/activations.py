"""What one training forward of the decoder keeps for backward, in bytes per token.

Read off `drprune.models.decoder` op by op, and checked against the tensors autograd really saves
(tests/test_planner.py walks the graph). Symbols: d the model width, dq = heads x head_dim, dkv = KV
heads x head_dim, I the MLP width, H heads, T the sequence length; c bytes of a matmul output (2 under
bf16/fp16 autocast or FSDP mixed precision, else 4); r bytes of the residual stream, which is the
embedding's output dtype (2 only when FSDP gathers the weights in 16 bits: autocast leaves the
embedding in fp32).

Per layer:
- a norm keeps its fp32 input, 4 B of RMS per token and, when its weight trains, its normalised output
  (RMSNorm: 4d + 4 + r d; LayerNorm normalises in fp32: 4d + 4 + 4d);
- the q/k/v and gate/up projections keep their input when the weights train: one tensor (r d) when
  it is already in the matmul dtype, one per projection (3 c d, 2 c d) when autocast casts it, which it
  does call by call;
- attention through a fused kernel (flash, memory-efficient, torch's CPU flash) keeps q, k, v and its
  output, c (2 dq + 2 dkv), and the log-sum-exp, 4 H; the math fallback (fp32 with GQA on CUDA, any GQA
  on CPU) keeps q and the GQA-repeated k and v in fp32 (12 dq), the T x T probabilities (4 H T) and,
  when the weights train, the context copied for the output projection (c dq);
- a gated MLP keeps gate, act(gate) and up (3 c I) and, when the weights train, the down projection's
  input (c I); a plain MLP keeps c I and c I;
- every mask multiplication keeps its input (the masks train): r d on a norm output, c d on a
  sub-layer output, c I on the MLP's hidden channels, c dq on the attention context.
Outside the layers: the token ids, the final norm, the output head's input and the RoPE tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from drprune.models.config import ModelConfig

Kernel = Literal["fused", "math"]
ATTN_IN, ATTN_OUT = ("hidden", "attn_in"), ("head_layer", "layer", "hidden", "attn_out")
MLP_IN, MLP_OUT = ("hidden", "mlp_in"), ("mlp", "layer", "hidden", "mlp_out")


@dataclass(frozen=True)
class ActivationSetup:
    """What decides which tensors a training forward keeps."""

    compute_bytes: int  # c
    residual_bytes: int  # r
    trainable: bool  # the decoder's weights get gradients (a hypernetwork freezes them)
    masks: frozenset[str]  # the MaskSet entries the generator emits (none without one)
    kernel: Kernel
    context_copy: bool = False  # the fused kernel's output is laid out [B, H, T, hd]: reshaping it copies

    @property
    def casts(self) -> bool:
        """Autocast casts every projection's input anew (fp32 residual stream, 16-bit matmuls)."""
        return self.residual_bytes > self.compute_bytes


def attention_kernel(cfg: ModelConfig, device: str, compute_bytes: int) -> tuple[Kernel, bool]:
    """Which SDPA kernel torch 2.7 picks (fused ones keep O(T) per token, the math fallback O(T^2)), and
    whether its output must be copied for the output projection.

    CUDA kernels write [B, T, H, hd], which the projection reads as it is; torch's CPU flash kernel
    follows q's layout, which partial rotary (a concatenation) leaves as [B, H, T, hd].
    """
    if cfg.attn_impl == "flash":
        return "fused", False
    gqa = cfg.n_heads != cfg.n_kv_heads
    if device == "cuda":  # flash (16-bit, GQA too) or memory-efficient (fp32, no GQA)
        return ("math" if gqa and compute_bytes == 4 else "fused"), False
    return ("math" if gqa else "fused"), cfg.rotary_pct < 1  # torch's CPU flash kernel takes no GQA


def _norm(cfg: ModelConfig, s: ActivationSetup) -> int:
    d = cfg.d_model
    output = (4 if cfg.norm == "layernorm" else s.residual_bytes) * d if s.trainable else 0
    return 4 * d + 4 + output


def _projection_inputs(cfg: ModelConfig, s: ActivationSetup, n: int) -> int:
    if not s.trainable:
        return 0
    return n * s.compute_bytes * cfg.d_model if s.casts else s.residual_bytes * cfg.d_model


def _masked(names: tuple[str, ...], s: ActivationSetup, width_bytes: int) -> int:
    return sum(width_bytes for name in names if name in s.masks)


def attention_bytes(cfg: ModelConfig, s: ActivationSetup, seq_len: int) -> int:
    """The attention core, from q/k/v to the output projection's input, per token."""
    c, dq, dkv = s.compute_bytes, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    head = "head" in s.masks
    if s.kernel == "fused":  # the output projection reads the kernel's output unless it is copied
        copied = (head or s.context_copy) and s.trainable
        return c * (2 * dq + 2 * dkv) + 4 * cfg.n_heads + (c * dq if copied else 0)
    return 12 * dq + 4 * cfg.n_heads * seq_len + (c * dq if s.trainable else 0) + (c * dq if head else 0)


def mlp_bytes(cfg: ModelConfig, s: ActivationSetup) -> int:
    """The MLP's hidden channels, per token."""
    c, width = s.compute_bytes, cfg.intermediate_size
    kept = (3 if cfg.mlp == "gated" else 1) * c * width + (c * width if s.trainable else 0)
    return kept + (c * width if "intermediate" in s.masks else 0)


def layer_bytes(cfg: ModelConfig, s: ActivationSetup, seq_len: int) -> int:
    """Everything one decoder layer keeps for backward, per token."""
    d, r, c = cfg.d_model, s.residual_bytes, s.compute_bytes
    n_in = 2 if cfg.mlp == "gated" else 1
    attn = (_norm(cfg, s) + _masked(ATTN_IN, s, r * d) + _projection_inputs(cfg, s, 3)
            + attention_bytes(cfg, s, seq_len) + _masked(ATTN_OUT, s, c * d))
    mlp = (_norm(cfg, s) + _masked(MLP_IN, s, r * d) + _projection_inputs(cfg, s, n_in)
           + mlp_bytes(cfg, s) + _masked(MLP_OUT, s, c * d))
    return attn + mlp


def outside_bytes(cfg: ModelConfig, s: ActivationSetup) -> int:
    """Per token outside the layers: token ids, the hidden mask twice, the final norm, the head's input."""
    d, r = cfg.d_model, s.residual_bytes
    ids = 8 if s.trainable else 0
    hidden = 2 * r * d if "hidden" in s.masks else 0
    return ids + hidden + _norm(cfg, s) + _projection_inputs(cfg, s, 1)


def no_grad_layer_bytes(cfg: ModelConfig, s: ActivationSetup) -> int:
    """Per token, the most one layer holds at once in a forward without gradients (evaluation, a teacher):
    the residual, its fp32 normalisation and the normed input, then the attention's q, k, v and output or
    the MLP's gate, act(gate) and up (or up and act(up)); nothing is kept past its use."""
    c, d = s.compute_bytes, cfg.d_model
    stream = (4 + s.residual_bytes + c) * d
    attention = c * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    mlp = (3 if cfg.mlp == "gated" else 2) * c * cfg.intermediate_size
    return stream + max(attention, mlp)


def rope_bytes(cfg: ModelConfig, seq_len: int) -> int:
    """The fp32 cos and sin tables every layer's rotation keeps (one pair per forward)."""
    return 2 * 4 * seq_len * 2 * (int(cfg.head_dim * cfg.rotary_pct) // 2)


def activation_bytes(cfg: ModelConfig, s: ActivationSetup, batch: int, seq_len: int, checkpointing: bool) -> int:
    """What the forward of one microbatch of `batch` sequences leaves for backward.

    With (non-reentrant, per block) activation checkpointing each block keeps only its input (r d per
    token); backward then rebuilds one block at a time (`recomputed_bytes`).
    """
    tokens = batch * seq_len
    if checkpointing:
        blocks = cfg.n_layers * s.residual_bytes * cfg.d_model
    else:
        blocks = cfg.n_layers * layer_bytes(cfg, s, seq_len) - _frozen_first_norms(cfg, s)
    return tokens * (blocks + outside_bytes(cfg, s)) + rope_bytes(cfg, seq_len)


def recomputed_bytes(cfg: ModelConfig, s: ActivationSetup, batch: int, seq_len: int) -> int:
    """What backward rebuilds of one checkpointed block."""
    return batch * seq_len * layer_bytes(cfg, s, seq_len)


def _frozen_first_norms(cfg: ModelConfig, s: ActivationSetup) -> int:
    """With frozen weights the embedding output needs no gradient: the norms reading it keep nothing."""
    if s.trainable:
        return 0
    return _norm(cfg, s) * (2 if cfg.parallel_residual else 1)
