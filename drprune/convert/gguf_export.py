"""HF folder or drprune checkpoint -> one GGUF file (llama.cpp's format), written a tensor at a time.

The GGUF side follows what llama.cpp's own converter writes for `llama` (LLaMA, Mistral) and `qwen2`
models, so llama.cpp-based runtimes and transformers' GGUF reader both load the file. Only models
whose layers are all alike are exported: GGUF allows per-layer head_count / feed_forward_length
arrays and llama.cpp reads them, but transformers' reader takes one number for all layers, and
layers without attention or MLP or with residual selections have no GGUF form at all.

Tensors stream: each is read (a mapped checkpoint page or one safetensors entry), converted and
written before the next, so peak memory is about one tensor on top of the interpreter.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from drprune.atomic import atomic_output, check_complete
from drprune.convert.checkpoint import config_of_state, decoder_state, load_model_state, mapped_releaser, \
    resolve_hf_dir
from drprune.convert.gguf_vocab import Vocab, read_vocab
from drprune.convert.hf import config_from_hf, ours_to_hf
from drprune.convert.sharded import looks_sharded
from drprune.errors import UserError
from drprune.models.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "q8_0")
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # drprune family -> general.architecture (Mistral: llama)
_IGNORED = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_QKV_BIAS_NAMES = {f"self_attn.{p}_proj.bias": f"attn_{p}.bias" for p in "qkv"}


class PerLayerShapes(UserError):
    """The model's layers differ in shape, which a GGUF file for transformers cannot hold."""


@dataclass
class _Weights:
    """A model's tensors under HF names, loaded one at a time."""

    shapes: dict[str, tuple[int, ...]]
    load: Callable[[str], Tensor]
    release: Callable[[Tensor], None]


