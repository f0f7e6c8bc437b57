"""A drprune compact decoder for transformers (remote code): layers of different shapes.

Shipped by `drprune convert composer-to-hf` beside config.json (auto_map), loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. It depends only on torch and
transformers and computes exactly what drprune's PrunableDecoder computes for a compact config: per
layer head counts and MLP widths (a removed sub-layer is absent), and for dimension-independent
pruning, sub-layers that normalise the full residual stream, read a subset of it (gather) and add
their output back at their own subset (scatter). Weight names are drprune's own (`transformer.*`).
Generation keeps a KV cache (transformers' DynamicCache: one tensor pair per layer, so every layer may
have its own number of KV heads); entries are numbered over the layers that attend.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_drprune import DrpruneConfig

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class DrpruneNorm(nn.Module):
    """RMSNorm / LayerNorm over the full input; `select` gathers dims before the affine weights."""

    def __init__(self, kind, width, eps):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if kind == "layernorm" else None

    def forward(self, x, select=None):
        dtype = x.dtype
        xf = x.float()
        if self.kind == "layernorm":
            xf = xf - xf.mean(-1, keepdim=True)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if select is not None:
            y = y.index_select(-1, select)
        if self.kind == "rmsnorm":
            return self.weight * y.to(dtype)
        return (y * self.weight.float() + self.bias.float()).to(dtype)


def rotary_inv_freq(config):
    """(inverse frequencies, cos/sin scale): HF's RoPE scaling (YaRN's attention_factor included)."""
    dim = int(config.head_dim * config.rotary_pct)
    if config.rope_scaling:
        from transformers import PretrainedConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_like = PretrainedConfig(
            rope_theta=config.rope_theta, rope_scaling=dict(config.rope_scaling), head_dim=config.head_dim,
            hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
            partial_rotary_factor=config.rotary_pct, max_position_embeddings=config.max_position_embeddings,
        )
        kind = config.rope_scaling.get("rope_type", config.rope_scaling.get("type", "default"))
        with torch.device("cpu"):  # real numbers even when transformers builds the model on the meta device
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf_like, "cpu")
        return inv_freq.float(), float(scaling)
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot = x[..., :rot]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x[..., rot:]), dim=-1)


class DrpruneAttention(nn.Module):
    def __init__(self, config, n_heads, n_kv, d_in, d_out, cache_idx):
        super().__init__()
        self.n_heads, self.n_kv, self.hd, self.cache_idx = n_heads, n_kv, config.head_dim, cache_idx
        self.wq = nn.Linear(d_in, n_heads * self.hd, bias=config.qkv_bias)
        self.wk = nn.Linear(d_in, n_kv * self.hd, bias=config.qkv_bias)
        self.wv = nn.Linear(d_in, n_kv * self.hd, bias=config.qkv_bias)
        self.out_proj = nn.Linear(n_heads * self.hd, d_out, bias=config.o_bias)

    def forward(self, x, rope, mask, cache):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_idx)
        group = self.n_heads // self.n_kv
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # Softmax scale 1/sqrt(head_dim) of the source model: pruning never changes head_dim.
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))


class DrpruneMLP(nn.Module):
    def __init__(self, config, width, d_in, d_out):
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        gated = config.mlp == "gated"
        self.gate_proj = nn.Linear(d_in, width, bias=config.mlp_bias) if gated else None
        self.up_proj = nn.Linear(d_in, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, d_out, bias=config.mlp_bias)

    def forward(self, x):
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class DrpruneBlock(nn.Module):
    def __init__(self, config, spec, cache_idx):
        super().__init__()
        self.parallel = config.parallel_residual
        d = config.hidden_size
        for name in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            idx = spec.get(name)
            self.register_buffer(f"{name}_idx", None if idx is None else torch.tensor(idx), persistent=False)

        def width(name):
            return d if spec.get(name) is None else len(spec[name])

        if spec["n_heads"] > 0:
            self.ln_1 = DrpruneNorm(config.norm, width("attn_in"), config.norm_eps)
            self.attn = DrpruneAttention(config, spec["n_heads"], spec["n_kv_heads"], width("attn_in"),
                                         width("attn_out"), cache_idx)
        if spec["intermediate_size"] > 0:
            self.ln_2 = DrpruneNorm(config.norm, width("mlp_in"), config.norm_eps)
            self.mlp = DrpruneMLP(config, spec["intermediate_size"], width("mlp_in"), width("mlp_out"))

    @staticmethod
    def add(x, out, idx):
        return x + out if idx is None else x.index_add(-1, idx, out)

    def forward(self, x, rope, mask, cache):
        attn_out = self.attn(self.ln_1(x, self.attn_in_idx), rope, mask, cache) if hasattr(self, "attn") else None
        if not self.parallel and attn_out is not None:
            x = self.add(x, attn_out, self.attn_out_idx)
        if hasattr(self, "mlp"):
            x = self.add(x, self.mlp(self.ln_2(x, self.mlp_in_idx)), self.mlp_out_idx)
        if self.parallel and attn_out is not None:
            x = self.add(x, attn_out, self.attn_out_idx)
        return x


class DrprunePreTrainedModel(PreTrainedModel):
    config_class = DrpruneConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["DrpruneBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, DrpruneNorm):
            module.weight.data.fill_(1.0)
            if module.bias is not None:
                module.bias.data.zero_()


class DrpruneForCausalLM(DrprunePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        # Cache entries are numbered over the layers that attend, so entry 0 (whose length
        # DynamicCache.get_seq_length() reports) belongs to a layer that fills it.
        blocks, n_attn = [], 0
        for i in range(config.num_hidden_layers):
            blocks.append(DrpruneBlock(config, config.layer(i), n_attn))
            n_attn += config.layer(i)["n_heads"] > 0
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.hidden_size),
            blocks=nn.ModuleList(blocks),
            ln_f=DrpruneNorm(config.norm, config.hidden_size, config.norm_eps),
        )
        if not config.tie_word_embeddings:
            modules["output"] = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.transformer = nn.ModuleDict(modules)
        inv_freq, self.attention_scaling = rotary_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer["wte"]

    def set_input_embeddings(self, value):
        self.transformer["wte"] = value

    def output_weight(self):
        return self.transformer["wte"].weight if self.config.tie_word_embeddings else self.transformer["output"].weight

    def rope(self, position_ids, dtype):
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # [B, 1, T, rot]

    @staticmethod
    def attention_bias(attention_mask, cache_position, kv_len):
        """None when SDPA needs no mask (one query, or a causal block starting at key 0, nothing padded),
        else a boolean [B or 1, 1, T, kv_len] mask: query i sees keys up to its cache position."""
        t = cache_position.shape[0]
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and (t == 1 or t == kv_len):
            return None
        keys = torch.arange(kv_len, device=cache_position.device)
        mask = keys <= cache_position[:, None]
        if padded:
            mask = (mask & attention_mask.bool()[:, None, None, :]) | (keys == cache_position[:, None])
            return mask  # padded queries see themselves (their output is ignored; no all-masked rows)
        return mask[None, None]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep=0, **kwargs):
        x = self.transformer["wte"](input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + t, device=x.device)
        if position_ids is None:
            position_ids = cache_position[None].expand(b, t)
        rope = self.rope(position_ids, x.dtype)
        mask = self.attention_bias(attention_mask, cache_position, past + t)
        for block in self.transformer["blocks"]:
            x = block(x, rope, mask, past_key_values)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = F.linear(self.transformer["ln_f"](x[:, keep]), self.output_weight())
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
