"""Vocabulary pruning: keep the N most frequent tokens of the user's data, slice the model to match.

Always kept: special tokens (control, unknown, user-defined, HF added tokens) and what makes every
text encodable: SentencePiece / byte-fallback byte tokens, or the base alphabet of a byte-level BPE.
A kept BPE token also keeps the intermediate tokens its own merges pass through, found by running
the tokenizer's merge rule on the token's characters (and, for HF BPE, which starts from character
tokens, those characters): a token is built inside any text by the same merges as on its own, so
with those kept, text made of kept tokens tokenises exactly as before.
Merges whose parts or result are gone are dropped. Ids keep their order, so old id keep[i] -> i.

Supported: SentencePiece models (tokenizer.model; BPE as in LLaMA-2, or unigram) and HF
tokenizer.json files of type BPE (byte-level as in SmolLM2 / Qwen2, or byte-fallback as in LLaMA).
Anything else (WordPiece, Unigram tokenizer.json, tiktoken files) is refused up front.
"""
from __future__ import annotations

import abc
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from drprune.compute import Compute
from drprune.errors import UserError
from drprune.models.decoder import PrunableDecoder
from drprune.convert.checkpoint import TOKENIZER_FILES

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE = "\u2581"  # SentencePiece's whitespace symbol


def merge_path(text: str, rank: Callable[[str, str], float | None]) -> list[str]:
    """Every symbol the BPE rule forms on `text`: repeatedly merge the adjacent pair of lowest rank."""
    symbols, formed = list(text), []
    while len(symbols) > 1:
        best, where = None, -1
        for i in range(len(symbols) - 1):
            r = rank(symbols[i], symbols[i + 1])
            if r is not None and (best is None or r < best):
                best, where = r, i
        if where < 0:
            break
        symbols[where:where + 2] = [symbols[where] + symbols[where + 1]]
        formed.append(symbols[where])
    return formed


class VocabFile(abc.ABC):
    """One tokenizer file whose vocabulary can be pruned."""

    name: str
    size: int

    @abc.abstractmethod
    def required(self) -> set[int]:
        """Ids that must survive whatever the frequencies say."""

    @abc.abstractmethod
    def closure(self, keep: set[int]) -> set[int]:
        """Ids needed to build the tokens in `keep` (a superset of `keep`)."""

    @abc.abstractmethod
    def write(self, keep: list[int], out_dir: Path) -> None:
        """Write the pruned file(s) into `out_dir`."""


class SentencePieceFile(VocabFile):
    """A SentencePiece tokenizer.model; a kept BPE piece also keeps the pieces its merges pass through."""

    def __init__(self, path: Path) -> None:
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.pb, self.name = pb, path.name
        self.proto = pb.ModelProto()
        try:
            self.proto.ParseFromString(path.read_bytes())
        except Exception as err:  # noqa: BLE001 - protobuf raises its own DecodeError
            raise UserError(f"{path} is not a SentencePiece model: {err}") from err
        self.size = len(self.proto.pieces)
        types = pb.ModelProto.SentencePiece
        self.normal = types.NORMAL
        self.fixed_types = {types.UNKNOWN, types.CONTROL, types.USER_DEFINED, types.BYTE}
        self.is_bpe = self.proto.trainer_spec.model_type == pb.TrainerSpec.BPE
        self.ids = {p.piece: i for i, p in enumerate(self.proto.pieces) if p.type == self.normal}

    def required(self) -> set[int]:
        # the whitespace meta symbol too: spelt in bytes it would decode as a literal U+2581
        return {i for i, p in enumerate(self.proto.pieces) if p.type in self.fixed_types or p.piece == SPACE}

    def closure(self, keep: set[int]) -> set[int]:
        if not self.is_bpe:
            return set(keep)  # unigram: the best segmentation over fewer pieces is still the best one
        pieces = self.proto.pieces

        def rank(a: str, b: str) -> float | None:
            i = self.ids.get(a + b)
            return None if i is None else -pieces[i].score  # SentencePiece BPE merges the best score first

        out = set(keep)
        for i in keep:
            if i < self.size and pieces[i].type == self.normal:
                out.update(self.ids[s] for s in merge_path(pieces[i].piece, rank))
        return out

    def write(self, keep: list[int], out_dir: Path) -> None:
        proto = self.pb.ModelProto()
        proto.CopyFrom(self.proto)
        del proto.pieces[:]
        own = [i for i in keep if i < self.size]
        proto.pieces.extend(self.proto.pieces[i] for i in own)
        new_id = {old: new for new, old in enumerate(own)}
        spec = proto.trainer_spec
        for field in ("unk_id", "bos_id", "eos_id", "pad_id"):
            old = getattr(spec, field)
            if old >= 0:
                setattr(spec, field, new_id[old])
        spec.vocab_size = len(own)
        (out_dir / self.name).write_bytes(proto.SerializeToString())


