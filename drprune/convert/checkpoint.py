"""Reading and writing model weights: Composer checkpoints and HF folders.

A drprune checkpoint is a Composer checkpoint (`{"state": {"model": state_dict}}`); the decoder's
config rides along in the state dict (`model._extra_state`), so every later step (compaction,
export, continued pretraining) reads the shape from the file instead of from hand-typed flags.
Plain Sheared-LLaMA / DRPruning state dicts (`model.transformer.*`) load too, given a config.
"""
from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import struct
import sys
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor

from drprune.convert.hf import (REMOTE_MODEL_TYPE, check_state_keys, config_from_hf, hf_config_dict, hf_to_ours,
                                ours_to_hf, stock_class_fits)
from drprune.errors import UserError
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder

log = logging.getLogger(__name__)

EXTRA_STATE_KEY = "model._extra_state"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists: remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- Composer side

def save_checkpoint(model_state: dict[str, Any], path: str | Path, overwrite: bool = False) -> Path:
    """Write a Composer-format checkpoint holding only model weights (+ config extra state)."""
    with atomic_output(path, overwrite) as tmp:
        torch.save({"state": {"model": model_state}}, tmp)
    log.info("wrote %s", path)
    return Path(path)


def load_model_state(path: str | Path) -> dict[str, Any]:
    """The model state dict of a Composer checkpoint, or of a plain state-dict file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise UserError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(obj, dict) and "state" in obj and "model" in obj["state"]:
        return obj["state"]["model"]
    if isinstance(obj, dict) and any(k.startswith("model.transformer.") for k in obj):
        return obj
    raise UserError(f"{path} is neither a Composer checkpoint nor a state dict of a drprune/Sheared model")


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


def mapped_releaser(state: dict[str, Any]) -> Callable[[Tensor], None]:
    """A function that gives back the resident pages of a tensor of `state` (from `load_model_state`).

    Streaming passes touch each input tensor once; without this the memory-mapped input stays
    resident and peak RSS grows to the whole input. The mapping is private and never written, so
    dropped pages are re-read from the file if touched again. Tensors not from `state` (e.g. a fused
    copy) are left alone.
    """
    mapped = {t.untyped_storage().data_ptr() for t in state.values()
              if isinstance(t, Tensor) and t.device.type == "cpu"}

    def release(t: Tensor) -> None:
        storage = t.untyped_storage()
        if _LIBC is None or storage.data_ptr() not in mapped:
            return
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_DONTNEED))

    return release


def decoder_keys(cfg: ModelConfig) -> set[str]:
    """Weight names of a decoder of this config, without allocating its weights."""
    with torch.device("meta"):
        keys = PrunableDecoder(cfg).state_dict().keys()
    return {k for k in keys if not k.endswith("_extra_state")}


def config_of_state(state: dict[str, Any], fallback: ModelConfig | None = None) -> ModelConfig:
    extra = state.get(EXTRA_STATE_KEY)
    if isinstance(extra, dict) and "model_config" in extra:
        return ModelConfig.from_dict(extra["model_config"])
    if fallback is None:
        raise UserError(
            "the checkpoint carries no model config (an older Sheared-LLaMA/DRPruning file?): "
            "pass the model config (e.g. --config configs/llama2/7b.yaml)"
        )
    return fallback


def decoder_state(state: dict[str, Any]) -> dict[str, Tensor]:
    """Decoder tensors (`transformer.*`) of a model state dict, without the `model.` prefix."""
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.transformer.")}


def load_decoder(path: str | Path, fallback: ModelConfig | None = None) -> PrunableDecoder:
    """Strictly load the decoder of a checkpoint (mask-generator tensors are ignored here)."""
    state = load_model_state(path)
    cfg = config_of_state(state, fallback)
    decoder = PrunableDecoder(cfg)
    load_decoder_weights(decoder, decoder_state(state), str(path))
    return decoder


def load_decoder_weights(decoder: PrunableDecoder, tensors: dict[str, Tensor], source: str) -> None:
    expected = {k for k in decoder.state_dict() if not k.endswith("_extra_state")}
    check_state_keys(expected, set(tensors), source, "is the checkpoint from a different model config?")
    decoder.load_state_dict({**tensors, "_extra_state": decoder.get_extra_state()}, strict=True)


def decoder_checkpoint_state(decoder: PrunableDecoder) -> dict[str, Any]:
    return {f"model.{k}": v for k, v in decoder.state_dict().items()}


# ---------------------------------------------------------------- HF side

def resolve_hf_dir(name_or_path: str) -> Path:
    """A local folder as is; otherwise a hub repo id fetched with huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/")):
        raise UserError(f"HF model folder {name_or_path} does not exist or is not a folder")
    from huggingface_hub import snapshot_download

    log.info("%s is not a local folder: fetching it from the Hugging Face hub", name_or_path)
    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def read_hf_tensors(hf_dir: Path) -> dict[str, Tensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        out: dict[str, Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    out[key] = fh.get_tensor(key)
        return out
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise UserError(f"no *.safetensors or pytorch_model*.bin weights in {hf_dir}")
    out = {}
    for f in bins:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def load_hf(name_or_path: str) -> tuple[ModelConfig, dict[str, Tensor], Path]:
    hf_dir = resolve_hf_dir(name_or_path)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{hf_dir} has no config.json: is it a Hugging Face model folder?")
    raw = json.loads(config_file.read_text())
    cfg = config_from_hf(raw)
    if raw.get("model_type") == REMOTE_MODEL_TYPE:  # drprune's remote-code folder keeps our names
        tensors = read_hf_tensors(hf_dir)
        check_state_keys(decoder_keys(cfg), set(tensors), str(hf_dir))
        return cfg, tensors, hf_dir
    return cfg, hf_to_ours(cfg, read_hf_tensors(hf_dir)), hf_dir


def write_hf_folder(
    cfg: ModelConfig,
    tensors: dict[str, Tensor],
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    config_overrides: dict[str, Any] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    release: Callable[[Tensor], None] | None = None,
) -> Path:
    """Write config.json + sharded safetensors (+ tokenizer files) for the stock HF class."""
    if not stock_class_fits(cfg):
        raise UserError("no stock HF class holds this shape: use drprune.compact.export.export_hf (remote code)")
    config = {**hf_config_dict(cfg), **(config_overrides or {})}
    with atomic_output(out_dir, overwrite) as tmp:
        tmp.mkdir()
        write_safetensors_shards(ours_to_hf(cfg, tensors), tmp, max_shard_bytes, release)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer(tokenizer_dir, tmp)
    log.info("wrote HF folder %s", out_dir)
    return Path(out_dir)


def write_safetensors_shards(items: Iterable[tuple[str, Tensor]], out_dir: Path, max_shard_bytes: int,
                             release: Callable[[Tensor], None] | None = None) -> None:
    """Stream tensors into shards of at most `max_shard_bytes` plus an index when there are several.

    Tensors are written straight from their memory (no serialised copy of the shard); `release` is
    called on each one once it is on disk, so a mapped input never becomes resident all at once.
    """
    shard_keys: list[list[str]] = []
    current: dict[str, Tensor] = {}
    size = 0

    def flush() -> None:
        _write_safetensors(out_dir / f"shard-{len(shard_keys):05d}.safetensors", current, release)
        shard_keys.append(list(current))
        current.clear()

    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = tensor
        size += nbytes
    flush()
    total = len(shard_keys)
    if total == 1:
        (out_dir / "shard-00000.safetensors").rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, keys in enumerate(shard_keys):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (out_dir / f"shard-{i:05d}.safetensors").rename(out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _write_safetensors(path: Path, tensors: dict[str, Tensor], release: Callable[[Tensor], None] | None) -> None:
    """One safetensors file (8-byte header length, JSON header, raw little-endian data), one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name} has dtype {t.dtype}, which safetensors export does not support")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            data = t.detach().to("cpu").contiguous()
            f.write(data.reshape(-1).view(torch.uint8).numpy().data)
            if release is not None:
                release(t)


def copy_tokenizer(tokenizer_dir: str | Path | None, out_dir: Path) -> None:
    if tokenizer_dir is None:
        return
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise UserError(f"tokenizer folder {src} does not exist")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise UserError(f"{src} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    for name in copied:
        shutil.copy2(src / name, out_dir / name)


def load_any_decoder(model: str | Path) -> PrunableDecoder:
    """A decoder from a HF folder (or hub id) or a drprune/Composer checkpoint file."""
    path = Path(model)
    if path.is_file():
        return load_decoder(path)
    cfg, tensors, _ = load_hf(str(model))
    decoder = PrunableDecoder(cfg)
    load_decoder_weights(decoder, tensors, str(model))
    return decoder
