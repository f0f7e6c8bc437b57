"""What a GGUF file holds for a model: its architecture, hyperparameters and tensor list.

Layers all alike are written as llama.cpp's own converter writes `llama` (LLaMA, Mistral) and `qwen2`
models, so transformers' GGUF reader loads them too. Layers of different shapes are written as
llama.cpp's `deci` architecture (Nemotron / DeciLM), whose loader and graph read `head_count`,
`head_count_kv` and `feed_forward_length` per layer (the `llama` graph takes layer 0's values for all
layers); transformers cannot read those files. Two gaps of `deci` (in llama.cpp 0c1e570, the one
llama-cpp-python 0.3.36 ships; tests/test_gguf_llamacpp.py) are bridged with exact stand-ins instead of
refusing the model:
- layer 0 without attention: llama.cpp derives the head size from layer 0's head count, so layer 0
  gets one head whose output projection is zero;
- a layer with attention but no MLP: for `feed_forward_length` 0 the graph skips the layer's residual
  add and so drops its attention output, so the layer gets a 1-wide MLP whose weights are zero.
Both add exactly zero to the residual stream. Layers that read or write their own residual
dimensions (hypernetwork pruning) have no form in any llama.cpp architecture and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drprune.errors import UserError
from drprune.models.config import ModelConfig

UNIFORM_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # drprune family -> general.architecture (Mistral: llama)
PER_LAYER_ARCHITECTURE = "deci"


class PerLayerShapes(UserError):
    """The model's layers select their own residual dimensions, which no llama.cpp architecture holds."""


