"""One prunable decoder for every family, read top to bottom.

Masks (see `drprune.masks.MaskSet`) multiply in at fixed places; the decoder never knows which
generator made them. Where a mask multiplies:
  hidden [d]          embedding output, every norm output (norm statistics over kept dims only),
                      every sub-layer output
  head [L, H_kv]      each head's context before the output projection (repeated over a KV group)
  head_layer / mlp    the attention / MLP sub-layer output
  layer [L]           both sub-layer outputs
  intermediate [L, I] the MLP's hidden activation (after gate * up)
  attn_in / mlp_in    a sub-layer's normalised input   (dimension-independent, per layer [L, d])
  attn_out / mlp_out  a sub-layer's output
A compact model (`ModelConfig.layers`) instead carries per-layer shapes and residual index lists.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drprune.models.config import LayerSpec, ModelConfig

LayerMasks = Mapping[str, Tensor]

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Norm(nn.Module):
    """RMSNorm or LayerNorm whose statistics can skip pruned (zero-mask) dimensions.

    `select` gathers residual dimensions after normalising and before the affine weights, which is
    how a compact dimension-independent layer reads a subset of the full residual stream.
    """

    def __init__(self, kind: str, width: int, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if kind == "layernorm" else None

    def forward(self, x: Tensor, keep: Tensor | None = None, select: Tensor | None = None) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        if keep is None:
            if self.kind == "layernorm":
                xf = xf - xf.mean(-1, keepdim=True)
            var = xf.pow(2).mean(-1, keepdim=True)
        else:
            kept = (keep != 0).to(xf.dtype)
            n = kept.sum()
            if self.kind == "layernorm":
                xf = xf - (xf * kept).sum(-1, keepdim=True) / n
            var = (xf.pow(2) * kept).sum(-1, keepdim=True) / n
        y = xf * torch.rsqrt(var + self.eps)
        if select is not None:
            y = y.index_select(-1, select)
        if self.kind == "rmsnorm":
            return self.weight * y.to(dtype)
        return (y * self.weight.float() + self.bias.float()).to(dtype)


class Rotary(nn.Module):
    """Rotary embedding on the first `rotary_pct` of each head (all of it for LLaMA/Qwen2).

    With RoPE scaling the frequencies and the cos/sin factor (YaRN's `attention_factor`) are HF's,
    computed from the model's context length, so a scaled model computes what transformers does.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim = int(cfg.head_dim * cfg.rotary_pct)
        inv_freq, self.attention_scaling = _inv_freq(cfg, self.dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the frequencies where the module now lives (after `to_empty` from the meta device)."""
        with torch.device(self.inv_freq.device):
            self.inv_freq.copy_(_inv_freq(self.cfg, self.dim)[0])

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _inv_freq(cfg: ModelConfig, dim: int) -> tuple[Tensor, float]:
    """(inverse frequencies, cos/sin scale) of the model's RoPE."""
    if cfg.rope_scaling:
        from transformers import PretrainedConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_like = PretrainedConfig(
            rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling), head_dim=cfg.head_dim,
            hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads,
            partial_rotary_factor=cfg.rotary_pct, max_position_embeddings=cfg.context_length,
        )
        with torch.device("cpu"):  # real numbers even when the model is built on the meta device
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[cfg.rope_type](hf_like, "cpu")
        return inv_freq.float(), float(scaling)
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; rotates the first cos.shape[-1] dims, passes the rest through.

    The rotation is computed in fp32 (cos/sin are fp32) and the result comes back in x's dtype: under
    autocast q and k stay in the same 16-bit dtype as v (flash attention refuses a mix), and fp32
    runs compute exactly what they always did.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    x_rot = (x_rot * cos.float() + _rotate_half(x_rot) * sin.float()).to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.numel() else x_rot


class Attention(nn.Module):
    """Causal grouped-query attention; `head_z` masks each KV group's heads before the output projection."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, d_in: int, d_out: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = spec.n_heads, spec.n_kv_heads, cfg.head_dim
        self.attn_impl = cfg.attn_impl
        self.wq = nn.Linear(d_in, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d_in, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d_in, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(self.n_heads * self.hd, d_out, bias=cfg.o_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], head_z: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        ctx = self._attend(q, k, v)  # [B, T, H, hd]
        if head_z is not None:
            ctx = ctx * head_z.repeat_interleave(self.n_heads // self.n_kv)[:, None].to(ctx.dtype)
        return self.out_proj(ctx.reshape(b, t, self.n_heads * self.hd))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """[B, H, T, hd] q and [B, H_kv, T, hd] k, v -> [B, T, H, hd] context.

        The softmax scale is 1/sqrt(head_dim), which pruning never changes. Both kernels read each
        KV head once for its whole query group (no repeated K/V copies).
        """
        if self.attn_impl == "flash":
            from flash_attn import flash_attn_func  # optional GPU extra: pip install drprune[gpu]

            dtype = _flash_dtype(q)
            q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
            return flash_attn_func(q, k, v, causal=True)
        gqa = self.n_heads != self.n_kv
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)


def _flash_dtype(q: Tensor) -> torch.dtype:
    """The one 16-bit dtype q, k and v must share for flash_attn (it rejects fp32 and mixed inputs)."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return q.dtype
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    raise ValueError(f"attn_impl=flash needs fp16/bf16 activations but q is {q.dtype}: train with "
                     "precision=amp_bf16, or use attn_impl=sdpa in fp32")


class MLP(nn.Module):
    """Gated (act(gate) * up) or plain MLP; `intermediate_z` masks its hidden channels before the down projection."""

    def __init__(self, cfg: ModelConfig, width: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(d_in, width, bias=cfg.mlp_bias) if cfg.mlp == "gated" else None
        self.up_proj = nn.Linear(d_in, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, d_out, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, intermediate_z: Tensor | None) -> Tensor:
        if self.gate_proj is not None:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        if intermediate_z is not None:
            h = h * intermediate_z.to(h.dtype)
        return self.down_proj(h)


_INDEX_LISTS = ("attn_in", "attn_out", "mlp_in", "mlp_out")  # a compact layer's residual index lists


class Block(nn.Module):
    """One decoder layer; either sub-layer may be absent in a compact model."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        d = cfg.d_model
        self.spec = spec
        for name in _INDEX_LISTS:
            idx = getattr(spec, name)
            self.register_buffer(f"{name}_idx", None if idx is None else torch.tensor(idx), persistent=False)
        if spec.has_attn:
            d_in = d if spec.attn_in is None else len(spec.attn_in)
            d_out = d if spec.attn_out is None else len(spec.attn_out)
            self.ln_1 = Norm(cfg.norm, d_in, cfg.norm_eps)
            self.attn = Attention(cfg, spec, d_in, d_out)
        if spec.has_mlp:
            d_in = d if spec.mlp_in is None else len(spec.mlp_in)
            d_out = d if spec.mlp_out is None else len(spec.mlp_out)
            self.ln_2 = Norm(cfg.norm, d_in, cfg.norm_eps)
            self.mlp = MLP(cfg, spec.intermediate_size, d_in, d_out)

    def reset_buffers(self) -> None:
        """Refill the residual index lists (after `to_empty` from the meta device)."""
        for name in _INDEX_LISTS:
            buffer = getattr(self, f"{name}_idx")
            if buffer is not None:
                buffer.copy_(torch.tensor(getattr(self.spec, name)))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], z: LayerMasks) -> Tensor:
        attn_out = self._attn_branch(x, rope, z) if hasattr(self, "attn") else None
        if not self.parallel and attn_out is not None:
            x = self._add(x, attn_out, self.attn_out_idx)
        if hasattr(self, "mlp"):
            mlp_out = self._mlp_branch(x, z)
            x = self._add(x, mlp_out, self.mlp_out_idx)
        if self.parallel and attn_out is not None:
            x = self._add(x, attn_out, self.attn_out_idx)
        return x

    @staticmethod
    def _add(x: Tensor, out: Tensor, idx: Tensor | None) -> Tensor:
        return x + out if idx is None else x.index_add(-1, idx, out)

    def _attn_branch(self, x: Tensor, rope: tuple[Tensor, Tensor], z: LayerMasks) -> Tensor:
        h = _scale(self.ln_1(x, z.get("hidden"), self.attn_in_idx), z, "hidden", "attn_in")
        out = self.attn(h, rope, z.get("head"))
        return _scale(out, z, "head_layer", "layer", "hidden", "attn_out")

    def _mlp_branch(self, x: Tensor, z: LayerMasks) -> Tensor:
        h = _scale(self.ln_2(x, z.get("hidden"), self.mlp_in_idx), z, "hidden", "mlp_in")
        out = self.mlp(h, z.get("intermediate"))
        return _scale(out, z, "mlp", "layer", "hidden", "mlp_out")


def _scale(x: Tensor, z: LayerMasks, *names: str) -> Tensor:
    for name in names:
        m = z.get(name)
        if m is not None:
            x = x * m.to(x.dtype)
    return x


class PrunableDecoder(nn.Module):
    """Causal LM; state-dict names follow the Composer/Sheared-LLaMA convention (`transformer.*`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                blocks=nn.ModuleList(Block(cfg, cfg.layer_spec(i)) for i in range(cfg.n_layers)),
                ln_f=Norm(cfg.norm, cfg.d_model, cfg.norm_eps),
            )
        )
        if not cfg.tie_word_embeddings:
            self.transformer["output"] = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def param_init_fn(self, module: nn.Module) -> None:
        """Initialise one module moved off the meta device (Composer's FSDP1 calls it per module).

        Parameters get their fresh-model values (rank 0's checkpoint weights then replace them when
        `sync_module_states` broadcasts); buffers are recomputed, as `materialize` does.
        """
        self._init_weights(module)
        if isinstance(module, Norm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, (Rotary, Block)):
            module.reset_buffers()

    def materialize(self, device: torch.device | str = "cpu") -> None:
        """Storage for a decoder built on the meta device, buffers computed, parameters left unset.

        For a decoder whose every weight is about to be loaded from a checkpoint: no random
        initialisation is drawn only to be overwritten (minutes for an 8B model).
        """
        self.to_empty(device=device)
        for module in self.modules():
            if isinstance(module, (Rotary, Block)):
                module.reset_buffers()

    @property
    def is_meta(self) -> bool:
        """Whether the weights have no storage yet (built under `torch.device("meta")`)."""
        return self.transformer["wte"].weight.is_meta

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Composer's FSDP auto-wrap: one shard unit per block."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Composer's activation checkpointing (fsdp_config.activation_checkpointing): per block."""
        return isinstance(module, Block)

    def output_weight(self) -> Tensor:
        return self.transformer["wte"].weight if self.cfg.tie_word_embeddings else self.transformer["output"].weight

    def forward(self, input_ids: Tensor, masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits [B, T, vocab]; `masks` is a MaskSet (or dict) validated against this config."""
        masks = masks or {}
        hidden = masks.get("hidden")
        x = self.transformer["wte"](input_ids)
        if hidden is not None:
            x = x * hidden.to(x.dtype)
        rope = self.rotary(input_ids.shape[1], input_ids.device)  # fp32: see apply_rotary
        for i, block in enumerate(self.transformer["blocks"]):
            x = block(x, rope, _layer_masks(masks, i))
        x = self.transformer["ln_f"](x, hidden)
        if hidden is not None:
            x = x * hidden.to(x.dtype)
        return F.linear(x, self.output_weight())

    @staticmethod
    def extra_state_for(cfg: ModelConfig) -> dict:
        return {"model_config": cfg.to_dict()}

    @property
    def _extra_state(self) -> dict:
        """torch.distributed.checkpoint resolves every state-dict key with getattr; under FSDP1 the decoder is
        a unit root, so `model._extra_state` is looked up as an attribute when a checkpoint is saved."""
        return self.get_extra_state()

    def get_extra_state(self) -> dict:
        """The config travels inside every state dict, so checkpoints describe their own shape."""
        return self.extra_state_for(self.cfg)

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("model_config") if isinstance(state, dict) else None
        if saved is not None and ModelConfig.from_dict(saved) != self.cfg:
            raise ValueError(
                "checkpoint model config differs from this model's config: "
                f"checkpoint {saved} vs model {self.cfg.to_dict()}"
            )

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer["wte"].weight.numel()
            if not self.cfg.tie_word_embeddings:
                n -= self.transformer["output"].weight.numel()
        return n


_PER_LAYER = ("head", "head_layer", "mlp", "layer", "intermediate", "attn_in", "attn_out", "mlp_in", "mlp_out")


def _layer_masks(masks: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    z = {name: masks[name][i] for name in _PER_LAYER if masks.get(name) is not None}
    if masks.get("hidden") is not None:
        z["hidden"] = masks["hidden"]
    return z