def _has_type(node: Any, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, kind) for v in node)
    return False


class BPEJsonFile(VocabFile):
    """HF tokenizer.json with a BPE model (plus the slow vocab.json/merges.txt copies when present)."""

    def __init__(self, path: Path) -> None:
        self.name, self.src = path.name, path.parent
        try:
            self.data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {path}: {err}") from err
        model = self.data.get("model", {})
        if model.get("type") != "BPE":
            raise UserError(f"{path}: vocabulary pruning of {model.get('type')!r} tokenizers is not supported "
                            "(supported: SentencePiece models and BPE tokenizer.json)")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise UserError(f"{path}: BPE with subword prefixes/suffixes is not supported for vocabulary pruning")
        self.model = model
        self.vocab: dict[str, int] = model["vocab"]
        self.pair_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
        self.merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.added = {t["id"] for t in self.data.get("added_tokens", [])}
        self.size = max([*self.vocab.values(), *self.added]) + 1
        self.token = {i: t for t, i in self.vocab.items()}

    def required(self) -> set[int]:
        out = set(self.added)
        if self.model.get("unk_token") in self.vocab:
            out.add(self.vocab[self.model["unk_token"]])
        out |= {i for t, i in self.vocab.items() if _BYTE_TOKEN.fullmatch(t) or t == SPACE}
        if self.model.get("byte_fallback") and not _has_type(self.data.get("pre_tokenizer"), "ByteLevel"):
            return out  # characters outside the vocabulary fall back to the byte tokens
        formed = {a + b for a, b in self.merges}
        return out | {i for t, i in self.vocab.items() if t not in formed}  # the base (byte) alphabet

    def closure(self, keep: set[int]) -> set[int]:
        out = set(keep)
        for i in keep:
            if i in self.token:  # HF BPE starts from characters that are themselves tokens, then merges
                text = self.token[i]
                out.update(self.vocab[c] for c in text if c in self.vocab)
                out.update(self.vocab[s] for s in merge_path(text, lambda a, b: self.ranks.get((a, b))))
        return out

    def write(self, keep: list[int], out_dir: Path) -> None:
        new_id = {old: new for new, old in enumerate(keep)}
        vocab = {self.token[i]: new_id[i] for i in keep if i in self.token}
        merges = [m for m in self.merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
        data = json.loads(json.dumps(self.data))
        data["model"]["vocab"] = vocab
        data["model"]["merges"] = [" ".join(m) for m in merges] if self.pair_strings else [list(m) for m in merges]
        for tok in data.get("added_tokens", []):
            tok["id"] = new_id[tok["id"]]
        data["post_processor"] = remap_ids(data.get("post_processor"), new_id)
        (out_dir / self.name).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if (self.src / "vocab.json").is_file():
            (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        if (self.src / "merges.txt").is_file():
            lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
            (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def remap_ids(node: Any, new_id: dict[int, int]) -> Any:
    """Token ids inside a post-processor: `ids` lists and RoBERTa-style [token, id] pairs."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list):
                out[k] = [new_id[i] for i in v]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2:
                out[k] = [v[0], new_id[v[1]]]
            else:
                out[k] = remap_ids(v, new_id)
        return out
    if isinstance(node, list):
        return [remap_ids(v, new_id) for v in node]
    return node


def load_vocab_files(tokenizer: str | Path) -> list[VocabFile]:
    """The prunable files of a tokenizer folder (or a SentencePiece .model file)."""
    path = Path(tokenizer)
    if path.is_file():
        if path.suffix != ".model":
            raise UserError(f"tokenizer {path}: only SentencePiece .model files or tokenizer folders are supported")
        return [SentencePieceFile(path)]
    if not path.is_dir():
        raise UserError(f"tokenizer {path} does not exist (a HF tokenizer folder or a SentencePiece .model)")
    files: list[VocabFile] = []
    if (path / "tokenizer.json").is_file():
        files.append(BPEJsonFile(path / "tokenizer.json"))
    if (path / "tokenizer.model").is_file():
        files.append(SentencePieceFile(path / "tokenizer.model"))
    if not files:
        found = sorted(p.name for p in path.iterdir() if p.is_file())
        raise UserError(f"{path}: vocabulary pruning is not supported for this tokenizer type (found {found}); "
                        "supported: tokenizer.model (SentencePiece) or a BPE tokenizer.json")
    return files


def choose_tokens(counts: np.ndarray, keep: int, files: list[VocabFile]) -> tuple[list[int], dict[str, int]]:
    """Kept ids (sorted): the `keep` most frequent ordinary tokens, required ones, and BPE closure."""
    size = max(f.size for f in files)
    required = set().union(*(f.required() for f in files))
    ordinary = [i for i in range(size) if i not in required]
    if keep < 1 or keep >= len(ordinary):
        raise UserError(f"--keep {keep} must be in 1..{len(ordinary) - 1}: the tokenizer has {len(ordinary)} "
                        f"prunable tokens (plus {len(required)} special/byte tokens that are always kept)")
    freq = np.zeros(size, dtype=np.int64)
    freq[: min(size, len(counts))] = counts[:size]
    top = sorted(ordinary, key=lambda i: (-int(freq[i]), i))[:keep]
    kept = required | set(top)
    while True:
        grown = set(kept)
        for f in files:
            grown = f.closure(grown)
        if grown == kept:
            break
        kept = grown
    stats = {"frequent": keep, "required": len(required), "merge_parts": len(kept) - keep - len(required),
             "seen_in_data": int((freq > 0).sum())}
    return sorted(kept), stats


def slice_vocab(decoder: PrunableDecoder, keep: list[int]) -> PrunableDecoder:
    """A copy of `decoder` whose embedding and output rows are `keep` (tied embeddings sliced once), on its
    device and in its dtype."""
    if max(keep) >= decoder.cfg.vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(keep)} but the model's vocab_size is "
                        f"{decoder.cfg.vocab_size}: model and tokenizer do not match")
    weight = decoder.transformer["wte"].weight
    index = torch.tensor(keep, device=weight.device)
    state = decoder.state_dict()
    for key in ("transformer.wte.weight", "transformer.output.weight"):
        if key in state:
            state[key] = state[key].index_select(0, index).clone()
    new = Compute(weight.device, weight.dtype).place(PrunableDecoder(replace(decoder.cfg, vocab_size=len(keep))))
    state["_extra_state"] = new.get_extra_state()
    new.load_state_dict(state, strict=True)
    return new.eval()


def prune_tokenizer_folder(tokenizer: str | Path, files: list[VocabFile], keep: list[int], out_dir: Path) -> None:
    """Write the pruned tokenizer files and the id-bearing side files (configs) into `out_dir`."""

    new_id = {old: new for new, old in enumerate(keep)}
    for f in files:
        f.write(keep, out_dir)
    src = Path(tokenizer)
    if not src.is_dir():
        return
    written = {p.name for p in out_dir.iterdir()}
    for name in TOKENIZER_FILES:
        if name in written or not (src / name).is_file():
            continue
        if name in ("tokenizer_config.json", "added_tokens.json", "generation_config.json"):
            data = json.loads((src / name).read_text(encoding="utf-8"))
            (out_dir / name).write_text(json.dumps(remap_side_file(name, data, new_id), ensure_ascii=False,
                                                   indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(src / name, out_dir / name)


def remap_side_file(name: str, data: dict[str, Any], new_id: dict[int, int]) -> dict[str, Any]:
    """Ids in tokenizer_config.json (added_tokens_decoder), added_tokens.json, generation/model configs."""
    if name == "tokenizer_config.json" and "added_tokens_decoder" in data:
        data["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in data["added_tokens_decoder"].items()}
    elif name == "added_tokens.json":
        data = {k: new_id[v] for k, v in data.items()}
    else:
        data = {**data, **remap_token_ids(data, new_id)}
    return data


def remap_token_ids(config: dict[str, Any], new_id: dict[int, int]) -> dict[str, Any]:
    """bos/eos/pad/... token ids of a config.json or generation_config.json, in the new numbering."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if not key.endswith("_token_id") or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        mapped = [new_id.get(v) for v in values]
        if any(m is None for m in mapped):
            raise UserError(f"{key}={value} names a token that vocabulary pruning removed")
        out[key] = mapped if isinstance(value, list) else mapped[0]
    return out
