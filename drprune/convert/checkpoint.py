"""Reading and writing model weights: Composer checkpoints and HF folders.

A drprune checkpoint is a Composer checkpoint (`{"state": {"model": state_dict}}`); the decoder's
config rides along in the state dict (`model._extra_state`), so every later step (compaction,
export, continued pretraining) reads the shape from the file instead of from hand-typed flags.
Plain Sheared-LLaMA / DRPruning state dicts (`model.transformer.*`) load too, given a config.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import struct
import sys
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from drprune.atomic import atomic_output, check_complete, kill_point, mark_complete
from drprune.convert.integrity import (ALGORITHM, STATE_CHECKSUMS_KEY, state_checksums, torch_load, verify_folder,
                                      verify_state, write_folder_checksums)
from drprune.convert.hf import (EXTRA_STATE_KEY, HUB_PREFIX, REMOTE_MODEL_TYPE, check_state_keys, config_from_hf,
                                export_dtype, hf_config_dict, hf_to_ours, ours_to_hf, stock_class_fits)
from drprune.convert.model_card import ModelCard, write_card
from drprune.convert.sharded import load_sharded_model_state, looks_sharded
from drprune.errors import UserError
from drprune.dtypes import DTYPES
from drprune.models.config import LEGACY_CONTEXT_KEY, ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.progress import Progress

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


# ---------------------------------------------------------------- Composer side

def save_checkpoint(model_state: dict[str, Any], path: str | Path, overwrite: bool = False) -> Path:
    """Write a Composer-format checkpoint holding only model weights (+ config extra state) and their
    checksums; it loads with `weights_only=True`."""
    with atomic_output(path, overwrite) as tmp:
        torch.save({"state": {"model": model_state}, STATE_CHECKSUMS_KEY: state_checksums(model_state)}, tmp)
    log.info("wrote %s", path)
    return Path(path)


def load_model_state(path: str | Path, trust_pickle: bool = False, verify: bool = True) -> dict[str, Any]:
    """The model state dict of a Composer checkpoint (a file, or a sharded checkpoint folder), or of a
    plain state-dict file.

    Read without running code from the file unless `trust_pickle` (see `integrity`); the checksums of
    a checkpoint from `save_checkpoint` are verified unless `verify` is false (a rank whose node leader
    verifies them: `drprune.node_checks`).
    """
    path = Path(path)
    if looks_sharded(path):
        return load_sharded_model_state(path, trust_pickle)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file: give the .pt file "
                        "(for a HF model folder, convert it first: drprune convert hf-to-composer)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    obj = torch_load(path, trust_pickle=trust_pickle)
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict) and "model" in obj["state"]:
        state = obj["state"]["model"]
        if verify and STATE_CHECKSUMS_KEY in obj:
            verify_state(state, obj[STATE_CHECKSUMS_KEY], path, mapped_releaser(state))
        return state
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
    copy) and tensors in ordinary memory (a sharded checkpoint is assembled there, and dropping those
    pages would zero them) are left alone.
    """
    mapped = _file_backed({t.untyped_storage().data_ptr() for t in state.values()
                           if isinstance(t, Tensor) and t.device.type == "cpu"})

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


