"""Raw-text sources and tokenizers for `drprune data prepare`.

A domain source is a folder of .txt files, a .txt / .jsonl / .json file, or a saved Hugging Face
dataset. Every problem (missing path, empty or undecodable file, bad JSON line, missing text field)
is a UserError naming the file, raised before or while reading, never a silent skip.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from drprune.errors import UserError


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from err
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json", "dataset_info.json"))


def check_source(path: Path) -> None:
    """Fail early on a source that cannot work, before any output is written."""
    if not path.exists():
        raise UserError(f"domain source {path} does not exist")
    if path.is_dir() and not _is_hf_dataset(path) and not any(path.rglob("*.txt")):
        raise UserError(f"domain folder {path} holds no .txt files (nor is it a saved HF dataset)")
    if path.is_file() and path.suffix not in (".txt", ".jsonl", ".json"):
        raise UserError(f"domain source {path}: unsupported file type {path.suffix!r} (use .txt, .jsonl, .json)")


def _json_text(obj, where: str, field: str) -> str:
    if isinstance(obj, str):
        text = obj
    elif isinstance(obj, dict) and isinstance(obj.get(field), str):
        text = obj[field]
    else:
        raise UserError(f"{where}: no string field {field!r}")
    return text


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one domain source, in a stable order."""
    check_source(path)
    if _is_hf_dataset(path):
        yield from _hf_documents(path, text_field)
    elif path.is_dir():
        for file in sorted(path.rglob("*.txt")):
            yield _read_text(file)
    elif path.suffix == ".txt":
        yield _read_text(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    else:
        try:
            data = json.loads(_read_text(path))
        except ValueError as err:
            raise UserError(f"{path}: invalid JSON ({err})") from err
        if not isinstance(data, list) or not data:
            raise UserError(f"{path}: expected a non-empty JSON list of documents")
        for i, obj in enumerate(data):
            yield _json_text(obj, f"{path}[{i}]", text_field)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    count = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as err:
                    raise UserError(f"{path}:{no}: invalid JSON ({err})") from err
                count += 1
                yield _json_text(obj, f"{path}:{no}", text_field)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from err
    if not count:
        raise UserError(f"{path} is empty")


def _hf_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise UserError(f"{path} is a saved HF dataset; reading it needs `pip install datasets`") from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path}: a DatasetDict without a 'train' split ({list(ds)})")
        ds = ds["train"]
    if text_field not in ds.column_names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {ds.column_names})")
    for row in ds.select_columns([text_field]):
        yield row[text_field]


# Any of these marks a folder that transformers can load a tokenizer from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


class Tokenizer:
    """Batch encoder plus eos id, vocab size and vocabulary ({token: id}) for an HF tokenizer folder or a
    SentencePiece .model."""

    def __init__(self, spec: str):
        path = Path(spec)
        if not path.exists():
            raise UserError(f"tokenizer {spec} does not exist (a HF tokenizer folder or a SentencePiece .model)")
        self.encode: Callable[[list[str]], list[list[int]]]
        self.decode: Callable[[list[int]], str]
        self.vocab: Callable[[], dict[str, int]]
        if path.suffix == ".model":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(path))
            self.encode, self.decode = sp.encode, sp.decode
            self.vocab = lambda: {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
            self.vocab_size, self.eos_id = sp.get_piece_size(), sp.eos_id()
        else:
            from transformers import AutoTokenizer

            if path.is_file() or not any((path / name).is_file() for name in TOKENIZER_FILES):
                what = "a file" if path.is_file() else "a folder without tokenizer files"
                raise UserError(f"tokenizer {spec} is {what}: give a HF tokenizer folder (tokenizer.json, ...) "
                                "or a SentencePiece .model")
            try:
                tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
            except Exception as err:  # noqa: BLE001 - transformers fails in many ways on a folder without one
                raise UserError(f"cannot load a tokenizer from {path} ({type(err).__name__}: {err}): give a HF "
                                "tokenizer folder (tokenizer.json, ...) or a SentencePiece .model") from err
            self.encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
            self.decode, self.vocab = tok.decode, tok.get_vocab
            self.vocab_size, self.eos_id = len(tok), tok.eos_token_id
        if self.eos_id is None or self.eos_id < 0:
            raise UserError(f"tokenizer {spec} has no EOS token, needed between packed documents")
