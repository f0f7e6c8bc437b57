"""Which tokenizer made a prepared data folder, so a model never trains on or is scored with another's ids.

`drprune data prepare` records the tokenizer's identity under "tokenizer" in OUT/domains.json: where
it came from, its vocabulary size, and a sha256 over its vocabulary (every token with its id), which
tells apart two tokenizers of the same size whatever their file format. Readers compare it with the
model's tokenizer when that is known (a HF model folder holding one, a run config's `tokenizer`);
otherwise the recorded vocabulary must fit the model's vocab_size. Data without a record (older
folders, other tools, `data merge` outputs) has its token ids scanned instead (`max_token_id`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from drprune.data.sources import Tokenizer
from drprune.errors import UserError
from drprune.data.shards import ShardReader

log = logging.getLogger(__name__)

DOMAINS_FILE = "domains.json"
IDENTITY_KEY = "tokenizer"
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def vocab_digest(vocab: dict[str, int]) -> str:
    """sha256 over "id<TAB>token" lines in id order: equal exactly when the id -> token map is equal."""
    lines = "\n".join(f"{i}\t{token}" for token, i in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])))
    return hashlib.sha256(lines.encode("utf-8", "surrogatepass")).hexdigest()


def tokenizer_identity(tok: Tokenizer, spec: str) -> dict[str, Any]:
    """The record stored under "tokenizer" in domains.json; `spec` is how the user named the tokenizer."""
    return {"source": str(spec), "vocab_size": int(tok.vocab_size), "vocab_sha256": vocab_digest(tok.vocab())}


def model_tokenizer(model: str | Path) -> str | None:
    """MODEL itself when it is a folder holding tokenizer files (a HF model folder), else None (unknown)."""
    path = Path(model)
    if path.is_dir() and any((path / n).is_file() for n in TOKENIZER_MARKERS):
        return str(path)
    return None


def data_root(data: str | Path) -> Path:
    """The prepared root of `data`: itself, or ROOT for an MDS folder ROOT/<split>/<domain>."""
    data = Path(data)
    if not (data / DOMAINS_FILE).is_file() and (data / "index.json").is_file():
        return data.parent.parent
    return data


def read_identity(data: str | Path) -> dict[str, Any] | None:
    """The recorded tokenizer identity of a prepared folder (or of one of its MDS folders), None if absent."""
    path = data_root(data) / DOMAINS_FILE
    if not path.is_file():
        return None
    try:
        ident = json.loads(path.read_text()).get(IDENTITY_KEY)
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{path} is corrupted ({err}): prepare the data again") from err
    if ident is None:
        return None
    if not (isinstance(ident, dict) and isinstance(ident.get("vocab_size"), int)
            and isinstance(ident.get("vocab_sha256"), str)):
        raise UserError(f"{path}: its \"{IDENTITY_KEY}\" entry is not a tokenizer identity; prepare the data again")
    return ident


def check_data_tokenizer(data: str | Path, *, tokenizer: str | None = None, vocab_size: int | None = None) -> bool:
    """Refuse data made with another tokenizer than `tokenizer`, or whose vocabulary exceeds `vocab_size`.

    Returns whether the data records its tokenizer (False: the caller must check the ids themselves).
    """
    ident = read_identity(data)
    if ident is None:
        return False
    made_with = f"{ident.get('source', '?')} ({ident['vocab_size']} tokens, vocab sha256 {ident['vocab_sha256'][:12]})"
    if tokenizer is not None:
        mine = tokenizer_identity(Tokenizer(tokenizer), tokenizer)
        if mine["vocab_sha256"] != ident["vocab_sha256"]:
            raise UserError(
                f"{data} was prepared with tokenizer {made_with}, but the model's tokenizer is {tokenizer} "
                f"({mine['vocab_size']} tokens, vocab sha256 {mine['vocab_sha256'][:12]}): the same ids mean other "
                f"tokens. Prepare the data again with `drprune data prepare --tokenizer {tokenizer} ...`")
    if vocab_size is not None and ident["vocab_size"] > vocab_size:
        raise UserError(
            f"{data} was prepared with tokenizer {made_with}, larger than the model's vocab_size {vocab_size}: "
            "its ids do not fit the model. Prepare the data with the model's own tokenizer")
    return True


def max_token_id(folder: Path) -> int:
    """The largest token id in an MDS folder (reads every sample: for data that records no tokenizer)."""

    reader = ShardReader(folder)
    return max(int(reader[i]["tokens"].max()) for i in range(len(reader)))


def check_token_ids(rows_max: int, vocab_size: int, where: str | Path) -> None:
    """A UserError when a token id of `where` (its largest is `rows_max`) does not fit the model's vocabulary."""
    if rows_max >= vocab_size:
        raise UserError(f"{where} holds token id {rows_max}, beyond the model's vocab_size {vocab_size} "
                        "(ids must be < vocab_size): was it made with another tokenizer? Prepare the data "
                        "with the model's tokenizer")