def _file_backed(addresses: set[int]) -> set[int]:
    """The addresses that lie in a memory-mapped file of this process (Linux's /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    regions = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            regions.append((low, high))
    return {a for a in addresses if any(low <= a < high for low, high in regions)}


def decoder_keys(cfg: ModelConfig) -> set[str]:
    """Weight names of a decoder of this config, without allocating its weights."""
    with torch.device("meta"):
        keys = PrunableDecoder(cfg).state_dict().keys()
    return {k for k in keys if not k.endswith("_extra_state")}


def config_of_state(state: dict[str, Any], fallback: ModelConfig | None = None) -> ModelConfig:
    """The config a checkpoint carries; `fallback` only serves older files without one (else UserError)."""
    extra = state.get(EXTRA_STATE_KEY)
    if isinstance(extra, dict) and "model_config" in extra:
        saved = extra["model_config"]
        if LEGACY_CONTEXT_KEY in saved:
            log.info("the checkpoint predates drprune keeping the context length apart from the training length: "
                     "its max_seq_len=%s is read as the model's context length, as before (set another with "
                     "model.context_length in a run, --context-length on an export)", saved[LEGACY_CONTEXT_KEY])
        return ModelConfig.from_dict(saved)
    if fallback is None:
        raise UserError(
            "the checkpoint carries no model config (an older Sheared-LLaMA/DRPruning file?): give its shape "
            "in a run config (model.path=FILE plus the model keys, as in configs/llama2/7b.yaml)"
        )
    return fallback


def decoder_state(state: dict[str, Any]) -> dict[str, Tensor]:
    """Decoder tensors (`transformer.*`) of a model state dict, without the `model.` prefix."""
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.transformer.")}


def load_decoder(path: str | Path, fallback: ModelConfig | None = None, trust_pickle: bool = False) -> PrunableDecoder:
    """Strictly load the decoder of a checkpoint (mask-generator tensors are ignored here)."""
    state = load_model_state(path, trust_pickle)
    cfg = config_of_state(state, fallback)
    decoder = PrunableDecoder(cfg)
    load_decoder_weights(decoder, decoder_state(state), str(path))
    return decoder


def load_decoder_weights(decoder: PrunableDecoder, tensors: dict[str, Tensor], source: str) -> None:
    """Strictly load `tensors` into `decoder`; missing or extra keys are a UserError naming `source`.

    A decoder built on the meta device gets its storage here (`materialize`), keys checked first.
    """
    expected = {k for k in decoder.state_dict() if not k.endswith("_extra_state")}
    check_state_keys(expected, set(tensors), source, "is the checkpoint from a different model config?")
    if decoder.is_meta:
        decoder.materialize("cpu")
    decoder.load_state_dict({**tensors, "_extra_state": decoder.get_extra_state()}, strict=True)


def decoder_checkpoint_state(decoder: PrunableDecoder) -> dict[str, Any]:
    """A decoder as a checkpoint's model state (`model.` keys, its config in `model._extra_state`)."""
    return {f"model.{k}": v for k, v in decoder.state_dict().items()}


# ---------------------------------------------------------------- HF side

def resolve_hf_dir(name_or_path: str) -> Path:
    """A local folder as is; `hub:NAME` is fetched from the Hugging Face Hub. Only that prefix ever
    contacts the network: a typo in a path is "not found", never a download attempt."""
    if name_or_path.startswith(HUB_PREFIX):
        repo = name_or_path[len(HUB_PREFIX):]
        if not repo:
            raise UserError(f"{name_or_path!r} names no repo: use e.g. {HUB_PREFIX}HuggingFaceTB/SmolLM2-135M")
        from huggingface_hub import snapshot_download

        log.info("fetching %s from the Hugging Face Hub", repo)
        try:
            return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated repo: all need the user
            raise UserError(f"cannot download {repo} from the Hugging Face Hub: {err}") from err
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{name_or_path} is a file, not a HF model folder (config.json + weights)")
    raise UserError(f"HF model folder {name_or_path} not found (use {HUB_PREFIX}NAME to download from the "
                    "Hugging Face Hub)")


