"""HF folder or drprune checkpoint -> one GGUF file (llama.cpp's format), written a tensor at a time.

Which architecture, keys and tensors the file holds is `gguf_layout`'s business: `llama`/`qwen2` when
all layers are alike (llama.cpp and transformers' GGUF reader both load those), llama.cpp's `deci`
with per-layer arrays when they differ. The context length written is the HF config's
`max_position_embeddings` (the folder's config.json, or what the HF export writes for a checkpoint).

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
from drprune.convert.gguf_layout import PerLayerShapes as PerLayerShapes  # re-exported: callers catch it here
from drprune.convert.gguf_layout import TensorSpec, add_hparams, architecture, check_exportable, tensor_plan
from drprune.convert.gguf_vocab import Vocab, read_vocab
from drprune.convert.hf import REMOTE_MODEL_TYPE, config_from_hf, hf_config_dict, ours_to_hf, remote_config_dict
from drprune.convert.sharded import looks_sharded
from drprune.errors import UserError
from drprune.models.config import ModelConfig
from drprune.progress import track

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "q8_0")
_IGNORED = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class _Weights:
    """A model's tensors under HF names, loaded one at a time."""

    shapes: dict[str, tuple[int, ...]]
    load: Callable[[str], Tensor]
    release: Callable[[Tensor], None]


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
    cfg, weights, own_tokenizer, hf_config = _open_source(str(source))
    plan = tensor_plan(cfg)
    _check_tensors(weights.shapes, plan, cfg, str(source))
    tok_dir = tokenizer_dir or own_tokenizer
    if tok_dir is None:
        raise UserError(f"{source} is a checkpoint and carries no tokenizer: pass --tokenizer DIR")
    vocab = read_vocab(Path(tok_dir), cfg.vocab_size)
    context = _context_length(hf_config, str(source))
    with atomic_output(out, overwrite) as tmp:
        _write(tmp, cfg, context, weights, plan, vocab, dtype, Path(source).stem)
    log.info("wrote %s (%s, %s, %d layers, context %d, %.1f MB)", out, architecture(cfg), dtype, cfg.n_layers,
             context, out.stat().st_size / 1e6)
    return out


def _open_source(source: str) -> tuple[ModelConfig, _Weights, Path | None, dict[str, Any]]:
    """(config, lazily loaded HF-named weights, tokenizer folder or None, HF config.json dict) of a checkpoint
    (file or sharded folder) or HF folder."""
    path = Path(source)
    if path.is_file() or looks_sharded(path):
        state = load_model_state(path)
        if any(k.startswith("mask_generator.") for k in state):
            raise UserError(f"{source} is a pruning checkpoint with masks: run `drprune compact {source}` first "
                            "and convert its output")
        cfg = config_of_state(state)
        check_exportable(cfg, source)
        tensors = dict(ours_to_hf(cfg, decoder_state(state)))  # the HF export's names, still memory-mapped
        hf_config = hf_config_dict(cfg) if cfg.is_uniform else remote_config_dict(cfg)  # what the HF export writes
        return cfg, _Weights({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__,
                             mapped_releaser(state)), None, hf_config
    hf_dir = resolve_hf_dir(source)
    check_complete(hf_dir, "HF model folder")
    config_file = hf_dir / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
        cfg = config_from_hf(hf_config)
    except (OSError, ValueError) as err:
        raise UserError(f"{config_file} is missing or not valid JSON ({err}): is {hf_dir} a complete HF model "
                        "folder?") from err
    check_exportable(cfg, source)
    weights = _open_hf_weights(hf_dir)
    if hf_config.get("model_type") == REMOTE_MODEL_TYPE:
        weights = _renamed_to_hf(cfg, weights)
    return cfg, weights, hf_dir, hf_config


def _renamed_to_hf(cfg: ModelConfig, weights: _Weights) -> _Weights:
    """A remote-code folder's tensors (drprune's own names) under the stock HF names. `ours_to_hf` only
    renames llama/qwen2 tensors, so it maps names as well as tensors."""
    ours_of = {hf: ours for hf, ours in ours_to_hf(cfg, {k: k for k in weights.shapes})}
    return _Weights({hf: weights.shapes[ours] for hf, ours in ours_of.items()},
                    lambda name: weights.load(ours_of[name]), weights.release)


def _context_length(hf_config: dict[str, Any], source: str) -> int:
    """The context length runtimes size their window from: the HF config's max_position_embeddings."""
    value = hf_config.get("max_position_embeddings")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{source}: the HF config's max_position_embeddings is {value!r}, not a positive integer "
                        "(GGUF's context_length): fix config.json")
    return value


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


def _check_tensors(shapes: dict[str, tuple[int, ...]], plan: list[TensorSpec], cfg: ModelConfig, source: str) -> None:
    """The source holds exactly the tensors the plan reads, each of the shape its config implies."""
    got = {k for k in shapes if not k.endswith(_IGNORED)}
    if cfg.tie_word_embeddings:
        got.discard("lm_head.weight")
    wanted = {t.source: t.shape for t in plan if t.source is not None}
    missing, unexpected = sorted(set(wanted) - got), sorted(got - set(wanted))
    if missing or unexpected:
        raise UserError(f"{source}: tensors do not match a {cfg.family} model of its config: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(shapes[k])} (config: {shape})" for k, shape in wanted.items() if tuple(shapes[k]) != shape]
    if wrong:
        raise UserError(f"{source}: tensor shapes contradict its config: {', '.join(wrong[:3])}")


def _rope_halves_to_pairs(w: Tensor, heads: int) -> Tensor:
    """HF orders each head's rotary rows as (first halves, second halves); llama.cpp's `llama`/`deci` RoPE
    rotates adjacent row pairs. Interleave the halves: per head, [2, half, in] -> [half, 2, in]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _in_gguf_order(spec: TensorSpec, raw: Tensor | None) -> Tensor:
    """The tensor of `spec` (from `raw`, its HF tensor, or a stand-in) in GGUF's row order."""
    if raw is None:
        return torch.full(spec.shape, spec.fill)
    return (_rope_halves_to_pairs(raw, spec.rope_heads) if spec.rope_heads else raw).detach().contiguous()


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


def _write(path: Path, cfg: ModelConfig, context: int, weights: _Weights, plan: list[TensorSpec], vocab: Vocab,
           dtype: str, name: str) -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(str(path), architecture(cfg))
    try:
        writer.add_name(name)
        writer.add_file_type(file_types[dtype])
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(writer, cfg, context)
        vocab.write(writer)
        qtypes = [_tensor_type(spec.shape, dtype) for spec in plan]
        for spec, qtype in zip(plan, qtypes):
            shape, np_dtype, nbytes = _stored(spec.shape, qtype)
            writer.add_tensor_info(spec.name, shape, np_dtype, nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for spec, qtype in track(zip(plan, qtypes), f"export {path.name}", total=len(plan), unit="tensors"):
            raw = None if spec.source is None else weights.load(spec.source)
            writer.write_tensor_data(_encode(_in_gguf_order(spec, raw), qtype))
            if raw is not None:
                weights.release(raw)
            del raw
    finally:
        writer.close()
