"""Hugging Face <-> drprune: config translation and weight key maps for every family.

HF names follow `transformers`; ours follow the Composer/Sheared-LLaMA convention, so existing
Sheared-LLaMA / DRPruning LLaMA checkpoints load unchanged. Pythia's fused `query_key_value`
(laid out per head as [q, k, v]) is split into wq/wk/wv here and fused back on export.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

from drprune.errors import ConfigError, UserError
from drprune.models.config import ModelConfig

EXTRA_STATE_KEY = "model._extra_state"  # where a drprune checkpoint keeps its model config (and card)
HUB_PREFIX = "hub:"  # the only way a model argument reaches the Hugging Face Hub
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt_neox": "pythia"}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "pythia": "GPTNeoXForCausalLM"}
# Non-weight tensors some HF checkpoints carry.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


# The remote-code export (drprune.compact.export) for layers of different shapes: its config.json
# holds ModelConfig fields, under the standard HF name where one exists. Weight names are ours.
REMOTE_MODEL_TYPE = "drprune"
_REMOTE_RENAMES = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                   "n_kv_heads": "num_key_value_heads", "context_length": "max_position_embeddings"}
_NOT_IN_CONFIG_JSON = ("init_std", "attn_impl", "dtype")  # runtime knobs; the dtype is written as torch_dtype


def export_dtype(cfg: ModelConfig) -> str:
    """The dtype an export writes unless told otherwise: the one the source came in, else float32."""
    return cfg.dtype or "float32"


def remote_config_dict(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The config.json fields of the shipped DrpruneConfig for `cfg`, its tensors in `dtype` (default:
    `export_dtype`)."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_CONFIG_JSON}
    out = {_REMOTE_RENAMES.get(k, k): v for k, v in fields.items()}
    return {**out, "model_type": REMOTE_MODEL_TYPE, "architectures": ["DrpruneForCausalLM"],
            "torch_dtype": dtype or export_dtype(cfg)}


def _config_from_remote(c: dict[str, Any]) -> ModelConfig:
    back = {theirs: ours for ours, theirs in _REMOTE_RENAMES.items()}
    known = set(ModelConfig.__dataclass_fields__) - set(_NOT_IN_CONFIG_JSON)
    fields = {back.get(k, k): v for k, v in c.items()}
    return ModelConfig.from_dict({k: v for k, v in fields.items() if k in known})


def config_from_hf(hf: Any) -> ModelConfig:
    """ModelConfig from a transformers config object (or its dict)."""
    c = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    model_type = c.get("model_type")
    if model_type == REMOTE_MODEL_TYPE:
        return _config_from_remote(c)
    if model_type not in HF_MODEL_TYPES:
        raise UserError(
            f"HF model_type {model_type!r} is not supported; supported: {sorted(HF_MODEL_TYPES)}"
        )
    try:
        return _config_from_stock(c, HF_MODEL_TYPES[model_type])
    except KeyError as err:
        raise UserError(f"the HF config (config.json) has no {err.args[0]!r}: is it a complete {model_type} "
                        "config? Copy the model's own config.json") from err
    except (TypeError, ZeroDivisionError, ConfigError) as err:
        raise UserError(f"the HF config (config.json) holds a value of the wrong type or zero ({err}); copy the "
                        "model's own config.json") from err


def _config_from_stock(c: dict[str, Any], family: str) -> ModelConfig:
    common = dict(
        family=family,
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        context_length=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
    )
    if family == "pythia":
        return ModelConfig(
            **common, norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-5), mlp="plain",
            activation=_activation(c.get("hidden_act", "gelu")),
            parallel_residual=c.get("use_parallel_residual", True),
            qkv_bias=c.get("attention_bias", True), o_bias=c.get("attention_bias", True), mlp_bias=True,
            rotary_pct=c.get("rotary_pct", c.get("partial_rotary_factor", 0.25)),
            rope_theta=c.get("rotary_emb_base", c.get("rope_theta", 10000.0)),
            rope_scaling=c.get("rope_scaling"),
        )
    attention_bias = bool(c.get("attention_bias", False))
    return ModelConfig(
        **common, n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), mlp="gated",
        activation=_activation(c.get("hidden_act", "silu")),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(c.get("mlp_bias", False)),
        rope_theta=c.get("rope_theta", 10000.0), rope_scaling=c.get("rope_scaling"),
    )


def _activation(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
    if name not in table:
        raise UserError(f"HF hidden_act {name!r} is not supported; supported: {sorted(table)}")
    return table[name]


def stock_class_fits(cfg: ModelConfig) -> bool:
    """True when a stock transformers class holds the model: every layer alike, and for GPT-NeoX
    (which derives head size from hidden_size / heads) head_dim * n_heads == d_model."""
    if not cfg.is_uniform:
        return False
    return cfg.family != "pythia" or cfg.head_dim * cfg.n_heads == cfg.d_model


def hf_config_dict(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The config.json fields of the stock HF class for a uniform model, its tensors in `dtype` (default:
    `export_dtype`)."""
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.context_length, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_scaling=cfg.rope_scaling, architectures=[HF_ARCHITECTURES[cfg.family]],
        torch_dtype=dtype or export_dtype(cfg),
    )
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.activation]
    if cfg.family == "pythia":
        return dict(
            common, model_type="gpt_neox", layer_norm_eps=cfg.norm_eps, hidden_act=act,
            use_parallel_residual=cfg.parallel_residual, rotary_pct=cfg.rotary_pct,
            rotary_emb_base=cfg.rope_theta, attention_bias=cfg.qkv_bias,
        )
    out = dict(
        common, model_type=cfg.family, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps, hidden_act=act, rope_theta=cfg.rope_theta,
    )
    if cfg.family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return out