def read_hf_tensors(hf_dir: Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a HF folder, after checking its `drprune_checksums.json` when it has one."""
    verify_folder(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        out: dict[str, Tensor] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        out[key] = fh.get_tensor(key)
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise UserError(f"cannot read {f}: {err} (truncated or corrupted?)") from err
        return out
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise UserError(f"no *.safetensors or pytorch_model*.bin weights in {hf_dir}")
    out = {}
    for f in bins:
        out.update(torch_load(f, trust_pickle=trust_pickle, mmap=False))
    return out


def load_hf(name_or_path: str, trust_pickle: bool = False) -> tuple[ModelConfig, dict[str, Tensor], Path]:
    """(config, tensors under drprune's names, resolved folder) of a HF folder or `hub:NAME`, checked whole."""
    hf_dir = resolve_hf_dir(name_or_path)
    check_complete(hf_dir, "HF model folder")
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{hf_dir} has no config.json: is it a Hugging Face model folder?")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{config_file} is not valid JSON ({err}): is the folder complete?") from err
    if not isinstance(raw, dict):
        raise UserError(f"{config_file} must hold a JSON object (the model's config)")
    cfg = config_from_hf(raw)
    tensors = read_hf_tensors(hf_dir, trust_pickle)
    if raw.get("model_type") != REMOTE_MODEL_TYPE:  # drprune's remote-code folder keeps our names
        tensors = hf_to_ours(cfg, tensors)
    check_decoder_tensors(cfg, tensors, str(hf_dir))
    return replace(cfg, dtype=source_dtype(raw, tensors, hf_dir)), tensors, hf_dir


def source_dtype(raw_config: dict[str, Any], tensors: dict[str, Tensor], source: Path) -> str | None:
    """The dtype a HF model came in, which its exports default to: its weights' one floating dtype, else
    the dtype its config.json declares; None (exports write float32) when neither is one of DTYPES."""
    found = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    declared = raw_config.get("dtype") or raw_config.get("torch_dtype")
    dtype = found[0] if len(found) == 1 else declared
    if dtype in DTYPES:
        return dtype
    log.info("%s: neither its weights (%s) nor its config.json (dtype %s) are in one of %s: exports default to "
             "float32", source, ", ".join(found) or "no floating tensors", declared, ", ".join(DTYPES))
    return None


def check_decoder_tensors(cfg: ModelConfig, tensors: dict[str, Tensor], source: str) -> None:
    """Every weight of a `cfg` decoder, each of its shape: a config.json that disagrees with the weights
    is an error naming the tensor, not a checkpoint that fails (or silently misbehaves) later."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PrunableDecoder(cfg).state_dict().items()
                    if not k.endswith("_extra_state")}
    fix = "are config.json and the weights from the same model?"
    check_state_keys(set(expected), set(tensors), source, fix)
    wrong = [k for k, t in tensors.items() if tuple(t.shape) != expected[k]]
    if wrong:
        k = wrong[0]
        raise UserError(f"{source}: tensor {k} has shape {list(tensors[k].shape)} but config.json implies "
                        f"{list(expected[k])} ({len(wrong)} tensors disagree): {fix}")


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
    card: ModelCard | None = None,
    remote_code: tuple[dict[str, Any], Sequence[Path]] | None = None,
    dtype: str | None = None,
) -> Path:
    """The one HF-folder writer: config.json + sharded safetensors (+ tokenizer files) + README.md.

    For the stock HF class by default; `remote_code=(config, files)` writes drprune's own tensor names
    with that config.json and ships `files` (the modeling code), for shapes no stock class holds
    (`drprune.compact.export.export_hf` decides which). Floating tensors are written in `dtype`
    (default: the dtype the source came in, `cfg.dtype`, else float32), and config.json's torch_dtype
    says so: runtimes load in that dtype, and a bf16 model exported as fp32 is twice its size.
    """
    if remote_code is None and not stock_class_fits(cfg):
        raise UserError("no stock HF class holds this shape: use drprune.compact.export.export_hf (remote code)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype is None and cfg.dtype is None:
        log.info("the model does not record the dtype its source came in (converted before drprune recorded it, or "
                 "built from scratch): writing float32 (choose with --dtype)")
    dtype = dtype or export_dtype(cfg)
    base, files = remote_code if remote_code is not None else (hf_config_dict(cfg), ())
    config = {**base, **(config_overrides or {}), "torch_dtype": dtype}
    items = iter(tensors.items()) if remote_code is not None else ours_to_hf(cfg, tensors)
    params = sum(t.numel() for t in tensors.values())
    with atomic_output(out_dir, overwrite, folder=True) as tmp, \
            Progress(f"export {Path(out_dir).name}", total=params, unit="params") as progress:
        write_safetensors_shards(items, tmp, max_shard_bytes, _counting(release, progress), getattr(torch, dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for path in files:
            shutil.copy2(path, tmp / path.name)
        copy_tokenizer(tokenizer_dir, tmp)
        write_card(card, cfg, tmp, remote_code=remote_code is not None)
        mark_complete(tmp)
    log.info("wrote HF folder %s%s", out_dir, " with remote code: load it with trust_remote_code=True"
             if remote_code is not None else "")
    return Path(out_dir)


def _counting(release: Callable[[Tensor], None] | None, progress: Progress) -> Callable[[Tensor], None]:
    """`release`, also counting each tensor's parameters once it is on disk: the export's progress."""
    def written(t: Tensor) -> None:
        progress.update(t.numel())
        if release is not None:
            release(t)
    return written


def write_safetensors_shards(items: Iterable[tuple[str, Tensor]], out_dir: Path, max_shard_bytes: int,
                             release: Callable[[Tensor], None] | None = None,
                             dtype: torch.dtype | None = None) -> None:
    """Stream tensors into shards of at most `max_shard_bytes` plus an index when there are several.

    Tensors are written straight from their memory (no serialised copy of the shard; floating ones cast
    to `dtype` one at a time when it is given); `release` is called on each one once it is on disk, so a
    mapped input never becomes resident all at once. Each shard's sha256, hashed as it is written, goes
    to `drprune_checksums.json` for readers to verify.
    """
    shard_keys: list[list[str]] = []
    digests: list[str] = []
    current: dict[str, Tensor] = {}
    size = 0

    def flush() -> None:
        digests.append(_write_safetensors(out_dir / f"shard-{len(shard_keys):05d}.safetensors", current, release,
                                          dtype))
        shard_keys.append(list(current))
        current.clear()

    for name, tensor in items:
        nbytes = tensor.numel() * _written_dtype(tensor, dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = tensor
        size += nbytes
    flush()
    total = len(shard_keys)
    if total == 1:
        (out_dir / "shard-00000.safetensors").rename(out_dir / "model.safetensors")
        write_folder_checksums(out_dir, {"model.safetensors": digests[0]})
        return
    finals = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    weight_map = {}
    for i, keys in enumerate(shard_keys):
        (out_dir / f"shard-{i:05d}.safetensors").rename(out_dir / finals[i])
        weight_map.update(dict.fromkeys(keys, finals[i]))
    write_folder_checksums(out_dir, dict(zip(finals, digests)))
    index = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _written_dtype(t: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _write_safetensors(path: Path, tensors: dict[str, Tensor], release: Callable[[Tensor], None] | None,
                       dtype: torch.dtype | None = None) -> str:
    """One safetensors file (8-byte header length, JSON header, raw little-endian data), one tensor at a
    time, floating ones in `dtype` when given; returns the file's sha256."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        written = _written_dtype(t, dtype)
        if written not in _SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name} has dtype {written}, which safetensors export does not support")
        nbytes = t.numel() * written.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[written], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.new(ALGORITHM)
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for t in tensors.values():
            cast = t.detach().to(device="cpu", dtype=_written_dtype(t, dtype))
            data = cast.contiguous().reshape(-1).view(torch.uint8).numpy().data
            f.write(data)
            digest.update(data)
            if release is not None:
                release(t)
            kill_point("safetensors.tensor")
    return digest.hexdigest()


def copy_tokenizer(tokenizer_dir: str | Path | None, out_dir: Path) -> None:
    """Copy the tokenizer files of `tokenizer_dir` (None: nothing) into `out_dir`; none there is a UserError."""
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


def load_any_decoder(model: str | Path, trust_pickle: bool = False) -> PrunableDecoder:
    """A decoder from a HF folder (or `hub:NAME`) or a drprune/Composer checkpoint (file or sharded folder)."""
    path = Path(model)
    if path.is_file() or looks_sharded(path):
        return load_decoder(path, trust_pickle=trust_pickle)
    cfg, tensors, _ = load_hf(str(model), trust_pickle)
    decoder = PrunableDecoder(cfg)
    load_decoder_weights(decoder, tensors, str(model))
    return decoder