def check_exportable(cfg: ModelConfig, source: str) -> None:
    """Raise UserError naming why `cfg` has no faithful GGUF form (before any weight is read)."""
    if not cfg.is_uniform:
        raise PerLayerShapes(
            f"{source}: its layers differ in shape (per-layer heads or MLP widths, e.g. from hypernetwork "
            "pruning). llama.cpp reads per-layer head_count/feed_forward_length arrays, but transformers' GGUF "
            "reader takes one value for all layers and layers without attention or MLP have no GGUF form: "
            "use the HF folder (drprune convert composer-to-hf), or prune to one shape for all layers (L0 target)")
    if cfg.family not in GGUF_ARCHITECTURES:
        raise UserError(f"{source}: family {cfg.family!r} has no GGUF export; supported: LLaMA, Mistral, Qwen2")
    problems = []
    if cfg.family == "llama" and (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        problems.append("attention/MLP biases (transformers' GGUF reader drops them for llama)")
    if cfg.family == "qwen2" and cfg.head_dim * cfg.n_heads != cfg.d_model:
        problems.append(f"head_dim {cfg.head_dim} * {cfg.n_heads} heads != hidden size {cfg.d_model} "
                        "(GGUF qwen2 readers derive head_dim from the hidden size)")
    if cfg.rope_scaling is not None:
        problems.append(f"rope_scaling {cfg.rope_scaling} (transformers' GGUF reader ignores it)")
    if cfg.activation != "silu":
        problems.append(f"activation {cfg.activation!r} (GGUF llama/qwen2 graphs use SiLU)")
    if problems:
        raise UserError(f"{source} cannot be written as GGUF faithfully: {'; '.join(problems)}")


def hf_to_gguf(source: str | Path, out: str | Path, *, dtype: str = "f16", tokenizer_dir: str | Path | None = None,
               overwrite: bool = False) -> Path:
    """Write the model at `source` (a HF folder or a drprune checkpoint .pt) as the GGUF file `out`.

    `dtype`: f32, f16 or q8_0 for matrices (norms stay f32; a matrix whose rows are not a multiple of
    32 stays f16 under q8_0). The tokenizer comes from `tokenizer_dir`, else from the HF folder."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists: remove it or pass --overwrite")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise UserError("writing GGUF files needs the gguf package: pip install gguf  (or pip install -e '.[demo]')") \
            from err
    cfg, weights, own_tokenizer = _open_source(str(source))
    names = _gguf_names(cfg)
    _check_names(set(weights.shapes), names, cfg, str(source))
    tok_dir = tokenizer_dir or own_tokenizer
    if tok_dir is None:
        raise UserError(f"{source} is a checkpoint and carries no tokenizer: pass --tokenizer DIR")
    vocab = read_vocab(Path(tok_dir), cfg.vocab_size)
    with atomic_output(out, overwrite) as tmp:
        _write(tmp, cfg, weights, names, vocab, dtype, Path(source).stem)
    log.info("wrote %s (%s, %s, %d layers, %.1f MB)", out, GGUF_ARCHITECTURES[cfg.family], dtype, cfg.n_layers,
             out.stat().st_size / 1e6)
    return out


def _open_source(source: str) -> tuple[ModelConfig, _Weights, Path | None]:
    """(config, lazily loaded HF-named weights, tokenizer folder or None) of a checkpoint (file or sharded
    folder) or HF folder."""
    path = Path(source)
    if path.is_file() or looks_sharded(path):
        state = load_model_state(path)
        if any(k.startswith("mask_generator.") for k in state):
            raise UserError(f"{source} is a pruning checkpoint with masks: run `drprune compact {source}` first "
                            "and convert its output")
        cfg = config_of_state(state)
        check_exportable(cfg, source)
        tensors = dict(ours_to_hf(cfg, decoder_state(state)))  # the HF export's names, still memory-mapped
        return cfg, _Weights({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__,
                             mapped_releaser(state)), None
    hf_dir = resolve_hf_dir(source)
    check_complete(hf_dir, "HF model folder")
    config_file = hf_dir / "config.json"
    try:
        cfg = config_from_hf(json.loads(config_file.read_text()))
    except (OSError, ValueError) as err:
        raise UserError(f"{config_file} is missing or not valid JSON ({err}): is {hf_dir} a complete HF model "
                        "folder?") from err
    check_exportable(cfg, source)
    return cfg, _open_hf_weights(hf_dir), hf_dir


def _open_hf_weights(hf_dir: Path) -> _Weights:
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return _safetensors_weights(files)
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise UserError(f"no *.safetensors or pytorch_model*.bin weights in {hf_dir}")
    tensors = {k: v for f in bins for k, v in torch.load(f, map_location="cpu", mmap=True, weights_only=True).items()}
    return _Weights({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__, mapped_releaser(tensors))


def _safetensors_weights(files: list[Path]) -> _Weights:
    """Tensors of safetensors files, each read with plain file reads when asked for. (A memory map
    would keep every page it touched resident, so peak memory would grow to the whole model.)"""
    entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
    for path in files:
        try:
            with open(path, "rb") as fh:
                size = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    start, end = info["data_offsets"]
                    entries[name] = (path, info["dtype"], tuple(info["shape"]), 8 + size + start, 8 + size + end)
        except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err}): is the folder complete?") from err

    def load(name: str) -> Tensor:
        path, dtype, shape, start, end = entries[name]
        if dtype not in _FLOAT_DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {dtype}; GGUF export reads {sorted(_FLOAT_DTYPES)}")
        data = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as fh:
            fh.seek(start)
            if fh.readinto(data.numpy()) != end - start:
                raise UserError(f"{path} is truncated (tensor {name} ends past the file): is the folder complete?")
        return data.view(_FLOAT_DTYPES[dtype]).reshape(shape)

    return _Weights({k: e[2] for k, e in entries.items()}, load, lambda t: None)


def _gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, for exactly the tensors the model has, in file order."""
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    per_layer = {**_LAYER_NAMES, **(_QKV_BIAS_NAMES if cfg.qkv_bias else {})}
    for i in range(cfg.n_layers):
        names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{ours}" for hf, ours in per_layer.items()})
    names["model.norm.weight"] = "output_norm.weight"
    if not cfg.tie_word_embeddings:  # a GGUF without output.weight ties it to token_embd
        names["lm_head.weight"] = "output.weight"
    return names


def _check_names(got: set[str], names: dict[str, str], cfg: ModelConfig, source: str) -> None:
    got = {k for k in got if not k.endswith(_IGNORED)}
    if cfg.tie_word_embeddings:
        got.discard("lm_head.weight")
    missing, unexpected = sorted(set(names) - got), sorted(got - set(names))
    if missing or unexpected:
        raise UserError(f"{source}: tensors do not match a {cfg.family} model of its config: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def _rope_halves_to_pairs(w: Tensor, heads: int) -> Tensor:
    """HF orders each head's rotary rows as (first halves, second halves); llama.cpp's `llama` graph
    rotates adjacent row pairs. Interleave the halves: per head, [2, half, in] -> [half, 2, in]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _to_gguf_layout(t: Tensor, gguf_name: str, cfg: ModelConfig) -> Tensor:
    if cfg.family == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg.n_heads if "attn_q" in gguf_name else cfg.n_kv_heads
        t = _rope_halves_to_pairs(t, heads)
    return t.detach().contiguous()


def _tensor_type(shape: tuple[int, ...], dtype: str) -> Any:
    """GGML type of one tensor: vectors stay f32; q8_0 needs rows in blocks of 32 (else f16)."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or dtype == "f32":
        return Q.F32
    if dtype == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def _encode(t: Tensor, qtype: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    array = t.to(torch.float32).numpy()
    return array if qtype == Q.F32 else quantize(array, qtype)


def _stored(shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], Any, int]:
    """(shape as written, numpy dtype, bytes) of a tensor of `shape` stored as `qtype`."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    if qtype == Q.Q8_0:
        byte_shape = quant_shape_to_byte_shape(shape, qtype)
        return byte_shape, np.uint8, int(np.prod(byte_shape))
    np_dtype = np.float16 if qtype == Q.F16 else np.float32
    return shape, np_dtype, int(np.prod(shape)) * np.dtype(np_dtype).itemsize


def _add_hparams(writer: Any, cfg: ModelConfig) -> None:
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def _write(path: Path, cfg: ModelConfig, weights: _Weights, names: dict[str, str], vocab: Vocab, dtype: str,
           name: str) -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(str(path), GGUF_ARCHITECTURES[cfg.family])
    try:
        writer.add_name(name)
        writer.add_file_type(file_types[dtype])
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, cfg)
        vocab.write(writer)
        plan = [(hf, ours, _tensor_type(weights.shapes[hf], dtype)) for hf, ours in names.items()]
        for hf, ours, qtype in plan:
            shape, np_dtype, nbytes = _stored(weights.shapes[hf], qtype)
            writer.add_tensor_info(ours, shape, np_dtype, nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf, ours, qtype in plan:
            tensor = weights.load(hf)
            writer.write_tensor_data(_encode(_to_gguf_layout(tensor, ours, cfg), qtype))
            weights.release(tensor)
            del tensor
    finally:
        writer.close()