def _layer_names(cfg: ModelConfig) -> tuple[str, dict[str, str]]:
    """(HF layer prefix, {our suffix: HF suffix}) for plain one-to-one tensors."""
    if cfg.family == "pythia":
        return "gpt_neox.layers", {
            "ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
            "ln_2.weight": "post_attention_layernorm.weight", "ln_2.bias": "post_attention_layernorm.bias",
            "attn.out_proj.weight": "attention.dense.weight", "attn.out_proj.bias": "attention.dense.bias",
            "mlp.up_proj.weight": "mlp.dense_h_to_4h.weight", "mlp.up_proj.bias": "mlp.dense_h_to_4h.bias",
            "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight", "mlp.down_proj.bias": "mlp.dense_4h_to_h.bias",
        }
    names = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight"}
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("out_proj", "o_proj")):
        for kind in ("weight", "bias"):
            names[f"attn.{ours}.{kind}"] = f"self_attn.{theirs}.{kind}"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for kind in ("weight", "bias"):
            names[f"mlp.{proj}.{kind}"] = f"mlp.{proj}.{kind}"
    return "model.layers", names


def _top_names(cfg: ModelConfig) -> dict[str, str]:
    if cfg.family == "pythia":
        return {"transformer.wte.weight": "gpt_neox.embed_in.weight",
                "transformer.ln_f.weight": "gpt_neox.final_layer_norm.weight",
                "transformer.ln_f.bias": "gpt_neox.final_layer_norm.bias",
                "transformer.output.weight": "embed_out.weight"}
    return {"transformer.wte.weight": "model.embed_tokens.weight",
            "transformer.ln_f.weight": "model.norm.weight",
            "transformer.output.weight": "lm_head.weight"}


def hf_to_ours(cfg: ModelConfig, hf_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and for Pythia, split) HF tensors; strict: every key is used, none is missing."""
    remaining = {k: v for k, v in hf_tensors.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}
    if cfg.tie_word_embeddings:
        remaining.pop("lm_head.weight", None)
    out: dict[str, Tensor] = {}
    for ours, theirs in _key_pairs(cfg, set(remaining)):
        out[ours] = remaining.pop(theirs)
    if cfg.family == "pythia":
        prefix, _ = _layer_names(cfg)
        for i in range(cfg.n_layers):
            for kind in ("weight", "bias"):
                key = f"{prefix}.{i}.attention.query_key_value.{kind}"
                if key in remaining:
                    q, k, v = _split_qkv(remaining.pop(key), cfg)
                    for name, t in (("wq", q), ("wk", k), ("wv", v)):
                        out[f"transformer.blocks.{i}.attn.{name}.{kind}"] = t
    if remaining:
        raise UserError(f"unexpected keys in the HF checkpoint (not part of a {cfg.family} model): "
                        f"{sorted(remaining)[:10]}")
    return out


def ours_to_hf(cfg: ModelConfig, tensors: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF name, tensor) one at a time so exports can stream."""
    remaining = dict(tensors)
    for ours, theirs in _key_pairs(cfg, None):
        if ours in remaining:
            yield theirs, remaining.pop(ours)
    if cfg.family == "pythia":
        prefix, _ = _layer_names(cfg)
        for i in range(cfg.n_layers):
            for kind in ("weight", "bias"):
                parts = [remaining.pop(f"transformer.blocks.{i}.attn.{n}.{kind}", None) for n in ("wq", "wk", "wv")]
                if all(p is not None for p in parts):
                    yield f"{prefix}.{i}.attention.query_key_value.{kind}", _fuse_qkv(parts, cfg)
    if remaining:
        raise UserError(f"model tensors with no HF name for family {cfg.family}: {sorted(remaining)[:10]}")


def _key_pairs(cfg: ModelConfig, available: set[str] | None) -> Iterator[tuple[str, str]]:
    for ours, theirs in _top_names(cfg).items():
        if available is None or theirs in available:
            yield ours, theirs
    prefix, names = _layer_names(cfg)
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            full = f"{prefix}.{i}.{theirs}"
            if available is None or full in available:
                yield f"transformer.blocks.{i}.{ours}", full


def _split_qkv(t: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    heads = t.shape[0] // (3 * cfg.head_dim)
    per_head = t.reshape(heads, 3, cfg.head_dim, *t.shape[1:])
    return tuple(per_head[:, j].reshape(heads * cfg.head_dim, *t.shape[1:]).clone() for j in range(3))


def _fuse_qkv(parts: list[Tensor], cfg: ModelConfig) -> Tensor:
    heads = parts[0].shape[0] // cfg.head_dim
    stacked = torch.stack([p.reshape(heads, cfg.head_dim, *p.shape[1:]) for p in parts], dim=1)
    return stacked.reshape(heads * 3 * cfg.head_dim, *parts[0].shape[1:]).contiguous()


def check_state_keys(expected: set[str], got: set[str], source: str, fix: str = "") -> None:
    """Strict loading: name every missing or unexpected key."""
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        raise UserError(f"{source}: {'; '.join(parts)}{'. ' + fix if fix else ''}")

