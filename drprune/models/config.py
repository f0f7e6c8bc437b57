"""One dataclass of knobs describes every supported family (LLaMA 1/2/3, Mistral, Qwen2, Pythia).

A compact (pruned) model is the same config with smaller values; when layers differ from each other
(a sub-layer removed from some layers, per-layer widths, dimension-independent residual selections)
`layers` holds one `LayerSpec` per layer.

`context_length` is the model's context (HF `max_position_embeddings`, what vLLM and llama.cpp size
their context from, and what RoPE scaling is computed from); it is never the length a run trains
at (the run config's top-level `max_seq_len`). `dtype` is the dtype the source's weights came in,
which exports default to.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from drprune.dtypes import DTYPES
from drprune.errors import ConfigError, check_keys

FAMILIES = ("llama", "qwen2", "pythia")
# Checkpoints written before the context length was kept apart store it as `max_seq_len` (the
# value the run trained at when it overrode it); read it as the context length, as it was used.
LEGACY_CONTEXT_KEY = "max_seq_len"


@dataclass
class LayerSpec:
    """Shape of one decoder layer when layers are not all alike.

    `n_heads == 0` means the attention sub-layer is removed, `intermediate_size == 0` the MLP.
    `attn_in`/`attn_out`/`mlp_in`/`mlp_out` are the residual dimensions a sub-layer reads or writes
    (None = all of them); they come from dimension-independent (hypernetwork) pruning.
    """

    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    attn_in: list[int] | None = None
    attn_out: list[int] | None = None
    mlp_in: list[int] | None = None
    mlp_out: list[int] | None = None

    @property
    def has_attn(self) -> bool:
        return self.n_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.intermediate_size > 0


@dataclass
class ModelConfig:
    """Shape and knobs of a decoder; validated on construction (ConfigError) before any model is built."""

    family: str = "llama"
    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 11008
    context_length: int = 4096
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    mlp: str = "gated"  # gated (SwiGLU, 3 matrices) | plain (2 matrices)
    activation: str = "silu"  # silu | gelu | gelu_tanh
    parallel_residual: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rotary_pct: float = 1.0
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    attn_impl: str = "sdpa"  # sdpa | flash
    dtype: str | None = None  # float32 | bfloat16 | float16 the source came in; None = unknown
    layers: list[LayerSpec] | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "intermediate_size",
                    "context_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}={value!r} is invalid: set it to a positive integer "
                                  f"(the model's {key.replace('_', ' ')})")
        if self.head_dim is None:
            if self.n_heads == 0 or self.d_model % self.n_heads:
                raise ConfigError(
                    f"model.head_dim is not set and d_model={self.d_model} is not divisible by "
                    f"n_heads={self.n_heads}: set model.head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.layers is not None:
            self.layers = [s if isinstance(s, LayerSpec) else LayerSpec(**s) for s in self.layers]
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.family in FAMILIES, "family", f"one of {FAMILIES}"),
            (self.norm in ("rmsnorm", "layernorm"), "norm", "rmsnorm or layernorm"),
            (self.mlp in ("gated", "plain"), "mlp", "gated or plain"),
            (self.activation in ("silu", "gelu", "gelu_tanh"), "activation", "silu, gelu or gelu_tanh"),
            (self.attn_impl in ("sdpa", "flash"), "attn_impl", "sdpa or flash"),
            (0.0 < self.rotary_pct <= 1.0, "rotary_pct", "a fraction in (0, 1]"),
            (self.dtype is None or self.dtype in DTYPES, "dtype", f"one of {DTYPES} or null"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} is invalid: expected {expected}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if self.layers is not None and len(self.layers) != self.n_layers:
            raise ConfigError(f"model.layers has {len(self.layers)} entries but n_layers={self.n_layers}")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    def layer_spec(self, i: int) -> LayerSpec:
        if self.layers is not None:
            return self.layers[i]
        return LayerSpec(self.n_heads, self.n_kv_heads, self.intermediate_size)

    @property
    def rope_type(self) -> str:
        """HF's name of the RoPE scaling (`default` without any): yarn, dynamic, llama3, linear, ..."""
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the source shape, so a stock HF class can hold the model."""
        return self.layers is None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.layers is None:
            out.pop("layers")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """The config of a dict (a checkpoint's, a mask file's); an older dict's `max_seq_len` is its context length."""
        data = dict(data)
        if LEGACY_CONTEXT_KEY in data and "context_length" not in data:
            data["context_length"] = data.pop(LEGACY_CONTEXT_KEY)
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "model")
        return cls(**data)


def with_context_length(cfg: ModelConfig, context_length: int) -> ModelConfig:
    """`cfg` advertising another context length, with the RoPE frequencies its weights were trained with.

    YaRN without `original_max_position_embeddings` computes its frequencies from the context length
    (HF falls back to max_position_embeddings), so that value is pinned to the old context. Linear and
    LLaMA-3 scaling do not read it; dynamic NTK's frequencies only change for sequences longer than it.
    """
    scaling = cfg.rope_scaling
    if cfg.rope_type == "yarn" and "original_max_position_embeddings" not in scaling:
        scaling = {**scaling, "original_max_position_embeddings": cfg.context_length}
    return dataclasses.replace(cfg, context_length=context_length, rope_scaling=scaling)
