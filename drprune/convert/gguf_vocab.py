"""The tokenizer half of a GGUF file, read from a HF tokenizer folder.

llama.cpp knows two tokenizer kinds that llama-family models ship with: byte-level BPE (`gpt2`:
tokens, merges and the name of a pre-tokenizer regex, as in GPT-2, LLaMA-3, Qwen2 and SmolLM) and
SentencePiece (`llama`: tokens with scores, as in LLaMA 1/2 and Mistral). Both lists are padded to
the model's embedding rows, since a GGUF reader sizes the vocabulary from the token list.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drprune.errors import UserError

log = logging.getLogger(__name__)

# SentencePiece's piece types, which GGUF's tokenizer.ggml.token_type reuses.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5
SPECIAL_IDS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unk_token_id", "pad": "pad_token_id"}
PAD_SCORE = -1000.0

# Pre-tokenizer regexes of public tokenizer.json files, by the name llama.cpp gives them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass
class Vocab:
    """Every tokenizer field a GGUF file carries; `tokens` has one entry per embedding row."""

    model: str  # "gpt2" (byte-level BPE) | "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    pre: str | None
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None

    def write(self, writer: Any) -> None:
        """Add the tokenizer keys to a gguf.GGUFWriter."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for name, token_id in self.special_ids.items():
            adders[name](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(tokenizer_dir: Path, vocab_size: int) -> Vocab:
    """The tokenizer of `tokenizer_dir` as GGUF fields, padded to `vocab_size` tokens."""
    tok = _load_tokenizer(tokenizer_dir)
    sp_file = tokenizer_dir / "tokenizer.model"
    if _is_sentencepiece(sp_file):
        model, merges, pre = "llama", None, None
        by_id, kinds, scores, add_space_prefix = _sentencepiece(sp_file)
    else:
        model, scores, add_space_prefix = "gpt2", {}, False
        by_id, kinds, merges, pre = _byte_level_bpe(tok, tokenizer_dir)
    # Added tokens: new ids on top of a SentencePiece model (whose own pieces keep their types), or,
    # in byte-level BPE, entries of the vocabulary that are matched whole (special ones are control tokens).
    for token_id, added in tok.added_tokens_decoder.items():
        if model == "gpt2" or token_id not in by_id:
            by_id[token_id] = added.content
            kinds[token_id] = CONTROL if added.special else USER_DEFINED
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer in {tokenizer_dir} has token ids up to {max(by_id)} but the model's "
                        f"embedding has {vocab_size} rows: is it the model's own tokenizer?")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, UNUSED) for i in range(vocab_size)]
    plain = tok("a", add_special_tokens=False).input_ids
    full = tok("a").input_ids
    special_ids = {name: int(getattr(tok, attr)) for name, attr in SPECIAL_IDS.items()
                   if getattr(tok, attr) is not None}
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return Vocab(
        model=model, tokens=tokens, types=types, merges=merges, pre=pre,
        scores=[scores.get(i, PAD_SCORE) for i in range(vocab_size)] if model == "llama" else None,
        special_ids=special_ids,
        add_bos=len(full) > len(plain) and full[0] == special_ids.get("bos"),
        add_eos=len(full) > len(plain) and full[-1] == special_ids.get("eos"),
        add_space_prefix=add_space_prefix, chat_template=template,
    )


def _load_tokenizer(tokenizer_dir: Path) -> Any:
    """The fast tokenizer of a folder, through its generic class: AutoTokenizer would import every
    tokenizer class of transformers first (+300 MB and seconds), for fields every fast tokenizer has."""
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    if not tokenizer_dir.is_dir():
        raise UserError(f"tokenizer folder {tokenizer_dir} does not exist")
    if (tokenizer_dir / "tokenizer.json").is_file():
        cls = PreTrainedTokenizerFast
    elif (tokenizer_dir / "tokenizer.model").is_file():
        cls = LlamaTokenizerFast  # built from the SentencePiece model
    else:
        raise UserError(f"{tokenizer_dir} has no tokenizer.json or tokenizer.model, and a GGUF file needs the "
                        "tokenizer: pass --tokenizer DIR")
    try:
        return cls.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot load the tokenizer in {tokenizer_dir}: {err}") from err


def _is_sentencepiece(path: Path) -> bool:
    """A tokenizer.model that is not the GGUF copy transformers' save_pretrained leaves (see gguf.py)."""
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(4) != b"GGUF"


def _sentencepiece(path: Path) -> tuple[dict[int, str], dict[int, int], dict[int, float], bool]:
    """Pieces, piece types and scores of a SentencePiece model, and whether it prepends a space."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    by_id = {i: p.piece for i, p in enumerate(proto.pieces)}
    kinds = {i: int(p.type) for i, p in enumerate(proto.pieces)}
    scores = {i: float(p.score) for i, p in enumerate(proto.pieces)}
    return by_id, kinds, scores, bool(proto.normalizer_spec.add_dummy_prefix)


def _byte_level_bpe(tok: Any, tokenizer_dir: Path) -> tuple[dict[int, str], dict[int, int], list[str], str]:
    """Tokens, token types, merges and llama.cpp's pre-tokenizer name of a fast byte-level BPE tokenizer."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in _kinds(spec.get("pre_tokenizer")):
        raise UserError(f"the tokenizer in {tokenizer_dir} ({spec['model']['type']}) is neither byte-level BPE "
                        "(tokenizer.json) nor SentencePiece (tokenizer.model): GGUF export supports only these two")
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    kinds = dict.fromkeys(by_id, NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return by_id, kinds, merges, pre_tokenizer_name(spec.get("pre_tokenizer"))


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pre-tokenizer as a flat list of its parts (Sequences unpacked)."""
    if node is None:
        return []
    if node["type"] == "Sequence":
        return [part for child in node["pretokenizers"] for part in _components(child)]
    return [node]


def _kinds(node: dict[str, Any] | None) -> list[str]:
    return [part["type"] for part in _components(node)]


def pre_tokenizer_name(node: dict[str, Any] | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the word-splitting rule of a byte-level BPE tokenizer.json.

    llama.cpp holds each rule as a regex of its own, so an unknown rule gets "default" and a warning:
    transformers does not read this field, but llama.cpp would split words differently."""
    parts = _components(node)
    shape = []
    for part in parts:
        if part["type"] == "ByteLevel":
            shape.append(("ByteLevel", bool(part.get("use_regex", True))))
        elif part["type"] == "Digits":
            shape.append(("Digits", bool(part.get("individual_digits", False))))
        elif part["type"] == "Split":
            shape.append(("Split", part.get("pattern", {}).get("Regex")))
        else:
            shape.append((part["type"], None))
    known = {
        (("ByteLevel", True),): "gpt-2",
        (("Digits", True), ("ByteLevel", True)): "smollm",
        (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
        (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    }
    name = known.get(tuple(shape))
    if name is None:
        log.warning("pre-tokenizer %s is not one llama.cpp knows by name: writing 'default' (llama.cpp may split "
                    "words differently from the HF tokenizer; transformers is unaffected)", shape)
        return "default"
    return name