@dataclass(frozen=True)
class GgufLayer:
    """One layer as the GGUF file states it; a stand-in sub-layer is written with zero output weights."""

    n_heads: int
    n_kv_heads: int
    n_ff: int
    attn_stand_in: bool = False
    mlp_stand_in: bool = False


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: made from the HF tensor `source`, or when None a stand-in filled with `fill`.

    `rope_heads` > 0: the rows are rotary heads (HF's half-split order) to interleave into the adjacent
    pairs llama.cpp's `llama`/`deci` RoPE rotates."""

    name: str
    shape: tuple[int, ...]
    source: str | None
    rope_heads: int = 0
    fill: float = 0.0


def architecture(cfg: ModelConfig) -> str:
    return UNIFORM_ARCHITECTURES[cfg.family] if cfg.is_uniform else PER_LAYER_ARCHITECTURE


def check_exportable(cfg: ModelConfig, source: str) -> None:
    """Raise UserError naming why `cfg` has no faithful GGUF form (before any weight is read)."""
    if cfg.family not in UNIFORM_ARCHITECTURES:
        raise UserError(f"{source}: family {cfg.family!r} has no GGUF export; supported: LLaMA, Mistral, Qwen2")
    selections = ("attn_in", "attn_out", "mlp_in", "mlp_out")
    selecting = [i for i in range(cfg.n_layers) if any(getattr(cfg.layer_spec(i), k) is not None for k in selections)]
    if selecting:
        raise PerLayerShapes(
            f"{source}: layers {selecting} read or write their own subsets of the residual dimensions "
            "(dimension-independent / hypernetwork pruning), which no llama.cpp architecture can express: use the "
            "HF folder (remote code, trust_remote_code=True), or prune with a shared hidden mask")
    problems = []
    if cfg.family == "llama" and (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        problems.append("attention/MLP biases (transformers' GGUF reader drops them for llama)")
    if cfg.is_uniform and cfg.family == "qwen2" and cfg.head_dim * cfg.n_heads != cfg.d_model:
        problems.append(f"head_dim {cfg.head_dim} * {cfg.n_heads} heads != hidden size {cfg.d_model} "
                        "(GGUF qwen2 readers derive head_dim from the hidden size)")
    if cfg.rope_scaling is not None:
        problems.append(f"rope_scaling {cfg.rope_scaling} (not written to GGUF: readers would use plain RoPE)")
    if cfg.activation != "silu":
        problems.append(f"activation {cfg.activation!r} (GGUF llama/qwen2/deci graphs use SiLU)")
    if problems:
        raise UserError(f"{source} cannot be written as GGUF faithfully: {'; '.join(problems)}")


def gguf_layers(cfg: ModelConfig) -> list[GgufLayer]:
    """Each layer's head counts and MLP width as written, with the stand-ins of the module docstring."""
    out = []
    for i in range(cfg.n_layers):
        spec = cfg.layer_spec(i)
        attn_stand_in = i == 0 and not spec.has_attn
        mlp_stand_in = spec.has_attn and not spec.has_mlp
        heads, kv = (1, 1) if attn_stand_in else (spec.n_heads, spec.n_kv_heads)
        out.append(GgufLayer(heads, kv, 1 if mlp_stand_in else spec.intermediate_size, attn_stand_in, mlp_stand_in))
    return out


def tensor_plan(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the file in order, with its HF source (or stand-in) and rotary reordering."""
    d, hd = cfg.d_model, cfg.head_dim
    rope = cfg.family == "llama" or not cfg.is_uniform  # qwen2's own graph rotates HF's half-split order
    plan = [TensorSpec("token_embd.weight", (cfg.vocab_size, d), "model.embed_tokens.weight")]
    for i, layer in enumerate(gguf_layers(cfg)):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        if layer.attn_stand_in:
            plan += [TensorSpec(blk + "attn_norm.weight", (d,), None, fill=1.0),
                     *(TensorSpec(blk + f"attn_{p}.weight", (hd, d), None) for p in "qkv"),
                     TensorSpec(blk + "attn_output.weight", (d, hd), None)]
        elif layer.n_heads:
            rows = {"q": layer.n_heads * hd, "k": layer.n_kv_heads * hd, "v": layer.n_kv_heads * hd}
            heads = {"q": layer.n_heads, "k": layer.n_kv_heads} if rope else {}
            plan += [TensorSpec(blk + "attn_norm.weight", (d,), hf + "input_layernorm.weight"),
                     *(TensorSpec(blk + f"attn_{p}.weight", (rows[p], d), hf + f"self_attn.{p}_proj.weight",
                                  heads.get(p, 0)) for p in "qkv"),
                     *(TensorSpec(blk + f"attn_{p}.bias", (rows[p],), hf + f"self_attn.{p}_proj.bias", heads.get(p, 0))
                       for p in "qkv" if cfg.qkv_bias),
                     TensorSpec(blk + "attn_output.weight", (d, layer.n_heads * hd), hf + "self_attn.o_proj.weight")]
        if layer.mlp_stand_in:
            plan += [TensorSpec(blk + "ffn_norm.weight", (d,), None, fill=1.0),
                     TensorSpec(blk + "ffn_gate.weight", (1, d), None), TensorSpec(blk + "ffn_up.weight", (1, d), None),
                     TensorSpec(blk + "ffn_down.weight", (d, 1), None)]
        elif layer.n_ff:
            plan += [TensorSpec(blk + "ffn_norm.weight", (d,), hf + "post_attention_layernorm.weight"),
                     *(TensorSpec(blk + f"ffn_{p}.weight", (layer.n_ff, d), hf + f"mlp.{p}_proj.weight")
                       for p in ("gate", "up")),
                     TensorSpec(blk + "ffn_down.weight", (d, layer.n_ff), hf + "mlp.down_proj.weight")]
    plan.append(TensorSpec("output_norm.weight", (d,), "model.norm.weight"))
    if not cfg.tie_word_embeddings:  # a GGUF without output.weight ties it to token_embd
        plan.append(TensorSpec("output.weight", (cfg.vocab_size, d), "lm_head.weight"))
    return plan


def add_hparams(writer: Any, cfg: ModelConfig, context_length: int) -> None:
    """The architecture's keys; per-layer arrays for head counts and MLP widths when layers differ."""
    layers = gguf_layers(cfg)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    if cfg.is_uniform:
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
    else:
        writer.add_feed_forward_length([layer.n_ff for layer in layers])
        writer.add_head_count([layer.n_heads for layer in layers])
        writer.add_head_count_kv([layer.n_kv_heads for layer in layers])
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
